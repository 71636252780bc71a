"""The training loop's one interface to how a method updates weights, whatever the method and state mode:

    out = update.forward(batch); update.backward(loss)   # per micro-batch
    chosen = update.step()                               # at the accumulation boundary
    update.lr, update.grad_norm                          # for the log

`DeepSpeedID3` binds the mask core (ID3 or a static baseline) to a DeepSpeed engine's optimizer (dense
state); `DenseUpdate` is the same interface for the dense methods (full, lora), which train every trainable
entry and have no mask; `SparseDeepSpeedID3` (sparse_update.py) keeps Adam for the chosen entries itself
(id3.state: sparse). So the loop and the checkpoints never ask which kind runs. `build_update` picks one.
For the first two, `step` calls `before_step()` between `engine.backward()` and `engine.step()`.

Gradients are reduced by then (data-parallel averaged, partitioned by ZeRO); `before_step` scores this
rank's partition, all-gathers k candidates per rank, grows every rank's mask with the same winners and
zeros the unchosen gradient entries, so DeepSpeed's clipping inside `engine.step()` sees masked
gradients. Weight decay and per-entry bias correction run in hooks on the inner torch optimizer, on the
fp32 masters, before DeepSpeed copies them back into the model's weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from id3_ds.algorithm.config import ID3Config
from id3_ds.algorithm.id3 import ID3, Keep, Scorer, layout
from id3_ds.algorithm.mask import MaskState
from id3_ds.algorithm.slices import named_weights, tied_aliases, write_entries
from id3_ds.errors import ID3Error
from id3_ds.integration.collectives import selection_reducer
from id3_ds.integration.params import full_numel, full_shape, write_local_partition
from id3_ds.integration.zero_slices import (
    check_deepspeed_version,
    check_supported,
    engine_slices,
    inner_optimizer,
    offloaded,
    refresh_offload_norms,
)
from id3_ds.methods.registry import MethodSpec
from id3_ds.methods.scorers import FisherScorer


def trainable_layout(model: torch.nn.Module, config: ID3Config, keep: Keep | None = None):
    """Whole-parameter slices (full shapes, also under zero.Init) and entry counts, in model order; weights
    held outside parameters (a quantized base) count as parameters."""
    named = [
        (n, full_shape(w) if isinstance(w, torch.nn.Parameter) else tuple(w.shape)) for n, w in named_weights(model)
    ]
    return layout(named, config, keep, tied_aliases(model))


def freeze_outside(model: torch.nn.Module, config: ID3Config, keep: Keep | None = None) -> None:
    """requires_grad=False for parameters ID3 may never touch, before DeepSpeed builds optimizer state."""
    kept = {s.name for s in trainable_layout(model, config, keep)[0]}
    for n, p in model.named_parameters():
        if n not in kept:
            p.requires_grad_(False)


class _EngineSteps:
    """forward/backward/step through DeepSpeed's engine, which owns the optimizer (dense state)."""

    engine = None

    def before_step(self) -> int:
        raise NotImplementedError

    def forward(self, batch: dict):
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        """engine.backward; before the boundary also engine.step, which there only counts the micro-step."""
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> int:
        """The boundary: the method's work on the reduced gradients, then DeepSpeed's optimizer step."""
        chosen = self.before_step()
        self.engine.step()
        return chosen

    @property
    def lr(self) -> float:
        return float(self.engine.lr_scheduler.get_last_lr()[0])

    @property
    def grad_norm(self) -> float:
        return float(self.engine.get_global_grad_norm() or 0.0)


class MaskProgress:
    """What the loop and the log read of a masked update (dense or sparse state): its `id3` selector's counts."""

    id3: ID3

    @property
    def budget(self) -> int:
        """B: the entries the run may move in all, fully trainable ones included."""
        return self.id3.budget

    @property
    def chosen_total(self) -> int:
        """Entries that may move so far."""
        return self.id3.chosen_total

    @property
    def steps(self) -> int:
        """The run's optimizer steps when the selector was built (its unmasking may end sooner)."""
        return self.id3.steps

    def progress(self, chosen_this_step: int) -> dict:
        """Fields for the step's log record."""
        return {"chosen": self.chosen_total, "budget": self.budget, "chosen_this_step": chosen_this_step}


class DeepSpeedID3(MaskProgress, _EngineSteps):
    """A masked method (ID3 or a static baseline) on a DeepSpeed engine: grows the mask, masks gradients."""

    masked = True  # checkpoints carry this rank's mask shard; the run exports a sparse delta

    def __init__(
        self,
        engine,
        config: ID3Config,
        steps: int,
        weight_decay: float,
        *,
        scorer: Scorer | None = None,
        static: bool = False,
        keep: Keep | None = None,
        fisher: FisherScorer | None = None,
    ) -> None:
        """scorer/static/keep/fisher pick a baseline method (id3_ds.methods.method_spec); the defaults are ID3.

        fisher (FISH) must be fed sample gradients before the first step (`fisher_pass`); its per-entry sums
        are freed as soon as the static mask is chosen from them.
        """
        check_deepspeed_version()
        if engine.fp16_enabled():
            raise ID3Error("fp16 is not supported with ID3; use bf16")
        check_supported(engine)
        self.engine = engine
        self.offloaded = offloaded(engine)
        self.fisher = fisher
        wanted, selectable, full = trainable_layout(engine.module, config, keep)
        slices = engine_slices(engine, wanted)
        group = getattr(engine.optimizer, "dp_process_group", None)
        # stage 0 replicates parameters (and BF16_Optimizer's masters) on every rank: each rank already
        # sees every candidate, so selection stays local; stages 1-3 partition and must all-gather
        self.replicated = engine.zero_optimization_stage() == 0
        distributed = dist.is_initialized() and dist.get_world_size(group) > 1
        self.id3 = ID3(
            slices,
            config,
            steps,
            selectable=selectable,
            fully_trainable=full,
            reducer=selection_reducer(distributed and not self.replicated, group),
            scorer=scorer,
            static=static,
        )
        self.id3.attach(inner_optimizer(engine), self.id3.decay_rates(weight_decay))

    # -- what the loop reads ------------------------------------------------------------------------

    @property
    def wants_fisher_pass(self) -> bool:
        """FISH before its first step: the Fisher must be summed before the mask is chosen from it."""
        return self.fisher is not None and self.id3.step == 0

    def fisher_pass(self, micro_batch: Callable[[int, int], dict], batches: int, accum: int) -> None:
        """Sum g^2 over `batches` sample batches through the engine, without training (methods/fish.py)."""
        from id3_ds.methods.fish import fisher_pass

        fisher_pass(self.engine, self.id3, self.fisher, micro_batch, batches, accum)

    def before_step(self) -> int:
        """Grow the mask and mask the gradients; returns the number of entries chosen this step."""
        chosen = self.id3.select()
        if self.fisher is not None:  # the static mask is chosen at the first step: the sums are spent
            self.fisher.release()
            self.fisher = None
        self.id3.mask_grads()
        if self.offloaded:
            refresh_offload_norms(self.engine, [h.access for h in self.id3.held])
        return chosen

    # -- what the checkpoints read and restore -------------------------------------------------------

    def shard_state(self) -> MaskState:
        """What this rank saves: its partition's entries, or (replicated, rank > 0) nothing."""
        if self.replicated and dist.is_initialized() and dist.get_rank() > 0:
            return MaskState()
        return self.id3.mask_state(with_values=True)

    def state_meta(self) -> dict:
        """The mask's step, counts and winners digest, saved with every shard."""
        return self.id3.state_meta()

    def load_state(self, state: MaskState, meta: dict) -> None:
        """Restore the mask from every shard of a checkpoint (any world size), re-sliced onto this rank."""
        self.id3.load_state(state, meta)

    def restore_values(self, state: MaskState) -> None:
        """Write every chosen entry's saved fp32 value into this rank's masters and the model's weights.

        For a resume whose DeepSpeed state could not be loaded as saved (another world size or stage): the
        shards hold each chosen entry exactly, whatever DeepSpeed restored.
        """
        params = dict(self.engine.module.named_parameters())
        stage = self.engine.zero_optimization_stage()
        for h in self.id3.held:
            pm = state.params.get(h.info.name)
            if pm is None or len(h.mask) == 0:
                continue
            lo = int(torch.searchsorted(pm.indices, torch.tensor(h.info.start)))
            vals = pm.value[lo : lo + len(h.mask)]
            write_entries(h.access.value(), h.mask.positions, vals)
            if stage == 3:  # the model's own low-precision partition starts at the same offset
                write_local_partition(params[h.info.name], h.mask.positions, vals)
        if stage != 3:  # replicated model weights: every rank writes every chosen entry
            for name, pm in state.params.items():
                p = params[name]
                if p.data.data_ptr() != 0:
                    p.data.view(-1)[pm.indices] = pm.value.to(p.dtype)


class DenseUpdate(_EngineSteps):
    """A dense method (full, lora): every trainable entry moves from the first step; no mask, no shards."""

    masked = False
    wants_fisher_pass = False
    steps = None  # no mask schedule

    def __init__(self, engine) -> None:
        self.engine = engine
        self.budget = sum(full_numel(p) for p in engine.module.parameters() if p.requires_grad)
        self.chosen_total = self.budget

    def fisher_pass(self, micro_batch: Callable[[int, int], dict], batches: int, accum: int) -> None:
        """Nothing to sum: a dense method scores nothing."""

    def before_step(self) -> int:
        """Nothing to choose or mask."""
        return 0

    def progress(self, chosen_this_step: int) -> dict:
        """A dense run's log records carry no mask fields."""
        return {}


def build_update(
    engine,
    method: MethodSpec | None,
    config: ID3Config,
    steps: int,
    weight_decay: float,
    *,
    lr: float = 0.0,
    max_grad_norm: float | None = None,
    make_scheduler: Callable | None = None,
):
    """`DeepSpeedID3` for a masked method's spec, `DenseUpdate` for a dense method (spec None), and
    `SparseDeepSpeedID3` for a masked method with id3.state=sparse (engine built without an optimizer; lr,
    max_grad_norm and make_scheduler, optimizer -> LR scheduler, are then its own)."""
    if method is None:
        return DenseUpdate(engine)
    if config.state == "sparse":
        from id3_ds.integration.sparse_update import SparseDeepSpeedID3

        if method.fisher is not None:
            raise ID3Error("method fish is not supported with id3.state=sparse; use id3.state=dense")
        return SparseDeepSpeedID3(
            engine,
            config,
            steps,
            weight_decay,
            lr,
            max_grad_norm,
            make_scheduler,
            scorer=method.scorer,
            static=method.static,
            keep=method.keep,
        )
    return DeepSpeedID3(
        engine,
        config,
        steps,
        weight_decay,
        scorer=method.scorer,
        static=method.static,
        keep=method.keep,
        fisher=method.fisher,
    )

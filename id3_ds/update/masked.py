"""A masked method (ID3 or a static baseline) on a DeepSpeed engine with dense optimizer state.

`DeepSpeedID3` binds the mask core to the engine's optimizer: at the accumulation boundary, `before_step`
scores this rank's partition of the reduced gradients, all-gathers k candidates per rank, grows every
rank's mask with the same winners and zeros the unchosen gradient entries, so DeepSpeed's clipping inside
`engine.step()` sees masked gradients. Weight decay and per-entry bias correction run in hooks on the
inner torch optimizer, on the fp32 masters, before DeepSpeed copies them back into the model's weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from id3_ds.algorithm.config import ID3Config
from id3_ds.algorithm.id3 import ID3
from id3_ds.algorithm.mask import MaskState
from id3_ds.algorithm.slices import write_entries
from id3_ds.integration.collectives import selection_reducer
from id3_ds.integration.params import write_local_partition
from id3_ds.integration.zero_slices import (
    check_deepspeed_version,
    check_supported,
    engine_slices,
    inner_optimizer,
    offloaded,
    refresh_offload_norms,
)
from id3_ds.methods.registry import MethodSpec
from id3_ds.plan import fp16_refused
from id3_ds.update.contract import CheckpointParts, UpdateState
from id3_ds.update.engine import EngineSteps
from id3_ds.update.fisher import fisher_pass
from id3_ds.update.layout import trainable_layout


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


ID3_SPEC = MethodSpec("id3")  # the default method: ID3's own score and schedule


class DeepSpeedID3(MaskProgress, EngineSteps):
    """A masked method (ID3 or a static baseline) on a DeepSpeed engine: grows the mask, masks gradients."""

    masked = True  # the run exports a sparse delta
    parts = CheckpointParts(engine=True, mask=True, trainer=False)

    def __init__(self, engine, config: ID3Config, steps: int, weight_decay: float, method: MethodSpec = ID3_SPEC):
        """`method` (id3_ds.methods.method_spec) picks a baseline's score, schedule and selectable tensors.

        FISH's Fisher (`method.fisher`) must be fed sample gradients before the first step (`fisher_pass`); its
        per-entry sums are freed as soon as the static mask is chosen from them.
        """
        check_deepspeed_version()
        if engine.fp16_enabled():
            raise fp16_refused()
        check_supported(engine)
        self.engine = engine
        self.offloaded = offloaded(engine)
        self.fisher = method.fisher
        wanted, selectable, full = trainable_layout(engine.module, config, method.keep)
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
            scorer=method.scorer,
            static=method.static,
        )
        self.id3.attach(inner_optimizer(engine), self.id3.decay_rates(weight_decay))

    # -- what the loop reads ------------------------------------------------------------------------

    @property
    def wants_fisher_pass(self) -> bool:
        """FISH before its first step: the Fisher must be summed before the mask is chosen from it."""
        return self.fisher is not None and self.id3.step == 0

    def fisher_pass(self, micro_batch: Callable[[int, int], dict], batches: int, accum: int) -> None:
        """Sum g^2 over `batches` sample batches through the engine, without training (update/fisher.py)."""
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

    def state_dict(self) -> UpdateState:
        return UpdateState(self.shard_state(), self.state_meta(), budget=self.budget)

    def load_state_dict(self, state: UpdateState, engine_exact: bool) -> None:
        self.load_state(state.mask, state.meta)
        if not engine_exact:  # exact fp32 values of the chosen entries, whatever DeepSpeed restored
            self.restore_values(state.mask)

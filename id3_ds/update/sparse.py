"""Sparse-state ID3 on a DeepSpeed engine (`id3.state: sparse`): DeepSpeed partitions, id3-ds optimizes.

The engine is built without an optimizer (integration/ds_config._sparse_state), so at ZeRO-3 DeepSpeed only partitions
and gathers parameters (its DeepSpeedZeRoOffload) and keeps no fp32 master, moment or gradient partition.
Each selectable or fully trainable parameter keeps requires_grad=True and gets a post-accumulate-grad hook:
autograd hands it the whole (gathered-shape) gradient of one backward; the hook averages it over the
data-parallel ranks into this rank's share (ZeRO-3: padded to P * world and reduce-scattered; stage 0 on
several ranks: all-reduced; one process: as is), adds it to an fp32 accumulation buffer and drops `.grad`
at once. So a dense gradient lives only while its backward runs. During the last micro-batch of a step
(every backward at grad_accum 1) the hook streams the share instead (algorithm/streaming.py): buffer +
share are scored at once into this rank's running top-k candidates, the gradients of the candidates and
of the chosen entries are kept, and share and buffer are freed, so at grad_accum 1 no full-size gradient
outlives its hook. Earlier micro-batches still add into fp32 buffers (4 B per entry / world, from a step's
first backward to its last). ID3_DS_SPARSE_GRAD=buffered keeps every share in the buffer until the step
instead (bit-identical: the reference for tests and memory comparisons).
Hooks fire in autograd's order, the same on every rank (same graph), so the collectives pair up; a tied
weight is one leaf and fires once; a checkpointed layer's recomputed backward fires it once too.
A quantized base (`model.quantization`, id3_ds/models/quantized.py) is no parameter: its autograd Function
hands the dense dW of the effective weight to `_held_hook`, which feeds the same `_receive` as a parameter's
hook; its slice's value is the dequantized effective weight and its write goes to the overlay. ZeRO-1/2
runs as stage 0 here (ds_config._sparse_state): every rank holds every weight and all-reduces gradients.

At the boundary, `SparseID3` (algorithm/sparse.py) runs the step: the same ID3 selection as dense mode over
this rank's partitions (value = the model's own weight partition, model dtype; the streamed candidates), the
clipping norm all-reduced over ranks (ZeRO-3 ranks own disjoint entries), sparse AdamW on the chosen
entries, and the rounded masters written straight into the rank's partition (ZeRO-3) or the weight
(stage 0), read by the next forward's gather.

The learning rate comes from an HF scheduler driving `LrHolder`, a parameterless torch optimizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from id3_ds.algorithm.config import ID3Config
from id3_ds.algorithm.id3 import ID3
from id3_ds.algorithm.mask import MaskState
from id3_ds.algorithm.slices import TensorSliceAccess, named_weights
from id3_ds.algorithm.sparse import SparseID3
from id3_ds.algorithm.streaming import GradStream
from id3_ds.errors import ID3Error
from id3_ds.integration.collectives import selection_reducer
from id3_ds.integration.params import (
    empty_partition_cache,
    full_numel,
    reduce_scatter_share,
    zero3_share,
)
from id3_ds.integration.zero_slices import PartitionAccess, check_deepspeed_version
from id3_ds.methods.registry import MethodSpec
from id3_ds.plan import fish_with_sparse_state, quantization_at_zero3
from id3_ds.update.contract import CheckpointParts, UpdateState
from id3_ds.update.layout import trainable_layout
from id3_ds.update.masked import ID3_SPEC, MaskProgress

GRAD_MODE_ENV = "ID3_DS_SPARSE_GRAD"  # "buffered": keep whole gradient partitions until the step (reference)


class LrHolder(torch.optim.Optimizer):
    """A torch optimizer with no parameters: an HF/torch LR scheduler sets its group's lr, the update reads it."""

    def __init__(self, lr: float) -> None:
        super().__init__([torch.zeros(0, requires_grad=True)], {"lr": lr})

    def step(self, closure=None) -> None:  # noqa: D102 - nothing to update: the sparse update does it
        return None


class _Buffered:
    """One slice of sparse state: the weight's own access (ZeRO-3 partition, whole parameter or quantized base)
    for its value and writes, and the step's gradient buffer the hooks fill for its gradient."""

    def __init__(self, weight, buffers: dict[str, torch.Tensor], name: str) -> None:
        self.weight, self.buffers, self.name = weight, buffers, name

    def value(self) -> torch.Tensor:
        return self.weight.value()

    def grad(self) -> torch.Tensor | None:
        return self.buffers.get(self.name)

    def write(self, positions: torch.Tensor, values: torch.Tensor) -> None:
        """The chosen entries' rounded masters into the rank's partition, the whole weight or the overlay."""
        self.weight.write(positions, values)


class SparseDeepSpeedID3(MaskProgress):
    """A masked method (ID3, random, pafi, bitfit) with sparse optimizer state on a DeepSpeed engine."""

    masked = True
    parts = CheckpointParts(engine=False, mask=True, trainer=True)  # no DeepSpeed engine state: shards + LR
    wants_fisher_pass = False

    def __init__(
        self,
        engine,
        config: ID3Config,
        steps: int,
        weight_decay: float,
        lr: float,
        max_grad_norm: float | None,
        make_scheduler: Callable[[torch.optim.Optimizer], object] | None = None,
        method: MethodSpec = ID3_SPEC,
    ) -> None:
        check_deepspeed_version()
        self.stage = engine.zero_optimization_stage()
        if self.stage not in (0, 3) or engine.optimizer is not None and self.stage == 0:
            raise ID3Error(
                f"id3.state=sparse needs ZeRO stage 3 or 0 without a DeepSpeed optimizer (stage {self.stage})"
            )
        self.engine = engine
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.accum = engine.gradient_accumulation_steps()
        self.buffers: dict[str, torch.Tensor] = {}
        self.streaming = os.environ.get(GRAD_MODE_ENV, "streamed") != "buffered"
        self._micro = 0  # micro-batches backpropagated in this step
        self._stream: GradStream | None = None  # open during the step's last backward
        wanted, selectable, full = trainable_layout(engine.module, config, method.keep)
        weights = dict(named_weights(engine.module))  # parameters, and quantized bases (models/quantized.py)
        slices = []
        for whole in wanted:
            w = weights[whole.name]
            if not isinstance(w, torch.nn.Parameter):  # a quantized base: whole on every rank, dW from its Function
                if self.stage == 3:
                    raise quantization_at_zero3(w.module.qweight.kind)
                slices.append((whole, _Buffered(w, self.buffers, whole.name)))
                w.module.grad_hook = self._held_hook(whole.name, whole.numel, w)
                continue
            start, valid = self._share(w)
            if valid:
                piece = whole.piece(start, valid)
                weight = PartitionAccess(w, valid) if self.stage == 3 else TensorSliceAccess(w)
                slices.append((piece, _Buffered(weight, self.buffers, whole.name)))
            w.register_post_accumulate_grad_hook(self._hook(whole.name, valid))
        partitioned = self.stage == 3 and self.world > 1
        id3 = ID3(
            slices,
            config,
            steps,
            selectable=selectable,
            fully_trainable=full,
            reducer=selection_reducer(partitioned),
            scorer=method.scorer,
            static=method.static,
        )
        self.core = SparseID3(
            id3,
            lr=lr,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            all_reduce=dist.all_reduce if partitioned else None,
            release=self.buffers.clear,
        )
        self.id3 = id3
        self.index = {h.info.name: i for i, h in enumerate(id3.held)}  # one share per parameter and rank
        self.lr_holder = LrHolder(lr)
        constant = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # noqa: E731
        self.scheduler = (make_scheduler or constant)(self.lr_holder)

    # -- gradients ------------------------------------------------------------------------------------

    def _share(self, p: torch.nn.Parameter) -> tuple[int, int]:
        """(first flat entry, entries) of this rank's share of p: its ZeRO-3 partition, or all of it."""
        return zero3_share(p) if self.stage == 3 else (0, full_numel(p))

    def _hook(self, name: str, valid: int) -> Callable[[torch.Tensor], None]:
        """A parameter's post-accumulate-grad hook: its whole gradient, taken off `.grad`, to `_receive`."""

        def take(p: torch.Tensor) -> torch.Tensor | None:
            g, p.grad = p.grad, None
            return g

        return lambda p: self._receive(name, valid, take(p), p)

    def _held_hook(self, name: str, valid: int, access) -> Callable[[torch.nn.Module], None]:
        """A quantized base's hook: the dW its Function collected (gradient of the effective weight)."""
        return lambda module: self._receive(name, valid, access.take_grad(), None)

    def _receive(self, name: str, valid: int, g: torch.Tensor | None, p: torch.Tensor | None) -> None:
        """One backward's whole gradient of a held weight: averaged over ranks into this rank's share, then
        added to the step's buffer or (the step's last backward) streamed; the whole gradient lives only
        inside this call (the hooks pass it without keeping a reference)."""
        if g is None:
            return
        share = self._reduce(p, g.reshape(-1), valid)
        del g
        if share is None:
            return
        if self._stream is not None:  # the step's last backward: score and keep O(k + chosen), drop the rest
            buf = self.buffers.pop(name, None)
            self._stream.absorb(self.index[name], share if buf is None else buf.add_(share))
            return
        buf = self.buffers.get(name)
        if buf is None:
            self.buffers[name] = share.to(torch.float32, copy=True)
        else:
            buf.add_(share)

    def _reduce(self, p: torch.Tensor | None, flat: torch.Tensor, valid: int) -> torch.Tensor | None:
        """This rank's share of the gradient averaged over ranks (None where the rank holds none of p);
        p is None for a weight no stage partitions (a quantized base)."""
        if self.world == 1:
            return flat
        if self.stage == 0 or p is None:
            flat = flat.contiguous()
            dist.all_reduce(flat)
            return flat.div_(self.world)
        out = reduce_scatter_share(p, flat, self.world)
        return out.narrow(0, 0, valid).div_(self.world) if valid else None

    # -- what the loop calls ------------------------------------------------------------------------

    def forward(self, batch: dict):
        """The model's output; the module itself (ZeRO-3 gathers in its hooks): the engine's forward would
        register DeepSpeed's backward hooks, which need its optimizer."""
        return self.engine.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch (divided by grad_accum, as engine.backward does); hooks reduce, and
        during the step's last micro-batch stream into this step's candidates."""
        self._micro += 1
        if self.streaming and self._micro == self.accum:
            self._stream = self.core.stream()
        (loss / self.accum).backward()

    def step(self) -> int:
        """Select, clip, update, write back; advance the LR schedule. Returns the entries chosen this step."""
        if self.stage == 3:  # nothing may stay gathered across the write: the next forward must re-gather
            empty_partition_cache(self.engine)
        streamed, self._stream, self._micro = self._stream, None, 0
        self.core.step(lr=self.lr, streamed=streamed)
        self.lr_holder.step()  # a no-op the scheduler expects before its own step
        self.scheduler.step()
        return self.core.last_chosen

    @property
    def lr(self) -> float:
        return float(self.lr_holder.param_groups[0]["lr"])

    @property
    def grad_norm(self) -> float:
        """The masked gradient's norm before clipping (chosen entries + fully trainable)."""
        return self.core.last_norm

    def fisher_pass(self, micro_batch, batches: int, accum: int) -> None:
        raise fish_with_sparse_state()

    # -- checkpoints --------------------------------------------------------------------------------

    def shard_state(self) -> MaskState:
        """This rank's chosen entries with fp32 master and moments; stage 0 replicates: rank 0 alone saves."""
        state = self.core.state()
        if self.stage == 0 and self.world > 1:
            self._check_replicas_agree(state)
            if dist.get_rank() > 0:
                return MaskState()
        return state

    def _check_replicas_agree(self, state: MaskState) -> None:
        """Replicated state (stage 0, several ranks) must be equal on every rank: each rank updates its own copy
        from the same all-reduced gradients. Compares the winners digest and fp64 checksums of every chosen
        entry's position, master and moments (one small all-gather per checkpoint); differing replicas would
        be a bug that rank 0's shard alone would hide."""
        sums = [
            [float(t.double().sum()) for t in (pm.indices, pm.value, pm.exp_avg, pm.exp_avg_sq) if t is not None]
            for _, pm in sorted(state.params.items())
        ]
        mine = (self.id3.digest, sums)
        every: list = [None] * self.world
        dist.all_gather_object(every, mine)
        if any(other != mine for other in every):
            raise RuntimeError("sparse-state replicas differ across ranks (stage 0): the ranks trained differently")

    def state_meta(self) -> dict:
        return self.core.state_meta()

    def load_state(self, state: MaskState, meta: dict) -> None:
        """Mask, masters and moments from every shard (any world size), re-sliced onto this rank; the masters
        are written into the freshly loaded base weights."""
        if self.stage == 3:
            empty_partition_cache(self.engine)
        self.core.load_state(state, meta)

    def restore_values(self, state: MaskState) -> None:
        """load_state already wrote every chosen entry's master."""

    def trainer_state(self) -> dict:
        """What a sparse checkpoint keeps besides the shards (JSON): the LR schedule's state."""
        return {"scheduler": self.scheduler.state_dict()}

    def load_trainer_state(self, saved: dict) -> None:
        """Restore the LR schedule; the next step then runs at the rate the uninterrupted run had."""
        self.scheduler.load_state_dict(saved["scheduler"])
        for group, lr in zip(self.lr_holder.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def state_dict(self) -> UpdateState:
        return UpdateState(self.shard_state(), self.state_meta(), self.trainer_state(), budget=self.budget)

    def load_state_dict(self, state: UpdateState, engine_exact: bool) -> None:
        """The shards hold everything per entry in global coordinates: any world size loads them exactly."""
        self.load_state(state.mask, state.meta)
        self.load_trainer_state(state.trainer)

"""ID3 bound to a DeepSpeed engine: call `before_step()` between `engine.backward()` and `engine.step()`
at each gradient-accumulation boundary.

Gradients are reduced by then (data-parallel averaged, partitioned by ZeRO); `before_step` scores this
rank's partition, all-gathers k candidates per rank, grows every rank's mask with the same winners and
zeros the unchosen gradient entries, so DeepSpeed's clipping inside `engine.step()` sees masked
gradients. Weight decay and per-entry bias correction run in hooks on the inner torch optimizer, on the
fp32 masters, before DeepSpeed copies them back into the model's weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from id3_ds.algorithm.config import ID3Config
from id3_ds.algorithm.id3 import ID3, Keep, Scorer, layout, local_reducer
from id3_ds.algorithm.mask import MaskState
from id3_ds.errors import ID3Error
from id3_ds.integration.collectives import allgather_reducer
from id3_ds.integration.zero_slices import (
    check_deepspeed_version,
    check_supported,
    engine_slices,
    full_shape,
    inner_optimizer,
    offloaded,
    refresh_offload_norms,
)


def trainable_layout(model: torch.nn.Module, config: ID3Config, keep: Keep | None = None):
    """Whole-parameter slices (full shapes, also under zero.Init) and entry counts, in model order."""
    named = [(n, full_shape(p)) for n, p in model.named_parameters() if p.requires_grad]
    return layout(named, config, keep)


def freeze_outside(model: torch.nn.Module, config: ID3Config, keep: Keep | None = None) -> None:
    """requires_grad=False for parameters ID3 may never touch, before DeepSpeed builds optimizer state."""
    kept = {s.name for s in trainable_layout(model, config, keep)[0]}
    for n, p in model.named_parameters():
        if n not in kept:
            p.requires_grad_(False)


class DeepSpeedID3:
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
    ) -> None:
        """scorer/static/keep pick a baseline method (id3_ds.methods.method_spec); the defaults are ID3."""
        check_deepspeed_version()
        if engine.fp16_enabled():
            raise ID3Error("fp16 is not supported with ID3; use bf16")
        check_supported(engine)
        self.engine = engine
        self.offloaded = offloaded(engine)
        wanted, selectable, full = trainable_layout(engine.module, config, keep)
        slices = engine_slices(engine, wanted)
        group = getattr(engine.optimizer, "dp_process_group", None)
        # stage 0 replicates parameters (and BF16_Optimizer's masters) on every rank: each rank already
        # sees every candidate, so selection stays local; stages 1-3 partition and must all-gather
        self.replicated = engine.zero_optimization_stage() == 0
        distributed = dist.is_initialized() and dist.get_world_size(group) > 1
        if distributed and not self.replicated:
            from deepspeed.accelerator import get_accelerator

            reducer = allgather_reducer(group, get_accelerator().current_device_name())
        else:
            reducer = local_reducer
        self.id3 = ID3(
            slices,
            config,
            steps,
            selectable=selectable,
            fully_trainable=full,
            reducer=reducer,
            scorer=scorer,
            static=static,
        )
        self.id3.attach(inner_optimizer(engine), self.id3.decay_rates(weight_decay))

    def shard_state(self) -> MaskState:
        """What this rank saves: its partition's entries, or (replicated, rank > 0) nothing."""
        if self.replicated and dist.is_initialized() and dist.get_rank() > 0:
            return MaskState()
        return self.id3.mask_state(with_values=True)

    def before_step(self) -> int:
        """Grow the mask and mask the gradients; returns the number of entries chosen this step."""
        chosen = self.id3.select()
        self.id3.mask_grads()
        if self.offloaded:
            refresh_offload_norms(self.engine, [h.access for h in self.id3.held])
        return chosen

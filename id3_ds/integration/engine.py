"""DeepSpeed's public entry points as the recipe uses them: the process group, the accelerator, the engine.

DeepSpeed and transformers are imported here on first use, so a run whose config is refused never loads
them (the refusal comes in a second, on every rank alike).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import torch


def init_process_group(collective_timeout_s: int) -> tuple[int, int, str]:
    """(rank, world size, device name) once DeepSpeed's process group is up (gloo on CPU).

    A hung rank ends the job instead of hanging: the progress watchdog (train.collective_timeout_s, started
    at resume) speaks first with a clear line; the backend's own collective timeout is only the backstop.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=collective_timeout_s + 60))
    return dist.get_rank(), dist.get_world_size(), accel.current_device_name()


def hf_deepspeed_config(ds_config: dict) -> object:
    """transformers' handle on the DeepSpeed config: while the caller keeps it alive, from_pretrained (and PEFT)
    see ZeRO-3 where the config asks for it, and build the model partitioned as it loads (zero.Init)."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def initialize(model: torch.nn.Module, ds_config: dict, params, optimizer, make_scheduler: Callable | None):
    """The DeepSpeed engine over `model` (params None: the engine builds no optimizer of its own)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, config=ds_config, lr_scheduler=make_scheduler
    )
    return engine


def all_reduce_cpu(x: torch.Tensor, device: str) -> None:
    """Sum a CPU tensor over ranks through the accelerator's backend (NCCL needs device tensors)."""
    import torch.distributed as dist

    y = x.to(device)
    dist.all_reduce(y)
    x.copy_(y.cpu())

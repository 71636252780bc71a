"""The learning-rate schedules of `train.lr_scheduler`, exactly as transformers.get_scheduler makes them.

Why not call transformers.get_scheduler: importing it (transformers.optimization) imports the Trainer's
utilities, and with them peft, bitsandbytes and their kernels, about 3 s per rank at every start on 2
loaded CPU cores, for three one-line formulas. These are those formulas (transformers 5, optimization.py),
wrapped the same way (a LambdaLR over functools.partial), so a scheduler state saved by either one loads
into the other; tests/test_lr_schedule.py compares them with transformers.get_scheduler step by step.
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _constant(step: int, *, warmup: int) -> float:
    """'constant' is HF's constant_with_warmup: linear warm-up from 0, then the configured lr."""
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    return 1.0


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _cosine(step: int, *, warmup: int, total: int, cycles: float = 0.5) -> float:
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress)))


def lr_scheduler(name: str, optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """The schedule `name` (constant, linear or cosine) with `warmup_steps` of linear warm-up, over `total_steps`."""
    factors = {
        "constant": partial(_constant, warmup=warmup_steps),
        "linear": partial(_linear, warmup=warmup_steps, total=total_steps),
        "cosine": partial(_cosine, warmup=warmup_steps, total=total_steps),
    }
    return LambdaLR(optimizer, factors[name])

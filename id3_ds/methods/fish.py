"""FISH's Fisher pass under DeepSpeed: N sample gradients through the engine, before step 0, no update.

The gradients must be the reduced, partitioned ones the selector reads (`access.grad()` is only valid
between `engine.backward()` at an accumulation boundary and `engine.step()`), so the pass drives the
engine exactly like training, with the inner optimizer's `step` replaced by a no-op: the weights, Adam's
moments and step counters stay untouched, DeepSpeed still clears its gradient buffers. The engine's step
counters and the LR scheduler are then wound back to 0, so training starts as if the pass never ran.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from id3_ds.integration.zero_slices import inner_optimizer
from id3_ds.methods.scorers import FisherScorer


def fisher_pass(engine, selector, fisher: FisherScorer, micro_batch: Callable[[int, int], dict], n: int, accum: int):
    """Accumulate g^2 of `n` optimizer-step-sized sample batches; micro_batch(sample, micro) -> model inputs."""
    inner = inner_optimizer(engine)
    inner.step = lambda *args, **kwargs: None  # shadows the class method (and the ID3 step hooks)
    try:
        for sample in range(n):
            for micro in range(accum):
                loss = engine(**micro_batch(sample, micro)).loss
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary():
                    fisher.accumulate(selector.held)
                engine.step()
    finally:
        del inner.step
    engine.global_steps = 0
    engine.global_samples = 0
    sched = engine.lr_scheduler
    if sched is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched.last_epoch = -1
            sched.step()

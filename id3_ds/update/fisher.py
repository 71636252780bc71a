"""FISH's Fisher pass under DeepSpeed: N sample gradients through the engine, before step 0, no update.

The gradients must be the reduced, partitioned ones the selector reads (`access.grad()` is only valid
between `engine.backward()` at an accumulation boundary and `engine.step()`), so the pass drives the
engine exactly like training, with the optimizer step disabled: the weights, Adam's moments and step
counters stay untouched, DeepSpeed still clears its gradient buffers. The engine's step counters and the
LR scheduler are then wound back to 0, so training starts as if the pass never ran.
"""

from __future__ import annotations

from collections.abc import Callable

from id3_ds.integration.engine_state import optimizer_step_disabled, rewind_scheduler, set_step_counters
from id3_ds.methods.scorers import FisherScorer


def fisher_pass(engine, selector, fisher: FisherScorer, micro_batch: Callable[[int, int], dict], n: int, accum: int):
    """Accumulate g^2 of `n` optimizer-step-sized sample batches; micro_batch(sample, micro) -> model inputs."""
    with optimizer_step_disabled(engine):
        for sample in range(n):
            for micro in range(accum):
                loss = engine(**micro_batch(sample, micro)).loss
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary():
                    fisher.accumulate(selector.held)
                engine.step()
    set_step_counters(engine, 0, samples=0)
    rewind_scheduler(engine)

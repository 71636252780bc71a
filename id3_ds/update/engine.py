"""Updates whose optimizer DeepSpeed's engine owns (dense optimizer state), and the dense methods' update.

For these, `step` calls `before_step()` between `engine.backward()` and `engine.step()`: the gradients are
reduced by then (data-parallel averaged, partitioned by ZeRO), so a masked method can choose and mask
before DeepSpeed clips and steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from id3_ds.integration.params import full_numel
from id3_ds.update.contract import CheckpointParts, UpdateState


class EngineSteps:
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


class DenseUpdate(EngineSteps):
    """A dense method (full, lora): every trainable entry moves from the first step; no mask, no shards."""

    masked = False
    wants_fisher_pass = False
    steps = None  # no mask schedule
    parts = CheckpointParts(engine=True, mask=False, trainer=False)  # DeepSpeed's files are its weights

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

    def state_dict(self) -> UpdateState:
        """Nothing besides DeepSpeed's engine state."""
        return UpdateState()

    def load_state_dict(self, state: UpdateState, engine_exact: bool) -> None:
        """DeepSpeed's engine state was all there was to load."""

"""The one interface between the training loop (and its checkpoints) and how a method updates weights.

    out = update.forward(batch); update.backward(loss)   # per micro-batch
    chosen = update.step()                               # at the accumulation boundary
    update.progress(chosen), update.lr, update.grad_norm # for the log
    update.state_dict() / update.load_state_dict(...)    # for the checkpoints

Three updates implement it (id3_ds/update/): `DenseUpdate` (full, lora: every trainable entry moves, no
mask), `DeepSpeedID3` (a masked method whose optimizer state DeepSpeed holds densely) and
`SparseDeepSpeedID3` (a masked method keeping Adam for the chosen entries itself). `build_update` picks one
from the run plan; the loop, saving and resuming only ever see this contract. What a checkpoint holds for
an update is said by its `parts`, never by asking which update it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from id3_ds.algorithm.mask import MaskState


@dataclass(frozen=True)
class CheckpointParts:
    """What an update's checkpoint consists of."""

    engine: bool  # DeepSpeed's engine state (weights, optimizer moments, scheduler): saved and loaded
    mask: bool  # every rank's mask shard (mask, chosen entries' fp32 values; their moments in sparse state)
    trainer: bool  # trainer_state.json: the LR schedule an update drives itself


@dataclass
class UpdateState:
    """What `state_dict` hands the checkpoint writer (this rank's part) and `load_state_dict` gets back."""

    mask: MaskState | None = None  # this rank's mask shard; None: the update has no mask
    meta: dict | None = None  # the mask's step, counts and winners digest (every shard carries it)
    trainer: dict | None = None  # JSON state the update keeps besides the shards (rank 0 writes it)
    budget: int | None = None  # B of a masked update, recorded in the checkpoint's COMPLETE marker


@runtime_checkable
class Update(Protocol):
    """How the run's weights move; see the module docstring."""

    parts: CheckpointParts
    masked: bool  # whether only chosen entries move (a sparse delta is the result)
    budget: int  # B: entries the run may move in all (a dense update: every trainable entry)
    chosen_total: int  # entries that may move so far
    steps: int | None  # the optimizer steps the mask is scheduled over; None: no mask

    def forward(self, batch: dict) -> Any:
        """The model's output for one micro-batch (its `.loss` is backpropagated)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss."""

    def step(self) -> int:
        """The accumulation boundary: choose, mask, update; returns the entries chosen this step."""

    def progress(self, chosen_this_step: int) -> dict:
        """Fields for the step's log record."""

    @property
    def lr(self) -> float:
        """The learning rate of the step just taken."""

    @property
    def grad_norm(self) -> float:
        """The gradient norm of the step just taken, before clipping."""

    @property
    def wants_fisher_pass(self) -> bool:
        """Whether sample gradients must be summed (`fisher_pass`) before the first step."""

    def fisher_pass(self, micro_batch: Callable[[int, int], dict], batches: int, accum: int) -> None:
        """Sum g^2 of `batches` sample batches without training (method fish; a no-op elsewhere)."""

    def state_dict(self) -> UpdateState:
        """This rank's part of a checkpoint (every rank calls it: it may be collective)."""

    def load_state_dict(self, state: UpdateState, engine_exact: bool) -> None:
        """Restore from a checkpoint's parts; `engine_exact`: DeepSpeed's own state was loaded as saved
        (same world size and stage), so the chosen entries' values need not be written again."""

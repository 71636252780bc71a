"""Loss normalisation over the optimizer step: every loss item of the step weighs the same.

A Hugging Face model returns the mean loss of one micro-batch; DeepSpeed's `backward` divides it by
grad_accum and ZeRO averages the gradients over the data-parallel ranks. Left alone, a label token of a
short micro-batch would weigh more than one of a long micro-batch, and the gradient would depend on how
the global batch is split (micro_batch_size x grad_accum x world size). Like torchtune and HF Trainer
(`num_items_in_batch`), the step's gradient is instead sum(item losses) / N, N the loss items of the whole
step (all micro-batches, all ranks). An item is a next-token label for the LM formats and an example for
classification (one label per row, so the step's per-example mean).

Micro-batch m's mean is multiplied by n_m * grad_accum * world / N: DeepSpeed's 1/grad_accum and 1/world
cancel the last two factors, and mean_m * n_m is the micro-batch's sum of item losses. Rescaling the
model's own mean (rather than passing `num_items_in_batch`) works for every model whose loss is a mean
over items, sequence classifiers included, which take no such argument. Every micro-batch has n_m >= 1:
the data loader drops examples with no loss token, so the mean is never 0/0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from id3_ds.data.loading import IGNORE


def loss_items(labels: torch.Tensor) -> int:
    """The items a model's mean loss averages over: rows of 1-D class ids, or LM labels after HF's shift by one."""
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != IGNORE).sum())


@dataclass(frozen=True)
class StepLoss:
    """One optimizer step's loss items: this rank's per micro-batch, and the total over all ranks."""

    items: tuple[int, ...]  # this rank's micro-batches, in order
    total: int  # all micro-batches of all ranks
    world: int

    def scale(self, micro: int, mean_loss: torch.Tensor) -> torch.Tensor:
        """The loss to give `engine.backward`: after its 1/grad_accum and the rank average, grad = sum/N."""
        return mean_loss * (self.items[micro] * len(self.items) * self.world / self.total)


def step_loss(
    batches: Sequence[dict[str, torch.Tensor]], world: int, all_reduce: Callable[[torch.Tensor], None] | None
) -> StepLoss:
    """Count this rank's loss items in the step's micro-batches and sum the count over ranks (one all-reduce).

    Every rank must call it once per step, before the step's first forward. `all_reduce` sums a tensor in
    place over ranks (`torch.distributed.all_reduce`); None for one process.
    """
    items = tuple(loss_items(b["labels"]) for b in batches)
    count = torch.tensor([sum(items)], dtype=torch.int64, device=batches[0]["labels"].device)
    if all_reduce is not None:
        all_reduce(count)
    return StepLoss(items, max(int(count.item()), 1), world)

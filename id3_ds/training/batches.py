"""Which examples each rank sees at each micro-step: a pure function of (seed, step), so resume is exact.

Every epoch is a fresh permutation seeded by (seed, epoch). A global batch is micro_batch_size *
grad_accum * world_size consecutive examples of the stream; rank r takes its micro-batches from it. A run
resumed at step s asks for step s and gets what the uninterrupted run got, on any world size with the
same global batch.
"""

from __future__ import annotations

import math

import torch

from id3_ds.errors import SameOnEveryRank


def global_batch(micro_batch_size: int, grad_accum: int, world: int) -> int:
    """Examples per optimizer step over all ranks (the run config's `train.global_batch(world)`)."""
    return micro_batch_size * grad_accum * world


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    return max(1, n_examples // global_batch)


def total_steps(
    n_examples: int, global_batch: int, steps: int | None, epochs: float | None, micro_batch_size: int = 1
) -> int:
    """The run's optimizer steps. Refuses a training set so small that a rank's micro-batch would be empty (a
    smaller one is fine: the last micro-batches of the one global batch are then short)."""
    if n_examples <= global_batch - micro_batch_size:
        raise SameOnEveryRank(
            f"the training data has {n_examples} usable examples, too few for one global batch of {global_batch} "
            "(train.micro_batch_size x train.grad_accum x ranks; some micro-batch would be empty): lower those "
            "or add data"
        )
    if steps is not None:
        return steps
    return max(1, math.ceil(epochs * steps_per_epoch(n_examples, global_batch)))


def micro_batch_indices(
    n_examples: int, seed: int, step: int, micro: int, rank: int, world: int, micro_batch_size: int, grad_accum: int
) -> list[int]:
    """Example indices of one rank's micro-batch `micro` (0..grad_accum-1) at optimizer step `step`."""
    batch = global_batch(micro_batch_size, grad_accum, world)
    per_epoch = steps_per_epoch(n_examples, batch)
    epoch, in_epoch = divmod(step, per_epoch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    # order inside a global batch: micro-step major, then rank, so world size only changes who takes what
    start = in_epoch * batch + (micro * world + rank) * micro_batch_size
    return perm[start : start + micro_batch_size].tolist()

"""Which examples a step takes: a training set too small for one global batch is refused up front."""

from __future__ import annotations

import pytest

from id3_ds.errors import SameOnEveryRank
from id3_ds.training.batches import micro_batch_indices, total_steps


def test_a_training_set_that_leaves_a_micro_batch_empty_is_one_clear_line() -> None:
    """Such a set used to crash in collate (an empty micro-batch) after the model had loaded."""
    with pytest.raises(SameOnEveryRank, match=r"2 usable examples, too few for one global batch of 4 .*micro_batch"):
        total_steps(2, 4, steps=10, epochs=None, micro_batch_size=2)
    assert total_steps(3, 4, steps=10, epochs=None, micro_batch_size=2) == 10  # the last micro-batch is short


def test_exactly_one_global_batch_fills_every_micro_batch() -> None:
    assert total_steps(4, 4, steps=None, epochs=2.0) == 2
    seen = [
        micro_batch_indices(4, 0, step=1, micro=m, rank=r, world=2, micro_batch_size=1, grad_accum=2)
        for m in (0, 1)
        for r in (0, 1)
    ]
    assert sorted(i for batch in seen for i in batch) == [0, 1, 2, 3]

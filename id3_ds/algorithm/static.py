"""The static schedule of the paper's baselines (random, PaFi, FISH, BitFit): all of B at step 0.

Same interface as `UnmaskSchedule`, so the selector, its checkpoints and the exact-budget checks are
shared: a static method is ID3 with another score and this schedule, never a separate code path.
"""

from __future__ import annotations

from dataclasses import dataclass

from id3_ds.algorithm.schedule import UnmaskSchedule


@dataclass(frozen=True)
class StaticSchedule(UnmaskSchedule):
    """Choose `budget` entries at step 0 and never grow."""

    def target_after(self, step: int) -> int:
        return self.budget if step >= 0 else 0

"""How many entries are unmasked at each optimizer step.

u_t = floor(B / T), plus one during the first B mod T steps; after T steps exactly B are chosen. The
schedule is expressed as a cumulative target so a caller can always ask "how many should be chosen after
step t" and grow by the difference: a skipped step is caught up and the total never overshoots B (the
authors' code never advanced its step counter and so overshot).
"""

from __future__ import annotations

from dataclasses import dataclass

from id3_ds.algorithm.config import budget_count_refused
from id3_ds.errors import ID3Error


def resolve_budget(budget: int | float, selectable: int) -> int:
    """Turn a count or a fraction of the selectable entries into an entry count B, validated."""
    if selectable < 1:
        raise ID3Error("no selectable entries: id3.targets matched no trainable parameter")
    if isinstance(budget, float):
        count = int(budget * selectable)
        if count < 1:
            raise ID3Error(f"id3.budget={budget} of {selectable} selectable entries rounds to 0; raise the fraction")
        return count
    if budget < 1:
        raise budget_count_refused(budget)
    if budget > selectable:
        raise ID3Error(
            f"id3.budget={budget} exceeds the {selectable} selectable entries; lower it or widen id3.targets"
        )
    return int(budget)


@dataclass(frozen=True)
class UnmaskSchedule:
    """Cumulative unmasking targets for `budget` entries over `steps` optimizer steps."""

    budget: int
    steps: int

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ID3Error(f"the number of optimizer steps must be >= 1, got {self.steps}")
        if self.budget < 0:
            raise ID3Error(f"budget must be >= 0, got {self.budget}")

    def per_step(self, step: int) -> int:
        """u_t: entries unmasked at 0-based step `step` (0 after the last step)."""
        return self.target_after(step) - self.target_after(step - 1)

    def target_after(self, step: int) -> int:
        """Entries chosen once 0-based step `step` has run (0 before step 0, B from step T-1 on)."""
        done = min(max(step + 1, 0), self.steps)
        base, extra = divmod(self.budget, self.steps)
        return done * base + min(done, extra)

"""The unmasking schedule ends at exactly B and never overshoots."""

from __future__ import annotations

import pytest

from id3_ds.algorithm.schedule import UnmaskSchedule, resolve_budget
from id3_ds.errors import ID3Error


@pytest.mark.parametrize("budget", [0, 1, 2, 7, 10, 99, 100, 101, 1000, 12345])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 100, 333])
def test_budget_is_exact_and_front_loads_the_remainder(budget: int, steps: int) -> None:
    s = UnmaskSchedule(budget, steps)
    per = [s.per_step(t) for t in range(steps)]
    assert sum(per) == budget
    base, extra = divmod(budget, steps)
    assert per == [base + 1] * extra + [base] * (steps - extra)
    assert s.target_after(steps - 1) == budget
    assert all(s.per_step(t) == 0 for t in range(steps, steps + 5))
    assert s.target_after(-1) == 0


def test_fraction_and_count_budgets() -> None:
    assert resolve_budget(0.25, 100) == 25
    assert resolve_budget(7, 100) == 7
    with pytest.raises(ID3Error, match="exceeds"):
        resolve_budget(101, 100)
    with pytest.raises(ID3Error, match=">= 1"):
        resolve_budget(0, 100)
    with pytest.raises(ID3Error, match="rounds to 0"):
        resolve_budget(0.001, 100)

"""The shared assertions fail on a wrong result: otherwise every test built on them proves nothing."""

from __future__ import annotations

import pytest
import torch

from tests.assertions import assert_only_chosen_moved


def _weights() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 5, generator=g), "b": torch.randn(5, generator=g)}
    final = {n: t.clone() for n, t in base.items()}
    final["w"].view(-1)[[3, 17]] += 1.0  # the chosen entries train
    return base, final


@pytest.mark.parametrize("as_mask", [False, True])
def test_only_chosen_entries_moved_passes(as_mask: bool) -> None:
    base, final = _weights()
    idx = torch.tensor([3, 17])
    chosen = idx if not as_mask else torch.zeros(20, dtype=torch.bool).index_fill(0, idx, True)
    assert_only_chosen_moved(base, final, {"w": chosen}, chosen_must_move=True)
    assert_only_chosen_moved(base, final, {"w": torch.tensor([0, 3, 17])})  # chosen but unmoved is allowed


@pytest.mark.parametrize(
    "edit, chosen, match",
    [
        (lambda f: f["w"].view(-1).__setitem__(4, 9.0), {"w": [3, 17]}, "1 unchosen entries of w moved, first at"),
        (lambda f: f["b"].__setitem__(0, 9.0), {"w": [3, 17]}, "unchosen entries of b moved"),  # not chosen at all
        (lambda f: None, {"w": [3, 17, 18]}, "1 chosen entries of w never moved"),
        (lambda f: f.pop("b"), {"w": [3, 17]}, "b is missing"),
        (lambda f: None, {"w": [3, 17], "x": [0]}, "chosen tensors missing from the base"),
    ],
    ids=["unchosen-entry", "unchosen-tensor", "chosen-unmoved", "missing-tensor", "unknown-name"],
)
def test_a_wrong_result_fails(edit, chosen, match) -> None:
    base, final = _weights()
    edit(final)
    with pytest.raises(AssertionError, match=match):
        assert_only_chosen_moved(base, final, {n: torch.tensor(i) for n, i in chosen.items()}, chosen_must_move=True)


def test_comparison_is_bit_for_bit() -> None:
    """A NaN kept is unmoved (NaN != NaN would call it moved); 0.0 -> -0.0 moved (0.0 == -0.0 would hide it)."""
    base = {"w": torch.tensor([float("nan"), 0.0])}
    assert_only_chosen_moved(base, {"w": base["w"].clone()}, {})
    with pytest.raises(AssertionError, match="1 unchosen entries of w moved, first at \\[1\\]"):
        assert_only_chosen_moved(base, {"w": torch.tensor([float("nan"), -0.0])}, {})
    with pytest.raises(AssertionError, match="torch.bfloat16"):
        assert_only_chosen_moved(base, {"w": base["w"].to(torch.bfloat16)}, {})

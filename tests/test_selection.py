"""The fast two-stage selection agrees with a brute-force reference, whatever the slicing."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from id3_ds.algorithm.selection import Candidates, merge_candidates, slice_candidates, top_positions
from tests.reference import reference_winners

SHAPES = [(7, 5), (13,), (4, 3, 2), (1,), (33, 3)]


def _random_slicing(numel: int, pieces: int, rng: random.Random) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(1, numel), min(pieces - 1, numel - 1))) if numel > 1 else []
    bounds = [0, *cuts, numel]
    return [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def _fast_winners(grads, values, chosen: set[int], k, eps, exp, pieces, rng, chunk) -> list[int]:
    """Slice every tensor into `pieces` holders, propose per holder, merge."""
    holders: list[list[Candidates]] = [[] for _ in range(pieces)]
    key_base = 0
    for g, v in zip(grads, values):
        n = g.numel()
        for start, numel in _random_slicing(n, pieces, rng):
            first = key_base + start
            local_chosen = torch.tensor(
                sorted(c - first for c in chosen if first <= c < first + numel), dtype=torch.int64
            )
            cand = slice_candidates(
                g.reshape(-1)[start : start + numel],
                v.reshape(-1)[start : start + numel],
                local_chosen,
                first,
                k,
                eps,
                exp,
                chunk=chunk,
            )
            holders[rng.randrange(pieces)].append(cand)
        key_base += n
    per_holder = [merge_candidates(h, k) for h in holders]
    return merge_candidates(per_holder, k).keys.tolist()


@pytest.mark.parametrize("pieces", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("case", ["random", "ties", "zero_grads", "nan_and_zero_theta", "constant", "two_levels"])
@pytest.mark.parametrize("exp", [1.0, 0.0, -0.5, 2.0])
def test_matches_bruteforce_reference(pieces: int, case: str, exp: float) -> None:
    # crc32, not hash(): str hashes change per process (PYTHONHASHSEED), so a failure would not reproduce
    seed = zlib.crc32(repr((pieces, case, exp)).encode())
    rng = random.Random(seed)
    torch.manual_seed(pieces)
    grads = [torch.randn(s) for s in SHAPES]
    values = [torch.randn(s) for s in SHAPES]
    if case == "ties":  # few distinct scores: most of the order is decided by the key
        grads = [torch.randint(-2, 3, s).float() for s in SHAPES]
        values = [torch.ones(s) for s in SHAPES]
    elif case == "zero_grads":
        grads = [torch.zeros(s) for s in SHAPES]
    elif case == "constant":  # every score equal: the winners are the k lowest unchosen keys
        grads = [torch.full(s, 0.5) for s in SHAPES]
        values = [torch.ones(s) for s in SHAPES]
    elif case == "two_levels":  # a few high scores, then one huge tie (signed zeros included) decided by key
        grads = [torch.where(torch.rand(s) < 0.1, 1.0, -0.0 if i % 2 else 0.0) for i, s in enumerate(SHAPES)]
        values = [torch.ones(s) for s in SHAPES]
    elif case == "nan_and_zero_theta":
        grads[0].view(-1)[3] = float("nan")
        values[1].zero_()
    total = sum(g.numel() for g in grads)
    chosen = set(rng.sample(range(total), 20))
    for k in (1, 7, 40, total - len(chosen)):
        want = reference_winners(grads, values, chosen, k, 1e-3, exp)
        got = _fast_winners(grads, values, chosen, k, 1e-3, exp, pieces, rng, chunk=rng.choice([4, 16, 1 << 22]))
        assert got == want, f"case={case} pieces={pieces} exp={exp} k={k}: rng seed {seed}"


def test_scorer_signed_zeros_tie_by_key() -> None:
    """-0.0 == 0.0 as scores: a method's scorer returning both must see them tie, broken by the smaller key."""
    scores = torch.tensor([-0.0, 0.0, -0.0, 1.0, 0.0, -0.0])

    def scorer(lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(scores[lo:hi])

    for chunk in (2, 1 << 22):
        got = slice_candidates(torch.zeros(6), torch.ones(6), torch.tensor([1]), 0, 3, 1e-3, 1.0, chunk, scorer)
        assert got.keys.tolist() == [0, 2, 3]


def test_top_positions_breaks_ties_by_lowest_position() -> None:
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 3.0])
    assert top_positions(scores, 3).tolist() == [1, 2, 4]
    assert top_positions(scores, 0).tolist() == []
    assert top_positions(scores, 10).tolist() == list(range(6))


def test_chosen_entries_are_never_proposed_again() -> None:
    g = torch.tensor([5.0, 4.0, 3.0, 2.0])
    cand = slice_candidates(g, torch.ones(4), torch.tensor([0, 1]), first_key=10, k=4, eps=1e-3, exp=1.0)
    assert cand.keys.tolist() == [12, 13]


def test_merge_drops_padding() -> None:
    real = Candidates(torch.tensor([1.0, 2.0]), torch.tensor([3, 9]))
    pad = Candidates(torch.full((2,), float("-inf")), torch.tensor([0, 1]))
    assert merge_candidates([pad, real], 3).keys.tolist() == [3, 9]


@pytest.mark.parametrize("case", ["random", "ties", "nan", "zero_grads", "constant", "nan_ties"])
@pytest.mark.parametrize("k", [1, 13, 200, 1500, 5000])
def test_block_prefilter_on_large_slices_matches_reference(case: str, k: int) -> None:
    """Slices large enough for the block-maximum prefilter (k much smaller than the block count)."""
    g = torch.Generator().manual_seed(k)
    n = 300_007
    grad = torch.randn(n, generator=g)
    if case == "ties":
        grad = torch.randint(0, 4, (n,), generator=g).float()
    elif case == "nan":
        grad[torch.randint(0, n, (50,), generator=g)] = float("nan")
    elif case == "zero_grads":
        grad.zero_()
    elif case == "constant":  # one tie over 300k entries, across every block and chunk boundary
        grad.fill_(2.0)
    elif case == "nan_ties":  # mostly NaN (all scoring NAN_SCORE, tied) with a few equal real scores
        grad.fill_(float("nan"))
        grad[torch.randint(0, n, (3000,), generator=g)] = 1.0
    value = torch.randn(n, generator=g) if case not in ("ties", "constant", "nan_ties") else torch.ones(n)
    chosen = torch.sort(torch.randperm(n, generator=g)[:1000]).values
    want = reference_winners([grad], [value], set(chosen.tolist()), k, 1e-3, 1.0)
    for chunk in (1 << 22, 65_536):
        got = slice_candidates(grad, value, chosen, 0, k, 1e-3, 1.0, chunk=chunk)
        assert got.keys.tolist() == want

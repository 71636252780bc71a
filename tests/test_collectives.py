"""The two-round cross-rank top-k equals one merge of every rank's candidates, whatever their spread."""

from __future__ import annotations

import random

import pytest
import torch

from id3_ds.algorithm.selection import Candidates, merge_candidates
from id3_ds.integration.collectives import two_round_reduce


def _simulate(per_rank: list[Candidates], k: int) -> tuple[list[Candidates], list[int]]:
    """Run two_round_reduce on every simulated rank in lockstep; returns results and bytes received."""
    world = len(per_rank)
    import threading

    barrier = threading.Barrier(world)
    slots: list = [None] * world
    results: list = [None] * world
    received = [0] * world

    def run(r: int) -> None:
        def gather(t: torch.Tensor) -> list[torch.Tensor]:
            slots[r] = t
            barrier.wait()
            out = list(slots)
            barrier.wait()
            received[r] += sum(x.numel() * 8 for x in out)
            return out

        def max_all(n: torch.Tensor) -> int:
            slots[r] = int(n)
            barrier.wait()
            out = max(slots)
            barrier.wait()
            return out

        results[r] = two_round_reduce(per_rank[r], k, world, gather, max_all)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, received


def _candidates(rng: random.Random, keys: list[int], ties: bool) -> Candidates:
    keys = sorted(keys)
    scores = [float(rng.randint(0, 3)) if ties else rng.random() for _ in keys]
    return Candidates(torch.tensor(scores, dtype=torch.float32), torch.tensor(keys, dtype=torch.int64))


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("spread", ["even", "one_rank_wins", "few"])
@pytest.mark.parametrize("ties", [False, True])
def test_two_rounds_match_a_single_merge(world: int, spread: str, ties: bool) -> None:
    rng = random.Random(world * 7 + len(spread) + ties)
    k = 40
    keys = rng.sample(range(10_000), world * k)
    per_rank = []
    for r in range(world):
        n = k if spread != "few" else rng.randint(0, 5)
        c = _candidates(rng, keys[r * k : r * k + n], ties)
        if spread == "one_rank_wins" and r == world - 1:
            c = Candidates(c.scores + 100.0, c.keys)
        per_rank.append(merge_candidates([c], k))  # local top-k, key-sorted, as ID3 hands it over
    want = merge_candidates(per_rank, k)
    results, received = _simulate(per_rank, k)
    for got in results:
        assert len(got) == k  # a fixed shape: k rows
        got = got.take((got.scores > float("-inf")).nonzero().squeeze(1))  # padding rows only when few exist
        assert torch.equal(got.keys, want.keys) and torch.equal(got.scores, want.scores)
    one_round = world * k * 16
    if spread == "even" and world == 8 and not ties:
        assert received[0] < one_round / 2  # the point: far fewer bytes than gathering k from every rank
    assert all(b <= one_round + world * (-(-2 * k // world)) * 16 for b in received)

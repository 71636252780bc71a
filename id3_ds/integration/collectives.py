"""The cross-rank half of the global top-k, in two small all-gathers instead of one of world x k.

Each rank orders its local candidates best first (score desc, key asc) and packs (score, key) as float64
pairs (an fp32 score and an integer key below 2^53 are both exact in float64).

Round A: every rank sends its best m = ceil(2k / world). Every rank merges the same gathered rows and, if
they hold k entries, takes the k-th best of them, tau. A subset's k-th best ranks at or below the true
k-th best, so every true winner ranks at or above tau: a rank's unsent candidates below tau can never win.
Round B: every rank sends its unsent candidates that rank above tau (padded to the largest such count,
found by one all-reduce; skipped when it is 0). Merging rounds A and B gives the exact global top-k, the
same on every rank, after exactly two or three collectives.

Bytes received per rank and step: world x m x 16 (about 32 k bytes, whatever the world size) in round A,
plus world x max_count x 16 in round B: nothing when winners are spread over the ranks, at most
world x k x 16 (the one-round cost) when one rank holds them all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from id3_ds.algorithm.id3 import Reducer, local_reducer
from id3_ds.algorithm.selection import Candidates, merge_candidates

MAX_KEY = 1 << 53
Gather = Callable[[torch.Tensor], list[torch.Tensor]]  # every rank's equally-shaped tensor, in rank order
MaxAll = Callable[[int], int]  # the maximum of an int over ranks


def best_first(c: Candidates) -> Candidates:
    """Candidates sorted by (score desc, key asc), padding (-inf) dropped."""
    real = c.scores > float("-inf")
    scores, keys = c.scores[real], c.keys[real]
    by_key = torch.argsort(keys)
    scores, keys = scores[by_key], keys[by_key]
    by_score = torch.sort(scores, descending=True, stable=True).indices
    return Candidates(scores[by_score], keys[by_score])


def _pack(c: Candidates, rows: int) -> torch.Tensor:
    packed = torch.full((rows, 2), float("-inf"), dtype=torch.float64)
    packed[:, 1] = MAX_KEY
    packed[: len(c), 0] = c.scores.to(torch.float64)
    packed[: len(c), 1] = c.keys.to(torch.float64)
    return packed


def _unpack(rows: list[torch.Tensor]) -> list[Candidates]:
    return [Candidates(r[:, 0].to(torch.float32), r[:, 1].to(torch.int64)) for r in (x.cpu() for x in rows)]


def _worst(top: Candidates) -> tuple[float, int]:
    """The last of `top` in (score desc, key asc) order."""
    low = float(top.scores.min())
    return low, int(top.keys[top.scores == low].max())


def two_round_reduce(local: Candidates, k: int, world: int, gather: Gather, max_all: MaxAll) -> Candidates:
    """The exact global top-k of every rank's `local` candidates (see the module docstring)."""
    mine = best_first(local)
    m = max(1, -(-2 * k // world))
    got = _unpack(gather(_pack(Candidates(mine.scores[:m], mine.keys[:m]), m)))
    first = merge_candidates(got, k)
    rest = Candidates(mine.scores[m:], mine.keys[m:])
    if len(first) == k and len(rest):
        tau_score, tau_key = _worst(first)
        above = (rest.scores > tau_score) | ((rest.scores == tau_score) & (rest.keys < tau_key))
        rest = Candidates(rest.scores[above], rest.keys[above])
    n_max = max_all(len(rest))
    if n_max == 0:
        return first
    return merge_candidates(got + _unpack(gather(_pack(rest, n_max))), k)


def allgather_reducer(group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> Reducer:
    world = dist.get_world_size(group)

    def gather(packed: torch.Tensor) -> list[torch.Tensor]:
        packed = packed.to(device)
        out = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(out, packed, group=group)
        return out

    def max_all(n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t.item())

    return lambda local, k: two_round_reduce(local, k, world, gather, max_all)


def device_name() -> str:
    """The device collectives run on for this process: DeepSpeed's accelerator ("cpu" under gloo, "cuda:N")."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def selection_reducer(partitioned: bool, group: dist.ProcessGroup | None = None) -> Reducer:
    """How ID3's candidates become the global top-k: across `group`'s ranks when each rank holds only its
    own partition of the parameters, locally when every rank already sees every candidate (one process,
    or ZeRO stage 0's replicas)."""
    return allgather_reducer(group, device_name()) if partitioned else local_reducer

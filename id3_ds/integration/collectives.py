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

Everything stays on the candidates' device (NCCL takes device tensors only) with fixed shapes; the one
host read is round B's size, the maximum over ranks of each rank's count above tau.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from id3_ds.algorithm.id3 import Reducer, local_reducer
from id3_ds.algorithm.selection import NEG_INF, Candidates, best_k, pack

MAX_KEY = 1 << 53
Gather = Callable[[torch.Tensor], list[torch.Tensor]]  # every rank's equally-shaped tensor, in rank order
MaxAll = Callable[[torch.Tensor], int]  # the maximum over ranks of a 0-d int64 device tensor, read on the host


def best_first(c: Candidates) -> Candidates:
    """Candidates sorted by (score desc, key asc); padding (-inf) rows sort last."""
    by_key = torch.argsort(c.keys)
    return c.take(by_key[torch.argsort(pack(c.scores[by_key]), descending=True)])


def _pack(scores: torch.Tensor, keys: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, 2) float64 on the candidates' device: (score, key) pairs, then padding (-inf, MAX_KEY)."""
    packed = torch.full((rows, 2), NEG_INF, dtype=torch.float64, device=keys.device)
    packed[:, 1] = MAX_KEY
    n = min(rows, keys.numel())
    packed[:n, 0] = scores[:n].to(torch.float64)
    packed[:n, 1] = keys[:n].to(torch.float64)
    return packed


def _unpack(rows: list[torch.Tensor]) -> Candidates:
    both = torch.cat(rows)
    return Candidates(both[:, 0].to(torch.float32), both[:, 1].to(torch.int64))


def two_round_reduce(local: Candidates, k: int, world: int, gather: Gather, max_all: MaxAll) -> Candidates:
    """The exact global top-k of every rank's `local` candidates (see the module docstring), key order, k rows
    (padding (-inf) rows only if fewer than k real candidates exist on all ranks together)."""
    mine = best_first(local)
    m = max(1, -(-2 * k // world))
    got = gather(_pack(mine.scores, mine.keys, m))
    first = best_k(_unpack(got), k)
    # on the collectives' device (a rank holding no selectable entry proposes empty CPU candidates)
    rest = mine.take(torch.arange(min(m, len(mine)), len(mine), device=mine.keys.device)).to(got[0].device)
    # tau: the worst of `first` in (score desc, key asc); rest is best-first, so those above tau are a prefix
    tau_score = first.scores.min()
    tau_key = torch.where(first.scores == tau_score, first.keys, -1).max()
    above = (rest.scores > NEG_INF) & ((rest.scores > tau_score) | ((rest.scores == tau_score) & (rest.keys < tau_key)))
    count = above.sum()
    n_max = int(max_all(count))
    if n_max == 0:
        return first
    sent = torch.arange(n_max, device=rest.keys.device) < count
    scores = torch.full((n_max,), NEG_INF, dtype=torch.float32, device=rest.keys.device)
    keys = torch.full((n_max,), MAX_KEY, dtype=torch.int64, device=rest.keys.device)
    n = min(n_max, len(rest))
    scores[:n], keys[:n] = rest.scores[:n], rest.keys[:n]
    scores = torch.where(sent, scores, NEG_INF)
    keys = torch.where(sent, keys, MAX_KEY)
    return best_k(_unpack(got + gather(_pack(scores, keys, n_max))), k)


def allgather_reducer(group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> Reducer:
    world = dist.get_world_size(group)

    def gather(packed: torch.Tensor) -> list[torch.Tensor]:
        packed = packed.to(device)
        out = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(out, packed, group=group)
        return out

    def max_all(n: torch.Tensor) -> int:
        t = n.to(device=device, dtype=torch.int64).reshape(1).clone()
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

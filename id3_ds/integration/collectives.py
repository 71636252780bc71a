"""The cross-rank half of the global top-k: one all-gather of fixed-size candidate lists.

Each rank pads its candidates to exactly k (score -inf) and packs (score, key) as float64 pairs: a fp32
score and an integer key below 2^53 are both exact in float64, so one collective carries both. Every
rank then merges the same gathered tensor with the same total order and gets the same winners.
Bytes per step: world_size * k * 16.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from id3_ds.algorithm.id3 import Reducer
from id3_ds.algorithm.selection import Candidates, merge_candidates

MAX_KEY = 1 << 53


def allgather_reducer(group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> Reducer:
    world = dist.get_world_size(group)

    def reduce(local: Candidates, k: int) -> Candidates:
        packed = torch.full((k, 2), float("-inf"), dtype=torch.float64)
        packed[:, 1] = MAX_KEY
        n = min(len(local), k)
        packed[:n, 0] = local.scores[:n].to(torch.float64)
        packed[:n, 1] = local.keys[:n].to(torch.float64)
        packed = packed.to(device)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=group)
        allc = torch.cat(gathered).cpu()
        parts = [Candidates(allc[:, 0].to(torch.float32), allc[:, 1].to(torch.int64))]
        return merge_candidates(parts, k)

    return reduce

"""Global top-k as a two-stage reduction: local candidates per slice, then one merge, all on the slice's device.

The order is total and the same everywhere: higher score first, then the smaller global key. Every
holder of a slice proposes its own top-k under that order; the global top-k is always contained in the
union of those proposals, so merging them gives the same winners whatever the slicing (one process with
whole tensors, or 512 ZeRO-3 ranks). Scores are computed in fixed-size chunks, so no dense score tensor
for a whole parameter, let alone a model, is ever held.

Why no host reads: on a GPU every `nonzero`, `.item()`, `bool(tensor)` or device-to-host copy stalls the
stream, and a step scores hundreds of chunks. So every shape here is fixed by host-known numbers (k, chunk
lengths, how many entries a slice has chosen) and the tie-break needs no `nonzero`: a score and a rank in
key order are packed into one int64 (`pack`) whose integer order *is* (score desc, key asc), so `torch.topk`
on it returns exactly the (score, key)-ordered top-k whatever it does with equal values (there are none).
A chunk is reduced through its top-k blocks by (block maximum desc, block asc): a block ranked below k
others loses each of its entries to those k maxima, so every winner lies in the k best blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from id3_ds.algorithm.importance import importance, sanitize

CHUNK = 1 << 22  # entries scored at once: 16 MiB of fp32 scores whatever the model size
BLOCK = 512  # block size of the block-maximum prefilter
MIN_BLOCK = 16  # smallest block, for large k
LOW32 = (1 << 32) - 1  # ranks packed below a score must stay under 2^32
NEG_INF = float("-inf")

# score_chunk(lo, hi, out): fill `out` (fp32, length hi - lo) with the scores of local entries [lo, hi) and
# return it. The default is ID3's importance; baselines (id3_ds.methods) plug in their own score here.
ChunkScorer = Callable[[int, int, torch.Tensor], torch.Tensor]


@dataclass
class Candidates:
    """Proposed entries: fp32 scores and int64 global keys, the same length, keys ascending.

    payload: optional per-entry values carried alongside (sparse state streams each candidate's fp32
    gradient with it, so no dense gradient has to survive until the step); cat/take keep it aligned.
    A score of -inf marks padding (a fixed-shape reduction may keep some): it never wins against a real entry.
    """

    scores: torch.Tensor
    keys: torch.Tensor
    payload: torch.Tensor | None = None

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> Candidates:
        return Candidates(
            torch.empty(0, dtype=torch.float32, device=device), torch.empty(0, dtype=torch.int64, device=device)
        )

    def __len__(self) -> int:
        return self.keys.numel()

    def to(self, device: torch.device | str) -> Candidates:
        """The same entries on `device` (scores and keys; the payload stays where it is)."""
        return Candidates(self.scores.to(device), self.keys.to(device), self.payload)

    @staticmethod
    def cat(parts: list[Candidates]) -> Candidates:
        if not parts:
            return Candidates.empty()
        if len(parts) == 1:
            return parts[0]
        payload = None if any(p.payload is None for p in parts) else torch.cat([p.payload for p in parts])
        return Candidates(torch.cat([p.scores for p in parts]), torch.cat([p.keys for p in parts]), payload)

    def take(self, pos: torch.Tensor) -> Candidates:
        """The entries at `pos`, payload included."""
        return Candidates(self.scores[pos], self.keys[pos], None if self.payload is None else self.payload[pos])


def order_bits(scores: torch.Tensor) -> torch.Tensor:
    """int64 whose integer order is the float order of fp32 `scores` (no NaN; -0.0 counts as +0.0)."""
    b = (scores.to(torch.float32) + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0, as == sees them
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFF).to(torch.int64)


def pack(scores: torch.Tensor, ranks: torch.Tensor | None = None) -> torch.Tensor:
    """One int64 per entry ordered as (score desc, rank asc): the largest packed value is the best entry.

    ranks: distinct int64 in [0, 2^32) (a position, or a place in key order), the tie-break; None: the
    entries' own positions 0, 1, 2, ...
    """
    if ranks is None:
        low = torch.arange(LOW32, LOW32 - scores.numel(), -1, dtype=torch.int64, device=scores.device)
    else:
        low = LOW32 - ranks
    return order_bits(scores).mul_(1 << 32).add_(low)


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the top-k of `scores` (no NaN), ties broken by the smaller position; returned ascending."""
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    if k >= n:
        return torch.arange(n, dtype=torch.int64, device=scores.device)
    return torch.sort(torch.topk(pack(scores), k, sorted=False).indices).values


def best_k(c: Candidates, k: int) -> Candidates:
    """The best min(k, len(c)) of `c` by (score desc, key asc), returned in key order, on c's device.

    Fixed shape, no host read: when fewer than k real entries exist, padding (-inf) rows fill the rest.
    """
    n = len(c)
    if n == 0 or k <= 0:
        return c.take(torch.empty(0, dtype=torch.int64, device=c.keys.device))
    by_key = torch.argsort(c.keys)
    if k >= n:
        return c.take(by_key)
    packed = pack(c.scores[by_key])
    return c.take(by_key[torch.sort(torch.topk(packed, k, sorted=False).indices).values])


class CandidatePool:
    """The running top-k of candidates from any number of chunks, slices and ranks, in any arrival order.

    Parts are held until they exceed 4k entries, then reduced to the best k: the set kept never depends on
    the order parts arrive in (the order is total), and the work stays O(total candidates x log).
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.parts: list[Candidates] = []
        self.held = 0

    def add(self, c: Candidates) -> None:
        if len(c) == 0:
            return
        self.parts.append(c)
        self.held += len(c)
        if self.held > 4 * self.k:
            self.parts = [best_k(Candidates.cat(self.parts), self.k)]
            self.held = len(self.parts[0])

    def result(self, device: torch.device | str = "cpu") -> Candidates:
        """The best k so far (key order; padding only if fewer than k real entries were offered)."""
        if not self.parts:
            return Candidates.empty(device)
        return best_k(Candidates.cat(self.parts), self.k)


def slice_candidates(
    grad: torch.Tensor,
    value: torch.Tensor,
    chosen: torch.Tensor,
    first_key: int,
    k: int,
    eps: float,
    exp: float,
    chunk: int = CHUNK,
    score_chunk: ChunkScorer | None = None,
) -> Candidates:
    """Top-k not-yet-chosen entries of one slice, on its device, keys ascending.

    grad, value: 1-D views of the slice; chosen: sorted int64 local positions already in the mask (they
    are never proposed again); first_key: the global key of local position 0. score_chunk replaces the
    ID3 importance (then grad is only used for its length). Returns min(k, unchosen) entries.
    """
    n = value.numel()
    k = min(k, n - chosen.numel())
    device = value.device
    if k <= 0:
        return Candidates.empty(device)
    if min(chunk, n) > LOW32:
        raise ValueError(f"chunk of {chunk} entries: positions inside a chunk must fit 32 bits")
    chosen = chosen.to(device)
    span = -(-min(chunk, n) // BLOCK) * BLOCK
    buf = torch.empty(span + 1, dtype=torch.float32, device=device)  # the last entry: a sentinel, never read
    pool = CandidatePool(k)
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        length = c1 - c0
        out = buf[:length]
        if score_chunk is None:
            score = importance(grad[c0:c1], value[c0:c1], eps, exp, out=out)
        else:
            score = score_chunk(c0, c1, out)
        if score.data_ptr() != out.data_ptr():
            out.copy_(score)
        full = buf[: -(-length // BLOCK) * BLOCK]
        if full.numel() > length:
            full[length:].fill_(NEG_INF)
        if chosen.numel():
            _exclude(buf, chosen, c0, length, whole=n <= chunk)
        pos, scores = chunk_top(full, min(k, length))
        if n <= chunk:  # one chunk: its top-k is the slice's (it holds >= k unchosen entries); key order it
            pos, order = torch.sort(pos)
            return Candidates(scores[order], pos + first_key)
        pool.add(Candidates(scores, pos + (first_key + c0)))
    return pool.result(device)


def _exclude(buf: torch.Tensor, chosen: torch.Tensor, c0: int, length: int, whole: bool) -> None:
    """Score -inf for the chosen entries in this chunk; those of other chunks go to the sentinel slot."""
    if whole:
        idx = chosen
    else:
        idx = chosen - c0
        idx = torch.where((idx >= 0) & (idx < length), idx, buf.numel() - 1)
    buf.index_fill_(0, idx, NEG_INF)


def chunk_top(full: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, scores) of the top-k of a chunk whose length is a multiple of BLOCK, in about one pass.

    NaN scores become NAN_SCORE first (below every real score). On a CPU the chunk is sanitized only when
    a block maximum shows a NaN (reading that flag costs nothing there); on an accelerator always, since a
    data-dependent branch would stall the stream. Blocks shrink (down to MIN_BLOCK) as k grows, so the
    prefilter keeps working for large k; when k is a sizeable share of the blocks, topk runs on the chunk.
    """
    on_host = full.device.type == "cpu"
    if not on_host:
        sanitize(full)
    block = BLOCK
    while block > MIN_BLOCK and full.numel() // block < 8 * k:
        block //= 2
    nb = full.numel() // block
    if 4 * k >= nb:
        if on_host:
            sanitize(full)
        pos = top_positions(full, k)
        return pos, full[pos]
    blocks = full.view(nb, block)
    bmax = blocks.amax(dim=1)
    if on_host and bool(bmax.isnan().any()):
        sanitize(full)
        bmax = blocks.amax(dim=1)
    top_blocks = top_positions(bmax, k)
    pos = (top_blocks.unsqueeze(1) * block + torch.arange(block, device=full.device)).reshape(-1)
    sub = full[pos]
    pick = torch.topk(pack(sub, pos), k, sorted=False).indices  # true positions: blocks may come in any order
    pos = pos[pick]
    return pos, sub[pick]


def merge_candidates(parts: list[Candidates], k: int) -> Candidates:
    """The global top-k of candidate lists from anywhere (slices, ranks), key order, padding (-inf) dropped.

    Dropping padding makes the length data-dependent (one host read): for tests and tools; the step uses
    `best_k`, whose shape is fixed.
    """
    best = best_k(Candidates.cat(parts), k)
    return best.take((best.scores > NEG_INF).nonzero().squeeze(1))

"""Global top-k as a two-stage reduction: local candidates per slice, then one merge.

The order is total and the same everywhere: higher score first, then the smaller global key. Every
holder of a slice proposes its own top-k under that order; the global top-k is always contained in the
union of those proposals, so merging them gives the same winners whatever the slicing (one process with
whole tensors, or 512 ZeRO-3 ranks). Scores are computed in fixed-size chunks, so no dense score tensor
for a whole parameter, let alone a model, is ever held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from id3_ds.algorithm.importance import importance, sanitize

CHUNK = 1 << 22  # entries scored at once: 16 MiB of fp32 scores whatever the model size
BLOCK = 512  # block size of the block-maximum prefilter
MIN_BLOCK = 16  # smallest block, for large k

# score_chunk(lo, hi, out): fill `out` (fp32, length hi - lo) with the scores of local entries [lo, hi) and
# return it. The default is ID3's importance; baselines (id3_ds.methods) plug in their own score here.
ChunkScorer = Callable[[int, int, torch.Tensor], torch.Tensor]


@dataclass
class Candidates:
    """Proposed entries: fp32 scores and int64 global keys, the same length, keys ascending.

    payload: optional per-entry values carried alongside (sparse state streams each candidate's fp32
    gradient with it, so no dense gradient has to survive until the step); cat/_reduce/merge keep it aligned.
    """

    scores: torch.Tensor
    keys: torch.Tensor
    payload: torch.Tensor | None = None

    @staticmethod
    def empty() -> Candidates:
        return Candidates(torch.empty(0, dtype=torch.float32), torch.empty(0, dtype=torch.int64))

    def __len__(self) -> int:
        return self.keys.numel()

    def to(self, device: torch.device | str) -> Candidates:
        """The same entries on `device` (scores and keys; the payload stays where it is)."""
        return Candidates(self.scores.to(device), self.keys.to(device), self.payload)

    @staticmethod
    def cat(parts: list[Candidates]) -> Candidates:
        if not parts:
            return Candidates.empty()
        payload = None if any(p.payload is None for p in parts) else torch.cat([p.payload for p in parts])
        return Candidates(torch.cat([p.scores for p in parts]), torch.cat([p.keys for p in parts]), payload)

    def take(self, pos: torch.Tensor) -> Candidates:
        """The entries at `pos`, payload included."""
        return Candidates(self.scores[pos], self.keys[pos], None if self.payload is None else self.payload[pos])


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the top-k of `scores`, ties broken by the smaller position; returned ascending.

    With positions ordered like global keys this is exactly the (score desc, key asc) order. torch.topk
    finds the k-th score; everything above it is in, and the tied entries are taken lowest-position first
    (`nonzero` returns them in order), so the result never depends on how topk orders equal values.
    """
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    if k >= n:
        return torch.arange(n, dtype=torch.int64, device=scores.device)
    kth = torch.topk(scores, k, largest=True, sorted=False).values.min()
    above = (scores > kth).nonzero().squeeze(1)
    tied = (scores == kth).nonzero().squeeze(1)[: k - above.numel()]
    return torch.sort(torch.cat([above, tied])).values


def _reduce(parts: list[Candidates], k: int) -> Candidates:
    """Top-k of key-ordered parts whose concatenation is still key-ordered."""
    merged = Candidates.cat(parts)
    return merged.take(top_positions(merged.scores, k))


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
    """Top-k not-yet-chosen entries of one slice.

    grad, value: 1-D views of the slice; chosen: sorted int64 local positions already in the mask (they
    are never proposed again); first_key: the global key of local position 0. score_chunk replaces the
    ID3 importance (then grad is only used for its length).

    Scores and the per-chunk top-k stay on the slice's device (a GPU reads its gradient once, in place);
    only the k candidates come back, on the CPU, where masks and the cross-rank merge keep their state.
    """
    n = value.numel()
    k = min(k, n - chosen.numel())
    if k <= 0:
        return Candidates.empty()
    parts: list[Candidates] = []
    held, floor = 0, float("-inf")
    bounds = torch.searchsorted(chosen, torch.arange(0, n + chunk, chunk, dtype=torch.int64).clamp_(max=n))
    device = value.device
    buf = torch.empty(-(-min(chunk, n) // BLOCK) * BLOCK, dtype=torch.float32, device=device)
    for i, c0 in enumerate(range(0, n, chunk)):
        c1 = min(c0 + chunk, n)
        padded = buf[: -(-(c1 - c0) // BLOCK) * BLOCK]
        if score_chunk is None:
            score = importance(grad[c0:c1], value[c0:c1], eps, exp, out=padded[: c1 - c0])
        else:
            out = padded[: c1 - c0]
            score = score_chunk(c0, c1, out)
            if score.data_ptr() != out.data_ptr():
                score = out.copy_(score)
        padded[c1 - c0 :] = float("-inf")
        inside = chosen[bounds[i] : bounds[i + 1]]
        if inside.numel():
            score[(inside - c0).to(device)] = float("-inf")
        pos = chunk_top_positions(padded, min(k, (c1 - c0) - inside.numel()), floor)
        parts.append(Candidates(padded[pos], pos + (first_key + c0)))
        held += pos.numel()
        if held > k:  # keep the best k so far: its k-th score is the floor later chunks must beat
            best = _reduce(parts, k)
            parts, held, floor = [best], len(best), float(best.scores.min())
    return _reduce(parts, k).to("cpu")


def chunk_top_positions(score: torch.Tensor, k: int, floor: float = float("-inf")) -> torch.Tensor:
    """top_positions of a chunk whose length is a multiple of BLOCK, in about one pass over it.

    A block-maximum prefilter: the k-th largest block maximum tau is a lower bound of the chunk's k-th
    largest score, so every winner lies in a block whose maximum is > tau, or == tau (of those, the k
    lowest blocks suffice: each holds an entry scoring tau, and ties go to the lower position). Exact
    top_positions then runs on those few blocks. Blocks shrink (down to MIN_BLOCK) as k grows, so the
    prefilter keeps working for large k. `floor` is the k-th best score the caller already holds from
    lower keys: only blocks whose maximum beats it can contribute (an equal score loses the key tie).
    """
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=score.device)
    block = BLOCK
    while block > MIN_BLOCK and score.numel() // block < 8 * k:
        block //= 2
    blocks = score.view(-1, block)
    bmax = blocks.amax(dim=1)
    if bool(bmax.isnan().any()):  # NaN propagates through amax: sanitize only such chunks
        sanitize(score)
        bmax = blocks.amax(dim=1)
    alive = None
    if floor > float("-inf"):
        alive = (bmax > floor).nonzero().squeeze(1)
        if alive.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=score.device)
        bmax = bmax[alive]
    if bmax.numel() <= k or 4 * k >= blocks.shape[0]:
        if alive is None:
            return top_positions(score, k)
        keep = alive
    else:
        tau = torch.topk(bmax, k, sorted=False).values.min()
        keep = torch.cat([(bmax > tau).nonzero().squeeze(1), (bmax == tau).nonzero().squeeze(1)[:k]])
        keep = torch.sort(keep if alive is None else alive[keep]).values
    offsets = (keep * block).unsqueeze(1) + torch.arange(block, device=score.device)
    sub = top_positions(blocks[keep].reshape(-1), k)
    return offsets.reshape(-1)[sub]


def merge_candidates(parts: list[Candidates], k: int) -> Candidates:
    """The global top-k of candidate lists from anywhere (slices, ranks), in (score desc, key asc) order.

    Padding (score -inf) is dropped first, so ranks may pad to a fixed length for an all-gather.
    """
    merged = Candidates.cat(parts)
    real = merged.take((merged.scores > float("-inf")).nonzero().squeeze(1))
    ordered = real.take(torch.argsort(real.keys))
    return ordered.take(top_positions(ordered.scores, k))

"""Per-chunk scores of the static baselines, in the `Scorer` form the mask core takes.

A scorer fills `out` with the scores of local entries [lo, hi) of one slice; higher is chosen first and
ties go to the smaller global key, so each method picks the same entries on one process or 512 ZeRO ranks.
"""

from __future__ import annotations

import torch

from id3_ds.algorithm.slices import ParamSlice, SliceAccess

_M64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores (same bits)."""
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash_scores(keys: torch.Tensor, seed: int) -> torch.Tensor:
    """A uniform fp32 score in [0, 1) per int64 global key: SplitMix64 of (key, seed), top 24 bits.

    A pure function of the global key, so the random mask does not depend on the slicing or world size.
    """
    x = keys.to(torch.int64) + _i64(0x9E3779B97F4A7C15 * (seed + 1))
    x = (x ^ _shr(x, 30)) * _i64(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _i64(0x94D049BB133111EB)
    x = x ^ _shr(x, 31)
    return _shr(x, 40).to(torch.float32) / float(1 << 24)


def random_scorer(seed: int):
    def score(info: ParamSlice, access: SliceAccess, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        keys = torch.arange(info.first_key + lo, info.first_key + hi, dtype=torch.int64)
        return out.copy_(hash_scores(keys, seed))

    return score


def pafi_scorer(info: ParamSlice, access: SliceAccess, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
    """-|theta|: the smallest-magnitude weights first. Read at step 0, so theta is the pretrained value."""
    return out.copy_(access.value()[lo:hi]).abs_().neg_()


class FisherScorer:
    """Empirical Fisher: the sum over N sample batches of each entry's squared (reduced) gradient.

    `accumulate(held)` is called once per sample batch after backward, on whatever slices this process
    holds (whole tensors or ZeRO partitions), so the memory is one fp32 value per held selectable entry,
    and only until the mask is chosen at step 0 (`release`).
    """

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.batches = 0

    def accumulate(self, held) -> None:
        for h in held:
            if h.info.fully_trainable:
                continue
            g = h.access.grad()
            if g is None:
                continue
            key = (h.info.name, h.info.start)
            if key not in self.sums:
                self.sums[key] = torch.zeros(h.info.numel, dtype=torch.float32, device=g.device)
            self.sums[key].addcmul_(g.float(), g.float())
        self.batches += 1

    def __call__(self, info: ParamSlice, access: SliceAccess, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        s = self.sums.get((info.name, info.start))
        if s is None:  # the loss never reached this tensor
            return out.zero_()
        return out.copy_(s[lo:hi])

    def release(self) -> None:
        self.sums.clear()


def bitfit_keep(name: str, shape: tuple[int, ...]) -> bool:
    """BitFit's selectable set: 1-D tensors, i.e. biases and norm weights (embeddings and matrices are 2-D)."""
    return len(shape) == 1

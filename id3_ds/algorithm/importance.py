"""The ID3 importance score H = |g| / (|theta| + eps) ** exp, element-wise, in fp32."""

from __future__ import annotations

import torch

NAN_SCORE = -1.0  # below every real score (>= 0): a NaN gradient's entry is chosen only when nothing else is left


def importance(
    grad: torch.Tensor, value: torch.Tensor, eps: float, exp: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Score every entry of a 1-D slice into `out` (or a fresh fp32 tensor), which the caller may overwrite.

    NaN is left in place: `selection` replaces it by NAN_SCORE (on a CPU only in the rare chunk whose block
    maxima show one, since reading that flag is free there; on an accelerator always, without a host read).
    """
    score = torch.abs(grad, out=out) if out is not None and grad.dtype == torch.float32 else None
    if score is None:
        score = grad.abs().to(torch.float32)
        if out is not None:
            out.copy_(score)
            score = out
    if exp != 0:
        denom = value.abs().to(torch.float32).add_(eps)
        if exp != 1:
            denom.pow_(exp)
        score.div_(denom)
    return score


def sanitize(score: torch.Tensor) -> torch.Tensor:
    """NaN -> NAN_SCORE in place, so the ordering never depends on how topk treats NaN."""
    return score.nan_to_num_(nan=NAN_SCORE, posinf=float("inf"), neginf=float("-inf"))

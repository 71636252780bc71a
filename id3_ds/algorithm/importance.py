"""The ID3 importance score H = |g| / (|theta| + eps) ** exp, element-wise, in fp32."""

from __future__ import annotations

import torch


def importance(grad: torch.Tensor, value: torch.Tensor, eps: float, exp: float) -> torch.Tensor:
    """Score every entry of a 1-D slice; returns a fresh fp32 tensor the caller may overwrite.

    NaN scores (from a NaN gradient) become -1: below every real score (>= 0) so they are chosen only
    when nothing else is left, and never make the ordering depend on how topk treats NaN.
    """
    score = grad.abs().to(torch.float32)
    if exp != 0:
        denom = value.abs().to(torch.float32).add_(eps)
        if exp != 1:
            denom.pow_(exp)
        score.div_(denom)
    return score.nan_to_num_(nan=-1.0, posinf=float("inf"), neginf=-1.0)

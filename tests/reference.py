"""A brute-force ID3 selection: dense scores over every entry, a full sort. Slow and obviously right."""

from __future__ import annotations

import numpy as np
import torch


def reference_winners(
    grads: list[torch.Tensor], values: list[torch.Tensor], chosen: set[int], k: int, eps: float, exp: float
) -> list[int]:
    """Global keys of the k best unchosen entries, by (score desc, key asc), keys in model order."""
    g = torch.cat([t.reshape(-1) for t in grads]).double().numpy()
    v = torch.cat([t.reshape(-1) for t in values]).double().numpy()
    score = np.abs(g) / (np.abs(v) + eps) ** exp
    score = score.astype(np.float32)  # the implementation ranks fp32 scores
    score = np.where(np.isnan(score), -1.0, score)
    keys = np.arange(score.size)
    free = np.array([i not in chosen for i in keys])
    order = np.lexsort((keys[free], -score[free]))
    return sorted(keys[free][order][:k].tolist())

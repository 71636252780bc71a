"""ID3 score variants: transformations of H = |g| / (|theta| + eps)^exp, plugged in through the scorer hook.

The paper's score (`id3.grad_ema = 0`, `id3.score_norm = "none"`, the defaults) never comes here: ID3 then runs
with no scorer and chooses exactly what the authors' toolkit chooses. The variants exist because one
mini-batch's top-k is noisy and the plain score piles the budget into a few tensors (docs/quality-diagnosis.md):

- grad_ema = beta in (0, 1): score from an exponential moving average of the gradient over steps,
  a_t = beta a_(t-1) + (1 - beta) g_t, instead of this step's g_t alone (SpIEL regrows from accumulated
  gradients). Element-wise, so every slicing (one process, ZeRO partitions) chooses the same entries. Costs
  one fp32 value per selectable entry, held until the budget is reached.
- score_norm = "tensor": each tensor's scores divided by their mean over the tensor at this step, so
  the global top-k compares entries against their own tensor and no tensor wins by scale alone: a tensor
  whose scores are spread like every other's receives about its share of B by size. It needs each tensor
  whole on one process (one process, or ZeRO stage 0), where the mean is the tensor's own.
"""

from __future__ import annotations

import torch

from id3_ds.algorithm.config import ID3Config
from id3_ds.algorithm.importance import importance
from id3_ds.algorithm.slices import ParamSlice, SliceAccess
from id3_ds.errors import ID3Error


def is_paper_score(config: ID3Config) -> bool:
    """True when the config asks for the paper's score exactly (then ID3 runs without a scorer)."""
    return config.grad_ema == 0 and config.score_norm == "none"


class VariantScorer:
    """The per-chunk scorer of an ID3 variant: scorer(info, access, lo, hi, out) -> out.

    Called once per chunk of every held slice each step that unmasks entries (the mask core's contract), so
    the moving average advances exactly once per such step.
    """

    def __init__(self, config: ID3Config) -> None:
        self.eps, self.exp = config.eps, config.exp
        self.beta = config.grad_ema
        self.norm = config.score_norm
        self.ema: dict[tuple[str, int], torch.Tensor] = {}
        self.scale: dict[tuple[str, int], float] = {}

    def _grad(self, access: SliceAccess, value: torch.Tensor) -> torch.Tensor:
        g = access.grad()
        return torch.zeros_like(value) if g is None else g

    def _averaged(self, key: tuple[str, int], g: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The moving average of entries [lo, hi), advanced by this step's gradient."""
        buf = self.ema.get(key)
        if buf is None:
            buf = self.ema[key] = torch.zeros(g.numel(), dtype=torch.float32, device=g.device)
        part = buf[lo:hi]
        part.mul_(self.beta).add_(g[lo:hi].to(torch.float32), alpha=1.0 - self.beta)
        return part

    def __call__(self, info: ParamSlice, access: SliceAccess, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        key = (info.name, info.start)
        value = access.value()
        g = self._grad(access, value)
        if self.norm == "tensor" and lo == 0:  # once per slice and step, before its first chunk
            if info.numel != info.param_numel:
                raise ID3Error(
                    f"id3.score_norm='tensor' needs each tensor whole on one process, but {info.name} is split "
                    "across ranks (ZeRO stage 1-3): use one process or ZeRO stage 0, or id3.score_norm='none'"
                )
            if self.beta:  # advance the whole slice now; the chunks below read it without advancing again
                full = self._averaged(key, g, 0, g.numel())
            else:
                full = g
            mean = float(importance(full, value, self.eps, self.exp).nan_to_num_(nan=0.0).mean())
            self.scale[key] = mean if mean > 0 else 1.0
        if self.beta:
            src = self.ema[key][lo:hi] if self.norm == "tensor" else self._averaged(key, g, lo, hi)
        else:
            src = g[lo:hi]
        score = importance(src, value[lo:hi], self.eps, self.exp, out=out)
        if self.norm == "tensor":
            score.div_(self.scale[key])
        return score


def variant_scorer(config: ID3Config) -> VariantScorer | None:
    """The scorer for the config's ID3 variant, or None for the paper's score (the mask core's own)."""
    return None if is_paper_score(config) else VariantScorer(config)

"""ID3's AdamW semantics, one definition for both state modes (dense hooks in id3.py, sparse_state.py).

Decoupled weight decay touches chosen entries only, before the Adam step (applied by the optimizer itself
it would shrink unchosen entries too). Bias correction is either `shared` (the optimizer's global step t,
the paper's default) or `per_entry`: each entry's Adam step as if its own Adam had started when it was
chosen, n = t - joined steps ago. That is the shared-count step times
(1 - b1^t) / (1 - b1^n) * sqrt((1 - b2^n) / (1 - b2^t)), exact up to Adam's eps term, which is how dense
mode rescales torch's own AdamW step and how sparse mode scales its own.
"""

from __future__ import annotations

import torch


def decay_factor(lr: float, weight_decay: float) -> float:
    """What a chosen entry is multiplied by before the Adam step (decoupled weight decay)."""
    return 1.0 - lr * weight_decay


def ratio_table(step: int, betas: tuple[float, float], device: torch.device | str) -> torch.Tensor:
    """The per-entry rescaling for every age n = 0..step (entry n), fp64: computed once per step, so each
    slice only gathers from it (a few kernels per slice instead of a dozen). Entry 0 is never used: an entry
    chosen at step s is first updated at step s + 1."""
    b1, b2 = betas
    n = torch.arange(step + 1, dtype=torch.float64, device=device)
    return (1 - b1**step) / (1 - torch.pow(b1, n)) * torch.sqrt((1 - torch.pow(b2, n)) / (1 - b2**step))


def per_entry_ratio(
    step: int, joined: torch.Tensor, betas: tuple[float, float], table: torch.Tensor | None = None
) -> torch.Tensor:
    """The per-entry bias-correction rescaling of the shared-count Adam step, fp64, on `joined`'s device.

    step: optimizer steps counted including this one (t >= 1); joined: each entry's join step (0-based);
    table: this step's `ratio_table` (computed here if not given).
    """
    if table is None:
        table = ratio_table(step, betas, joined.device)
    return table.to(joined.device)[(step - joined).long()]

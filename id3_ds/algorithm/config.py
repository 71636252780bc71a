"""ID3 settings shared by the plain-torch path, the DeepSpeed hook and the run config's `id3` section.

A stdlib dataclass, so this package stays free of DeepSpeed and pydantic: the run config validates it
as its `id3` section (strict JSON types, unknown keys refused), and `__post_init__` checks the values for
both callers, plain-torch users included.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from id3_ds.errors import ID3Error

BiasCorrection = Literal["shared", "per_entry"]
BIAS_CORRECTIONS = typing.get_args(BiasCorrection)
StateMode = Literal["dense", "sparse"]
STATE_MODES = typing.get_args(StateMode)
ScoreNorm = Literal["none", "tensor"]
SCORE_NORMS = typing.get_args(ScoreNorm)


def budget_count_refused(budget: int) -> ID3Error:
    """A count budget below one entry (the config refuses it at load; resolve_budget for direct callers)."""
    return ID3Error(
        f"id3.budget={budget}: give a count of entries >= 1 (e.g. id3.budget=100000) or a fraction in (0, 1) "
        "(e.g. id3.budget=0.001)"
    )


@dataclass(frozen=True)
class ID3Config:
    """What to select and how.

    budget: total scalar entries B that may ever move, an int count or a float fraction in (0, 1) of the
        selectable entries. Fully trainable parameters are charged to it.
    eps, exp: the importance H = |g| / (|theta| + eps) ** exp. exp may be 0 (gradient magnitude) or
        negative; eps must be > 0 so that H is finite for theta == 0.
    targets: glob patterns of parameter names that are selectable (default: every trainable parameter).
    fully_trainable: glob patterns of parameters updated densely from step 0 (e.g. a fresh head).
    bias_correction: "shared" keeps the optimizer's own step counter (paper-faithful: an entry chosen
        late takes a first step of about 3x lr with Adam's defaults); "per_entry" rescales each entry's
        Adam update as if its bias correction counted from the step it was chosen.
    no_decay: glob patterns (case-insensitive) of parameters that get no weight decay, on top of the
        rule that tensors with fewer than 2 dimensions (biases, norm scales) never do (see decay.py).
    unmask_steps: the optimizer steps T over which ID3 unmasks the budget (the reference code's
        `max_steps`); None: the whole run. A shorter T trains the chosen entries for more steps: the mask is
        complete after T and fixed for the rest of the run. At most the run's steps.
    fish_batches: sample batches for the Fisher estimate of method fish, taken before step 0.
    state: where the optimizer state of the trainable weights lives. "dense" (default): DeepSpeed's
        optimizer holds an fp32 master and both Adam moments for every selectable weight, so memory is
        that of full fine-tuning. "sparse": the selectable weights stay in the model's dtype and only the
        chosen entries carry an fp32 master, both moments and the join step (28 B per chosen entry with
        the mask, see sparse_state.py); ZeRO-3 or stage 0 only (preflight refuses the rest).
    grad_ema: a variant's score (0, the default, is the paper's): the importance is computed from an
        exponential moving average of the gradient over steps, beta in (0, 1), instead of this step's
        gradient alone (id3_ds/algorithm/variants.py; one more fp32 value per selectable entry).
    score_norm: a variant's score: "tensor" divides each tensor's scores by their mean over the tensor, so
        no tensor wins the global top-k by scale alone; "none" (default) is the paper's. Whole tensors per
        process only (one process or ZeRO stage 0).
    """

    budget: int | float = 0.001
    eps: float = 1e-3
    exp: float = 1.0
    targets: tuple[str, ...] = ("*",)
    fully_trainable: tuple[str, ...] = ()
    bias_correction: BiasCorrection = "shared"
    no_decay: tuple[str, ...] = ()
    unmask_steps: int | None = None
    fish_batches: int = 8
    state: StateMode = "dense"
    grad_ema: float = 0.0
    score_norm: ScoreNorm = "none"

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise ID3Error(f"id3.budget must be an integer count or a fraction in (0, 1), got {self.budget!r}")
        if isinstance(self.budget, float) and not 0.0 < self.budget < 1.0:
            raise ID3Error(
                f"id3.budget={self.budget} is a float outside (0, 1): give a fraction like 0.001 "
                "or an integer count of entries"
            )
        if isinstance(self.budget, int) and self.budget < 1:
            raise budget_count_refused(self.budget)
        if not self.eps > 0:
            raise ID3Error(f"id3.eps must be > 0 (got {self.eps}); it keeps |g|/(|theta|+eps)^exp finite")
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise ID3Error(f"id3.bias_correction must be one of {BIAS_CORRECTIONS}, got {self.bias_correction!r}")
        if self.state not in STATE_MODES:
            raise ID3Error(f"id3.state must be one of {STATE_MODES}, got {self.state!r}")
        if self.unmask_steps is not None and (isinstance(self.unmask_steps, bool) or self.unmask_steps < 1):
            raise ID3Error(
                f"id3.unmask_steps must be a step count >= 1 (or null: the whole run), got {self.unmask_steps!r}"
            )
        if isinstance(self.grad_ema, bool) or not 0.0 <= self.grad_ema < 1.0:
            raise ID3Error(
                f"id3.grad_ema must be in [0, 1) (0: this step's gradient, the paper's), got {self.grad_ema!r}"
            )
        if self.score_norm not in SCORE_NORMS:
            raise ID3Error(f"id3.score_norm must be one of {SCORE_NORMS}, got {self.score_norm!r}")
        if self.state == "sparse" and (self.grad_ema or self.score_norm != "none"):
            raise ID3Error(
                "id3.grad_ema and id3.score_norm are not supported with id3.state=sparse (the score variants read "
                "whole gradients); use id3.state=dense or remove them"
            )
        if self.fish_batches < 1:
            raise ID3Error("id3.fish_batches must be >= 1 (sample batches for the Fisher estimate)")

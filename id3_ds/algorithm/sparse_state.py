"""Sparse optimizer state (`id3.state: sparse`): Adam for the chosen entries only.

Why: in dense mode every selectable weight carries an fp32 master and both Adam moments (16 B per entry
with the gradient) although at most B of them ever move, so ID3 costs what full fine-tuning costs. In
sparse mode the selectable weights stay frozen in the model's dtype and only the chosen entries carry state.

What one holder (a whole model in one process; later one ZeRO-3 rank's partition) stores per slice, for
its chosen entries only, aligned with the slice's `SliceMask.positions` (sorted; a growing mask is merged
in, keeping alignment):

    SliceMask (shared with dense mode)   position int64 8 B, join step int32 4 B, base fp32 4 B   = 16 B
    SparseSlice (this module)            fp32 master 4 B, exp_avg 4 B, exp_avg_sq 4 B               = 12 B

28 B per chosen entry, nothing per unchosen entry (no master, no moments, no persistent gradient). The
join step is the mask's `chosen_at`, not stored twice. The gradient of a selectable parameter is transient:
autograd writes the dense `.grad`, the step gathers the chosen entries from it, the driver drops it.

The update (`adamw_update`) is torch.optim.AdamW's on the gathered entries, with ID3's semantics:
decoupled weight decay on chosen entries only (the slice's own rate), and bias correction either
`shared` (the optimizer's global step t, paper default) or `per_entry`, mirroring `ID3.attach`
exactly: the shared-count step rescaled by (1 - b1^t) / (1 - b1^n) * sqrt((1 - b2^n) / (1 - b2^t)) with
n = t - join, so both state modes train the same model (per_entry is Adam from the join step up to
Adam's eps term, which the rescaling multiplies by sqrt((1 - b2^t) / (1 - b2^n))). The master is then
rounded into the frozen weight in place, so the model always holds master.to(dtype) at chosen entries
and the bit-identical base elsewhere.

Clipping sees the masked gradient: the norm over chosen entries plus fully trainable parameters
(`sq_norm` per holder, summed over holders, then `clip_coef`), exactly as dense mode's mask_grads +
clip_grad_norm_.

All of it lives on the weight's device, and every shape is known on the host, so a GPU step never waits
on the host for it (docs/gpu-step.md).

Where it runs: `algorithm/sparse.py` (`SparseID3`) is the step over any holder's slices; under DeepSpeed
(`update/sparse.py`) a post-accumulate-grad hook on each trainable parameter averages its
transient gradient over ranks into the rank's ZeRO-3 partition (reduce-scatter; all-reduce at stage 0);
during a step's last micro-batch it streams that share into the step's candidates and kept gradient
values (`streaming.py`), earlier micro-batches add it to an fp32 buffer; the norm's squares are
all-reduced over ranks (disjoint entries); the masters are written into the rank's own partition, and no
ZeRO-3 parameter is kept persistently gathered (the next forward re-gathers the new values).
Checkpoints: each rank saves `MaskState.from_slices(..., adam=...)` of its partition (global flat
coordinates, O(B)); `MaskState.union` + `slice_mask`/`slice_adam` re-slice onto any world size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from id3_ds.algorithm.adam import decay_factor, per_entry_ratio
from id3_ds.algorithm.mask import SliceMask
from id3_ds.errors import ID3Error

BYTES_PER_ENTRY = 12  # fp32 master + exp_avg + exp_avg_sq; the mask adds its own 16 B
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coef = max_norm / (norm + 1e-6)


def _empty() -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32)


@dataclass(frozen=True)
class AdamWHyper:
    """The optimizer settings one sparse step uses (weight decay is per slice, see decay.py)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    bias_correction: str = "shared"  # "shared" or "per_entry" (ID3Config.bias_correction)


@dataclass
class SparseSlice:
    """Adam state of one slice's chosen entries, aligned with the `SliceMask.positions` last aligned to."""

    positions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    master: torch.Tensor = field(default_factory=_empty)
    exp_avg: torch.Tensor = field(default_factory=_empty)
    exp_avg_sq: torch.Tensor = field(default_factory=_empty)

    def __len__(self) -> int:
        return self.master.numel()

    @property
    def nbytes(self) -> int:
        """Bytes this state holds (the positions are the mask's own tensor, not a copy)."""
        return sum(t.numel() * t.element_size() for t in (self.master, self.exp_avg, self.exp_avg_sq))

    def align(self, mask: SliceMask, weight: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        """Follow the mask's growth: keep old entries' state, start new ones at master = weight, m = v = 0.

        Masks only grow (SliceMask.add merges sorted positions), so the old positions are a subset of the
        new ones and `searchsorted` finds where each old entry moved: O(chosen), no re-sort, on the weight's
        device with host-known shapes (a shrunk mask, the one misuse visible from sizes, is refused). weight
        may be a callable (a slice access's `value`), called only when the mask grew: a quantized base
        dequantizes to answer it.
        """
        new = mask.positions
        if new is self.positions:
            return
        if callable(weight):
            weight = weight()
        old = self.positions
        if old.numel() > new.numel():
            raise ID3Error("the mask lost chosen entries the sparse state holds: restore both from one checkpoint")
        device = new.device
        old_at = torch.searchsorted(new, old.to(device))
        master = weight[new.to(weight.device)].to(device, torch.float32)  # fresh entries start at the weight
        self.master = master.index_copy_(0, old_at, self.master.to(device))
        self.exp_avg = self._moved(self.exp_avg, old_at, new.numel())
        self.exp_avg_sq = self._moved(self.exp_avg_sq, old_at, new.numel())
        self.positions = new

    @staticmethod
    def _moved(t: torch.Tensor, old_at: torch.Tensor, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float32, device=old_at.device).index_copy_(0, old_at, t.to(old_at.device))

    def gather(self, grad: torch.Tensor | None) -> torch.Tensor:
        """The chosen entries of a slice's dense (transient) gradient, fp32; zeros if the loss missed it."""
        if grad is None:
            return torch.zeros(len(self), dtype=torch.float32, device=self.master.device)
        return grad[self.positions.to(grad.device)].to(torch.float32)

    def write_back(self, access) -> None:
        """Round the master into the frozen weight through its slice access (`write`: in place for a plain
        weight or partition, the overlay of a quantized base); every other entry is untouched."""
        access.write(self.positions, self.master)


def sq_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squares (fp32, on the gradients' device) of this holder's masked gradient pieces; sum over
    holders (a device all-reduce), then sqrt."""
    squares = [torch.linalg.vector_norm(g.to(torch.float32)) ** 2 for g in grads if g.numel()]
    if not squares:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack(squares).sum() if len(squares) > 1 else squares[0]


def clip_coef(total_norm: torch.Tensor | float, max_norm: float | None) -> torch.Tensor | float:
    """The factor clip_grad_norm_ multiplies every gradient by: min(1, max_norm / (norm + 1e-6)), computed as
    clip_grad_norm_ does (fp32, on the norm's device, no host read); 1.0 without clipping."""
    if max_norm is None or max_norm <= 0:
        return 1.0
    norm = torch.as_tensor(total_norm, dtype=torch.float32)
    return (max_norm / (norm + CLIP_EPS)).clamp_(max=1.0)


def adamw_update(
    state: SparseSlice,
    grad: torch.Tensor,
    joined: torch.Tensor,
    step: int,
    hyper: AdamWHyper,
    weight_decay: float = 0.0,
    ratios: torch.Tensor | None = None,
) -> None:
    """One AdamW step on the chosen entries' fp32 master, in place, on their device.

    grad: the chosen entries' (clipped) gradient, fp32, aligned with the state; joined: each entry's join
    step (SliceMask.chosen_at, 0-based); step: optimizer steps counted including this one (t >= 1);
    ratios: this step's adam.ratio_table for per_entry bias correction (computed here if not given).
    """
    if len(state) == 0:
        return
    lr, (b1, b2), eps = hyper.lr, hyper.betas, hyper.eps
    if weight_decay:
        state.master.mul_(decay_factor(lr, weight_decay))  # decoupled, before the Adam step (as ID3.attach does)
    state.exp_avg.lerp_(grad, 1.0 - b1)
    state.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
    step_size = lr / (1.0 - b1**step)
    denom = (state.exp_avg_sq.sqrt() / math.sqrt(1.0 - b2**step)).add_(eps)
    if hyper.bias_correction == "shared":
        state.master.addcdiv_(state.exp_avg, denom, value=-step_size)
        return
    update = (state.exp_avg / denom).mul_(-step_size)
    state.master.add_(update * per_entry_ratio(step, joined, hyper.betas, ratios).to(torch.float32))

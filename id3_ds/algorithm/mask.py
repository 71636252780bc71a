"""Mask state: which entries are chosen, in a slice-local form for the hot path and a global form to save.

Memory: a slice keeps only its chosen entries, 16 bytes each (int64 position, int32 step chosen, fp32
base value): nothing per unchosen entry, so state grows with B, never with the model (well under the one
bit per selectable entry a bitmap would cost once B is below 1/128 of the entries; the typical ID3 budget
is 0.01-1 %). The base value is the entry's weight when chosen; since unchosen entries never move, it is
the pretrained weight, which makes a sparse delta computable from this state alone. A `SliceMask` lives
on its weight's device (a GPU masks and grows it without waiting on the host); `MaskState` is the host copy.

The global form (`MaskState`) keys every chosen entry by parameter name and flat row-major index, so a
checkpoint written by N ranks re-slices onto M ranks (its file: id3_ds/checkpoint/mask_file.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from id3_ds.algorithm.slices import ParamSlice
from id3_ds.errors import ID3Error

OPTIONAL_FIELDS = ("value", "exp_avg", "exp_avg_sq")  # per-chosen-entry fp32 tensors a state may carry


def _cat_optional(parts: list[torch.Tensor | None], order: torch.Tensor | None = None) -> torch.Tensor | None:
    """Concatenate a field every shard carries (reordered by `order`), or None if any shard lacks it."""
    if any(p is None for p in parts):
        return None
    out = torch.cat(parts)  # type: ignore[arg-type]
    return out if order is None else out[order]


@dataclass
class SliceMask:
    """Chosen entries of one slice: sorted local positions, the step each was chosen, its base value."""

    positions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    chosen_at: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int32))
    base: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float32))

    def __len__(self) -> int:
        return self.positions.numel()

    def add(self, positions: torch.Tensor, step: int, value: torch.Tensor) -> None:
        """Insert new (not yet chosen) sorted positions, recording `step` and their current values.

        A sorted merge by binary search on the weight's device: O(chosen) per call instead of a full re-sort,
        and every size is known on the host, so nothing waits for the device.
        """
        if positions.numel() == 0:
            return
        device = value.device
        old, new = self.positions.to(device), positions.to(device)
        total = old.numel() + new.numel()
        new_at = torch.searchsorted(old, new) + torch.arange(new.numel(), device=device)
        old_at = torch.arange(old.numel(), device=device) + torch.searchsorted(new, old)
        merged_pos = torch.empty(total, dtype=torch.int64, device=device)
        merged_step = torch.empty(total, dtype=torch.int32, device=device)
        merged_base = torch.empty(total, dtype=torch.float32, device=device)
        merged_pos.index_copy_(0, old_at, old).index_copy_(0, new_at, new)
        merged_step.index_copy_(0, old_at, self.chosen_at.to(device)).index_fill_(0, new_at, step)
        merged_base.index_copy_(0, old_at, self.base.to(device)).index_copy_(0, new_at, value[new].to(torch.float32))
        self.positions, self.chosen_at, self.base = merged_pos, merged_step, merged_base

    def to(self, device: torch.device | str) -> SliceMask:
        """The same mask with its tensors on `device` (where the slice's weight lives)."""
        return SliceMask(self.positions.to(device), self.chosen_at.to(device), self.base.to(device))

    def zero_unchosen(self, grad: torch.Tensor) -> None:
        """Zero every gradient entry outside the mask, in place (one pass plus a gather/scatter)."""
        n = self.positions.numel()
        if n == grad.numel():
            return
        if n == 0:
            grad.zero_()
            return
        pos = self.positions.to(grad.device)
        kept = grad[pos]
        grad.zero_()
        grad.index_copy_(0, pos, kept)


@dataclass
class ParamMask:
    """Chosen entries of one whole parameter, in global flat row-major coordinates (sorted, unique)."""

    shape: tuple[int, ...]
    indices: torch.Tensor
    chosen_at: torch.Tensor
    base: torch.Tensor
    value: torch.Tensor | None = None  # current fp32 values of the chosen entries (checkpoints carry it)
    # sparse-state checkpoints (id3.state: sparse) also carry Adam's moments of the chosen entries, fp32
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class MaskState:
    """The chosen entries of a model (or of one rank's share of it) by parameter name."""

    def __init__(self, params: dict[str, ParamMask] | None = None) -> None:
        self.params: dict[str, ParamMask] = dict(params or {})

    def __len__(self) -> int:
        return sum(p.indices.numel() for p in self.params.values())

    @staticmethod
    def from_slices(
        items: list[tuple[ParamSlice, SliceMask]],
        values: list[torch.Tensor] | None = None,
        adam: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    ) -> MaskState:
        """Global form of slice-local masks (one rank's, or all slices of one process).

        values, if given, holds each slice's current 1-D weights: the chosen entries' values are kept.
        adam, if given, holds per slice (value, exp_avg, exp_avg_sq) of its chosen entries, aligned with the
        mask's positions (the sparse optimizer state); its value replaces `values`.
        """
        by_name: dict[str, list[tuple[ParamSlice, SliceMask, tuple[torch.Tensor | None, ...]]]] = {}
        for i, (sl, m) in enumerate(items):
            m = m.to("cpu")  # checkpoints live on the host: save time is the one place that reads the device
            if adam is not None:
                extra: tuple[torch.Tensor | None, ...] = tuple(t.to("cpu", torch.float32) for t in adam[i])
            else:
                pos = m.positions.to(values[i].device) if values is not None else None
                extra = (None if values is None else values[i][pos].to("cpu", torch.float32), None, None)
            by_name.setdefault(sl.name, []).append((sl, m, extra))
        params = {}
        for name, parts in by_name.items():
            parts.sort(key=lambda sme: sme[0].start)
            cols = [_cat_optional([e[j] for _, _, e in parts]) for j in range(3)]
            params[name] = ParamMask(
                shape=parts[0][0].shape,
                indices=torch.cat([m.positions + sl.start for sl, m, _ in parts]),
                chosen_at=torch.cat([m.chosen_at for _, m, _ in parts]),
                base=torch.cat([m.base for _, m, _ in parts]),
                value=cols[0],
                exp_avg=cols[1],
                exp_avg_sq=cols[2],
            )
        return MaskState(params)

    @staticmethod
    def union(states: list[MaskState]) -> MaskState:
        """Join disjoint shards (e.g. every rank's file) into one state; overlap means corruption."""
        names: dict[str, list[ParamMask]] = {}
        for st in states:
            for name, pm in st.params.items():
                names.setdefault(name, []).append(pm)
        params = {}
        for name, parts in names.items():
            if any(p.shape != parts[0].shape for p in parts):
                raise ID3Error(f"mask shards disagree on the shape of {name}: the checkpoint is inconsistent")
            idx = torch.cat([p.indices for p in parts])
            order = torch.argsort(idx)
            idx = idx[order]
            if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
                raise ID3Error(f"mask shards overlap on {name}: the checkpoint mixes two runs")
            params[name] = ParamMask(
                shape=parts[0].shape,
                indices=idx,
                chosen_at=torch.cat([p.chosen_at for p in parts])[order],
                base=torch.cat([p.base for p in parts])[order],
                **{f: _cat_optional([getattr(p, f) for p in parts], order) for f in OPTIONAL_FIELDS},
            )
        return MaskState(params)

    def slice_mask(self, sl: ParamSlice) -> SliceMask:
        """The part of this state inside `sl`, in the slice's local positions (re-slicing)."""
        pm = self.params.get(sl.name)
        if pm is None:
            return SliceMask()
        if pm.shape != sl.shape:
            raise ID3Error(
                f"mask for {sl.name} has shape {list(pm.shape)} but the model has {list(sl.shape)}: "
                "resume with the model the checkpoint was trained from"
            )
        lo, hi = torch.searchsorted(pm.indices, torch.tensor([sl.start, sl.start + sl.numel])).tolist()
        return SliceMask(pm.indices[lo:hi] - sl.start, pm.chosen_at[lo:hi].clone(), pm.base[lo:hi].clone())

    def slice_adam(self, sl: ParamSlice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(value, exp_avg, exp_avg_sq) of the chosen entries inside `sl`, aligned with `slice_mask(sl)`;
        None when this state carries no optimizer moments for the parameter (a dense-mode mask)."""
        pm = self.params.get(sl.name)
        if pm is None:
            empty = torch.empty(0, dtype=torch.float32)
            return empty, empty.clone(), empty.clone()
        if pm.value is None or pm.exp_avg is None or pm.exp_avg_sq is None:
            return None
        lo, hi = torch.searchsorted(pm.indices, torch.tensor([sl.start, sl.start + sl.numel])).tolist()
        return pm.value[lo:hi].clone(), pm.exp_avg[lo:hi].clone(), pm.exp_avg_sq[lo:hi].clone()

    def delta(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per parameter (sorted flat indices, value - base): the sparse update this state carries."""
        out = {}
        for name, pm in self.params.items():
            if pm.value is None:
                raise ID3Error(f"mask state for {name} has no current values: it is not a checkpoint shard")
            out[name] = (pm.indices, pm.value - pm.base)
        return out

    def validate(self, where: str) -> None:
        for name, pm in self.params.items():
            n = pm.indices.numel()
            if pm.indices.dtype != torch.int64 or pm.indices.dim() != 1:
                raise ID3Error(f"{where}: {name}.indices must be 1-D int64")
            extra = [getattr(pm, f) for f in OPTIONAL_FIELDS]
            if (
                pm.chosen_at.shape != (n,)
                or pm.base.shape != (n,)
                or any(t is not None and t.shape != (n,) for t in extra)
            ):
                raise ID3Error(f"{where}: {name} has {n} indices but mismatched chosen_at/base/value/moment lengths")
            if n and (int(pm.indices[0]) < 0 or int(pm.indices[-1]) >= pm.numel):
                raise ID3Error(f"{where}: {name}.indices out of range for shape {list(pm.shape)}")
            if n > 1 and not bool((pm.indices[1:] > pm.indices[:-1]).all()):
                raise ID3Error(f"{where}: {name}.indices are not sorted and unique")

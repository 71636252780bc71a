"""Add a delta to a model already in memory, and take it out again exactly: one loaded base, many deltas.

`apply_delta(model, DELTA)` adds base + delta in place (summed in fp64, rounded once to each parameter's
dtype); `remove_delta(model, DELTA)` puts the base back. Everything is validated before the first parameter
changes: names exist in the model, shapes agree, and (unless force) each touched parameter, cast to the base
dtype recorded in the delta, hashes to the recorded fingerprint.

Exactness: subtracting the delta again is not an inverse (fl(fl(b + d) - d) differs from b for a few entries
in fp32, for about one ulp's worth of entries in bf16), so apply_delta keeps, on the model, the values it
overwrote (`AppliedDelta`: the changed positions and their old values, 12 bytes per entry for a sparse fp32
delta, or a copy of a tensor that a dense or LoRA update changed almost everywhere; on the parameter's
device) and remove_delta writes them back: the model is bit-identical to the base
afterwards, whatever the dtype, for sparse, dense, LoRA-folded and head tensors alike. Deltas applied on top
of each other are removed in any order unless two of them changed the same entry (then the later one first).
`remove_delta(..., exact=False)` subtracts arithmetically for a model with no record (e.g. merged and saved).

ZeRO-3: each touched partitioned parameter is gathered whole (`id3_ds.integration.params.gathered`),
modified on every rank identically, and re-partitioned on exit (rank 0's copy wins); every rank keeps the
same record. Call it on every rank (tests/test_delta_zero3_apply.py).

Several deltas at once (`apply_delta(model, [D1, D2], combine="sum")`) are combined first
(`id3_ds.delta.compose`) and applied, and removed, as one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from id3_ds.delta.format import Delta, fingerprint_error, load_delta, named
from id3_ds.delta.lora import fold
from id3_ds.delta.merge import add_delta
from id3_ds.errors import ID3Error
from id3_ds.files import safetensors_io as st
from id3_ds.integration.params import full_shape, gathered

DeltaLike = str | os.PathLike | Delta
_RECORDS = "_id3_applied_deltas"  # attribute of the model holding its AppliedDelta stack


@dataclass
class AppliedDelta:
    """What apply_delta overwrote: per tensor, the flat positions it changed (None: all) and their old values."""

    key: tuple
    label: str
    saved: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)

    @property
    def entries(self) -> int:
        return sum(old.numel() for _, old in self.saved.values())

    def __repr__(self) -> str:
        return f"AppliedDelta({self.label}, {len(self.saved)} tensors, {self.entries:,} entries saved)"


def _key(delta: Delta) -> tuple:
    """Identity of a delta for matching remove_delta to its apply_delta: where it lives and what it holds."""
    roots = delta.config.get("combined_from") or [str(Path(delta.root).resolve())]
    return (tuple(roots), delta.config.get("combine"), delta.fingerprint["digest"], delta.total_entries)


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by state-dict name, tied aliases included (e.g. lm_head.weight)."""
    out: dict[str, torch.Tensor] = dict(model.named_buffers(remove_duplicate=False))
    out.update(model.named_parameters(remove_duplicate=False))
    return out


def _resolve(model: torch.nn.Module, delta: Delta) -> dict[str, torch.Tensor]:
    tensors = _tensors(model)
    found: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    shapes = delta.touched_shapes
    prefix = getattr(model, "base_model_prefix", "") or ""
    for name in delta.touched:
        t = tensors.get(name)
        if t is None and prefix:  # a task model over the base (BertForSequenceClassification: bert.<name>)
            t = tensors.get(f"{prefix}.{name}")
        if t is None:
            hint = " (pass the base model, not a PEFT-wrapped one)" if hasattr(model, "peft_config") else ""
            raise ID3Error(
                f"{named(delta.root)} touches {name}, which this model does not have: load the base model the "
                f"delta was exported from{hint}"
            )
        if full_shape(t) != shapes[name]:
            raise ID3Error(
                f"{named(delta.root)}: {name} has shape {list(shapes[name])} but the model has {list(full_shape(t))}"
            )
        if not t.is_floating_point():
            raise ID3Error(f"{named(delta.root)}: model tensor {name} is {t.dtype}, not floating point")
        if id(t) in seen:
            raise ID3Error(f"{named(delta.root)} touches both {seen[id(t)]} and {name}, which are one tied tensor")
        seen[id(t)] = name
        found[name] = t
    return found


def _resolve_new(model: torch.nn.Module, delta: Delta) -> dict[str, torch.Tensor]:
    """The model's parameters a delta's new tensors (a fresh classification head) replace, shape-checked."""
    tensors = _tensors(model)
    found: dict[str, torch.Tensor] = {}
    for name, value in delta.new.items():
        t = tensors.get(name)
        if t is None:
            arch = (delta.config_updates or {}).get("architectures", ["?"])[0]
            raise ID3Error(
                f"{named(delta.root)} sets the head tensor {name}, which this model does not have: load the base "
                f"as {arch} (e.g. AutoModelForSequenceClassification with num_labels="
                f"{(delta.config_updates or {}).get('num_labels')})"
            )
        if full_shape(t) != tuple(value.shape):
            raise ID3Error(
                f"{named(delta.root)}: head tensor {name} has shape {list(value.shape)} but the model has "
                f"{list(full_shape(t))} (another num_labels?)"
            )
        found[name] = t
    return found


def _check_fingerprint(delta: Delta, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        want = delta.fingerprint["tensors"][name]
        with gathered([t]):
            data = t.detach().to(st.DTYPES[want["dtype"]])
            if hashlib.sha256(st.tensor_bytes(data)).hexdigest() != want["sha256"]:
                raise fingerprint_error(delta, name)


def _load(deltas: DeltaLike | Sequence[DeltaLike], combine: str) -> Delta:
    if isinstance(deltas, (str, os.PathLike, Delta)):
        return deltas if isinstance(deltas, Delta) else load_delta(deltas)
    from id3_ds.delta.compose import combine_deltas

    loaded = [d if isinstance(d, Delta) else load_delta(d) for d in deltas]
    return loaded[0] if len(loaded) == 1 else combine_deltas(loaded, combine)


def _new_value(full: torch.Tensor, name: str, delta: Delta, scale: float) -> torch.Tensor:
    """The tensor after adding `scale` x the delta (a new tensor, or `full` itself changed in place)."""
    if name in delta.params:
        return add_delta(full, delta.params[name], full.dtype, scale)  # in place for sparse deltas
    a, b = delta.lora.modules[name].matrices()
    return fold(full, a.to(full.device), b.to(full.device), scale * delta.lora.scale, full.dtype)


def _records(model: torch.nn.Module) -> list[AppliedDelta]:
    return model.__dict__.setdefault(_RECORDS, [])


def applied_deltas(model: torch.nn.Module) -> list[AppliedDelta]:
    """The deltas applied to `model` and not removed yet, oldest first."""
    return list(model.__dict__.get(_RECORDS, []))


def apply_delta(
    model: torch.nn.Module, delta: DeltaLike | Sequence[DeltaLike], *, force: bool = False, combine: str = "sum"
) -> Delta:
    """Add a delta (or several, combined by `combine`: sum, mean or ties) to `model` in place.

    Validated first; `force` skips the base fingerprint check. Returns the (combined) delta applied.
    """
    d = _load(delta, combine)
    tensors = _resolve(model, d)
    heads = _resolve_new(model, d)
    if not force:
        _check_fingerprint(d, tensors)
    record = AppliedDelta(_key(d), named(d.root))
    with torch.no_grad():
        for name, t in heads.items():
            with gathered([t], modify=True):
                record.saved[name] = (None, t.data.detach().clone())
                t.data.copy_(d.new[name].to(device=t.data.device, dtype=t.data.dtype))
        for name, t in tensors.items():
            with gathered([t], modify=True):
                full = t.data
                flat = full.view(-1) if full.is_contiguous() else full.reshape(-1)
                p = d.params.get(name)
                if p is not None and not p.dense:  # sparse: save exactly the entries the add writes
                    at = p.indices.to(device=full.device, dtype=torch.int64)
                    record.saved[name] = (at, flat[at].clone())
                    merged = _new_value(full, name, d, 1.0)
                else:  # dense or LoRA-folded: save the entries that changed (the whole tensor if cheaper)
                    merged = _new_value(full, name, d, 1.0)
                    at = (merged.reshape(-1) != flat).nonzero().flatten()
                    whole = at.numel() * (8 + full.element_size()) >= full.numel() * full.element_size()
                    record.saved[name] = (None, full.detach().clone()) if whole else (at, flat[at].clone())
                if merged.data_ptr() != full.data_ptr():
                    full.copy_(merged)
    _records(model).append(record)
    return d


def remove_delta(
    model: torch.nn.Module, delta: DeltaLike | Sequence[DeltaLike], *, combine: str = "sum", exact: bool = True
) -> Delta:
    """Take a delta applied with `apply_delta` out of `model` again, restoring the base bit for bit.

    With `exact=False` and no record of the apply (a model that had the delta merged), subtracts it instead
    (within rounding of the base, see the module docstring).
    """
    d = _load(delta, combine)
    stack = _records(model)
    key = _key(d)
    at = next((i for i in range(len(stack) - 1, -1, -1) if stack[i].key == key), None)
    if at is None:
        if exact:
            raise ID3Error(
                f"{named(d.root)} was not applied to this model by apply_delta (no record of the values it "
                "replaced): reload the base, or pass exact=False to subtract it (equal to the base within rounding)"
            )
        return _subtract(model, d)
    record = stack[at]
    _check_order(record, stack[at + 1 :])
    tensors = _tensors(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    with torch.no_grad():
        for name, (pos, old) in record.saved.items():
            t = tensors.get(name)
            if t is None and prefix:
                t = tensors.get(f"{prefix}.{name}")
            if t is None:
                raise ID3Error(f"{named(d.root)}: the model no longer has {name}; reload the base")
            with gathered([t], modify=True):
                if pos is None:
                    t.data.copy_(old)
                else:
                    flat = t.data.view(-1) if t.data.is_contiguous() else None
                    if flat is None:
                        t.data.copy_(t.data.reshape(-1).index_put((pos,), old).reshape(t.data.shape))
                    else:
                        flat[pos] = old
    del stack[at]
    return d


def _check_order(record: AppliedDelta, later: list[AppliedDelta]) -> None:
    """Refuse to restore entries that a delta applied afterwards changed too (its result would be lost)."""
    for other in later:
        for name, (pos, _) in record.saved.items():
            if name not in other.saved:
                continue
            opos = other.saved[name][0]
            if pos is None or opos is None or bool(torch.isin(pos, opos).any()):
                raise ID3Error(
                    f"{record.label} and {other.label}, applied after it, change the same entries of {name}: "
                    f"remove {other.label} first"
                )


def _subtract(model: torch.nn.Module, d: Delta) -> Delta:
    if d.new:
        raise ID3Error(
            f"{named(d.root)} replaces a fresh classification head ({sorted(d.new)[0]}), whose earlier "
            "value it does not hold, so remove_delta cannot restore the model: reload the base instead"
        )
    tensors = _resolve(model, d)
    with torch.no_grad():
        for name, t in tensors.items():
            with gathered([t], modify=True):
                full = t.data
                merged = _new_value(full, name, d, -1.0)
                if merged.data_ptr() != full.data_ptr():
                    full.copy_(merged)
    return d

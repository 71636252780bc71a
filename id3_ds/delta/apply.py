"""Add or subtract a delta on a model already in memory, so one loaded base can serve several deltas.

`apply_delta(model, DELTA_DIR)` adds base + delta in place (in fp32, cast back to each parameter's dtype);
`remove_delta` subtracts it again. Everything is validated before the first parameter changes: names exist
in the model, shapes agree, and (unless force) each touched parameter, cast to the base dtype recorded in
the delta, hashes to the recorded fingerprint. remove_delta cannot check the fingerprint (the model then
holds base + delta, not the base); it checks names and shapes.

Exactness: in fp32, apply then remove restores the base exactly wherever fl(fl(b + d) - d) == b, which is
nearly always but not guaranteed; in bf16/fp16 each step rounds to the parameter's precision, so a round
trip can move a touched entry by about one ulp. Keep a pristine copy if you need bit-exact restoration.

A LoRA delta's modules are folded in place, W += (alpha/r)·B·A with the rebuilt A and B (fp32, cast back
to W's dtype), and subtracted again by remove_delta (exact only up to that rounding).

ZeRO-3: each touched partitioned parameter is gathered whole (`id3_ds.integration.params.gathered`),
modified on every rank identically, and re-partitioned on exit (rank 0's copy wins). Call it on every
rank (tests/test_delta_zero3_apply.py).
"""

from __future__ import annotations

import hashlib
import os

import torch

from id3_ds.delta.format import Delta, fingerprint_error, load_delta, named
from id3_ds.delta.lora import fold
from id3_ds.delta.merge import add_delta
from id3_ds.errors import ID3Error
from id3_ds.files import safetensors_io as st
from id3_ds.integration.params import full_shape, gathered


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


def _add(model: torch.nn.Module, delta_dir: str | os.PathLike | Delta, scale: float, force: bool, check: bool) -> Delta:
    delta = delta_dir if isinstance(delta_dir, Delta) else load_delta(delta_dir)
    if scale < 0 and delta.new:
        raise ID3Error(
            f"{named(delta.root)} replaces a fresh classification head ({sorted(delta.new)[0]}), whose earlier "
            "value it does not hold, so remove_delta cannot restore the model: reload the base instead"
        )
    tensors = _resolve(model, delta)
    heads = _resolve_new(model, delta)
    if check and not force:
        _check_fingerprint(delta, tensors)
    with torch.no_grad():
        for name, t in heads.items():
            with gathered([t], modify=True):
                t.data.copy_(delta.new[name].to(device=t.data.device, dtype=t.data.dtype))
        for name, t in tensors.items():
            with gathered([t], modify=True):
                full = t.data
                if name in delta.params:
                    merged = add_delta(full, delta.params[name], full.dtype, scale)  # in place for sparse deltas
                else:
                    a, b = delta.lora.modules[name].matrices()
                    merged = fold(full, a.to(full.device), b.to(full.device), scale * delta.lora.scale, full.dtype)
                if merged.data_ptr() != full.data_ptr():
                    full.copy_(merged)
    return delta


def apply_delta(model: torch.nn.Module, delta_dir: str | os.PathLike | Delta, *, force: bool = False) -> Delta:
    """Add a delta to `model` in place (validated first; `force` skips the base fingerprint check)."""
    return _add(model, delta_dir, 1.0, force, check=True)


def remove_delta(model: torch.nn.Module, delta_dir: str | os.PathLike | Delta) -> Delta:
    """Subtract a delta previously applied with `apply_delta`, in place."""
    return _add(model, delta_dir, -1.0, force=False, check=False)

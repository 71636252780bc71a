"""Training checkpoint -> delta, from the ID3 shards alone.

Every rank's `id3/shard-*.safetensors` carries its chosen entries' global indices, base and current fp32
values, so the delta (value - base) needs neither DeepSpeed's files nor the processes that wrote them, works
for any ZeRO stage and world size, and costs O(B) memory plus one base tensor at a time (read to check that
the checkpoint was trained from this base, and to fingerprint it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from id3_ds.checkpoint import is_complete, latest_checkpoint, read_complete, read_id3_state
from id3_ds.delta import st
from id3_ds.delta.base import BaseModel
from id3_ds.delta.format import ParamDelta, write_delta
from id3_ds.errors import ID3Error


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint-* directory as given, or the latest complete one under an output directory."""
    p = Path(path)
    if not p.is_dir():
        raise ID3Error(f"checkpoint {p} does not exist: pass a checkpoint-* directory or the run's output directory")
    if is_complete(p) or (p / "id3").is_dir():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise ID3Error(f"{p} holds no complete checkpoint-* directory: train until a checkpoint is saved")
    return latest


def exact_delta(value: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, fix_at, fix): fp32 d = value - base, plus fp32 fix-ups where base + d misses value.

    fp32 subtraction rounds when value and base differ in exponent; for an entry that crossed zero or
    shrank below half its start, no fp32 d at all gives fl(base + d) == value (ID3 favours small weights,
    so a few percent of entries do this). For those, fix = (value - base) - d, exact in fp64 and
    representable in fp32, makes base + (d + fix) == value exactly.
    """
    value, base = value.to(torch.float32), base.to(torch.float32)
    d = value - base
    miss = ((base + d) != value).nonzero().flatten()
    fix = (value[miss].double() - base[miss].double() - d[miss].double()).to(torch.float32)
    ok = (base[miss].double() + d[miss].double() + fix.double()).to(torch.float32) == value[miss]
    if not bool(ok.all()):  # not expected for finite fp32 inputs; never write a delta that cannot round-trip
        raise ID3Error("an update has no exact fp32 + fix-up form; export with --dtype bf16, or report it")
    return d, miss, fix


def export_delta(
    checkpoint: str | os.PathLike,
    base_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "fp32",
    force: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the delta of a training checkpoint against its base model directory; returns `out`."""
    ckpt = resolve_checkpoint(checkpoint)
    info = read_complete(ckpt)
    state, meta = read_id3_state(ckpt)
    base = BaseModel.open(base_dir)
    for name, pm in state.params.items():  # cheap header checks first: fail before reading any weight
        t = base.get(name)
        if t.info.shape != tuple(pm.shape):
            raise ID3Error(
                f"checkpoint {ckpt} has {name} with shape {list(pm.shape)} but the base has {list(t.info.shape)}: "
                "pass the base model the run was trained from"
            )
        if t.info.dtype not in st.FLOAT_DTYPES:
            raise ID3Error(f"base tensor {name} is {t.info.dtype}, not floating point: it cannot carry a delta")
        if pm.value is None:
            raise ID3Error(f"checkpoint {ckpt} has no current values for {name}: it was not written for export")
    params: dict[str, ParamDelta] = {}
    prints: dict[str, dict] = {}
    fixes = 0
    trained_in = (info.get("model") or {}).get("dtype") if isinstance(info.get("model"), dict) else None
    train_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trained_in)
    for name in sorted(state.params):
        pm = state.params[name]
        if pm.indices.numel() == 0:  # a parameter the mask never reached: nothing to ship
            continue
        tensor, sha = base.read(name)
        t = base.tensors[name].info
        prints[name] = {"shape": list(t.shape), "dtype": t.dtype, "sha256": sha}
        on_disk = tensor.reshape(-1)[pm.indices].to(torch.float32)
        # a run may train in a lower precision than the base file (bf16 on an fp32 base): its starting
        # weights are the base rounded to that dtype
        as_trained = on_disk.to(train_dtype).to(torch.float32) if train_dtype is not None else on_disk
        differs = int((as_trained != pm.base).sum())
        if differs and not force:
            raise ID3Error(
                f"{differs} starting weights of {name} in checkpoint {ckpt} differ from base {base.root}: the run "
                "was trained from another base; pass that one (or --force to export against this base anyway)"
            )
        del tensor
        # the delta is against the base as stored, so base + delta gives the trained value exactly
        d, fix_at, fix = exact_delta(pm.value, on_disk)
        fixes += fix_at.numel()
        dense = pm.indices.numel() == t.numel  # fully trainable: dense storage drops the indices
        params[name] = ParamDelta(t.shape, t.dtype, d.reshape(t.shape) if dense else d, None if dense else pm.indices)
        if fix_at.numel() and dtype == "fp32":
            params[name].fix_at, params[name].fix = fix_at, fix
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    id3 = {k: v for k, v in (info.get("id3") or {}).items() if isinstance(k, str)}
    id3.update(budget=meta.get("budget"), steps=meta.get("steps"), step=meta.get("step", info.get("step")))
    id3.setdefault("eps", None)
    id3.setdefault("exp", None)
    base_info = {
        "name_or_path": model.get("name_or_path") or str(base_dir),
        "path": str(base.root.resolve()),
        "numel": base.numel,
    }
    stats = {"world_size": meta.get("world_size"), "checkpoint": ckpt.name, "fixups": fixes if dtype == "fp32" else 0}
    id3["export"] = stats
    return write_delta(
        out,
        params,
        base=base_info,
        id3=id3,
        dtype=dtype,
        fingerprint_tensors=prints,
        overwrite=overwrite,
        protect=[base.root, ckpt],
    )

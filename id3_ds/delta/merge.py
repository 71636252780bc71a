"""base + delta -> a Hugging Face model directory, streamed one tensor at a time.

Memory: a tensor the delta does not touch is copied byte for byte in 16 MB chunks; a touched (or cast)
tensor is read alone, patched in fp32 at its delta entries (or, for a LoRA module, W + (alpha/r)·B·A
folded in fp32 with the rebuilt A and B, one fp32 temporary of W's shape) and written. Peak memory above
the interpreter is therefore about the largest touched tensor times (1 + output/input bytes per entry), at
most one shard, never the model. The output mirrors the base: same shard files and tensor placement, an
index if the base had one, and the base's config, tokenizer and other top-level files. It is built in a
temp directory and renamed at the end, so an interrupted merge leaves no half model under OUT_DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from id3_ds.delta.base import INDEX, BaseModel
from id3_ds.delta.format import Delta, ParamDelta, check_against_base, fingerprint_error, load_delta
from id3_ds.delta.lora import fold
from id3_ds.errors import ID3Error
from id3_ds.files import safetensors_io as st
from id3_ds.files.atomic import check_out, staged_dir

MERGE_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_HF_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass
class MergeReport:
    out: Path
    files: int
    tensors_patched: int
    bytes_written: int
    seconds: float
    overlap: dict | None = None  # several deltas: entries chosen by more than one (id3_ds.delta.compose)


def merge(
    base_dir: str | os.PathLike,
    delta_dir: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    combine: str = "sum",
) -> MergeReport:
    """Write base + delta to `out` (see module docstring); `dtype` casts every floating tensor.

    Several delta directories are combined first by `combine` (sum, mean or ties; `id3_ds.delta.compose`);
    the report's `overlap` then says how many entries more than one of them touches.
    """
    t0 = time.perf_counter()
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise ID3Error(f"--dtype {dtype!r} is not supported; use one of {sorted(MERGE_DTYPES)}")
    target = MERGE_DTYPES.get(dtype) if dtype else None
    base = BaseModel.open(base_dir)
    dirs = [delta_dir] if isinstance(delta_dir, (str, os.PathLike)) else list(delta_dir)
    loaded = [load_delta(d) for d in dirs]
    if len(loaded) == 1:
        delta = loaded[0]
    else:
        from id3_ds.delta.compose import combine_deltas

        delta = combine_deltas(loaded, combine)
    # names, shapes, dtypes now; the fingerprint is checked as each touched tensor streams past (one read)
    check_against_base(delta, base, force=force, fingerprint=False)
    out = Path(out)
    check_out(out, overwrite, protect=[base.root, *(d.root for d in loaded)])
    if delta.new and _config_object(base.root / "config.json") is None:  # checked before anything is written
        raise _no_config_for_head(base.root / "config.json")
    new_dtype = target or _main_dtype(base)
    patched = 0
    with staged_dir(out, "replace" if overwrite else "error") as tmp:
        for fn in base.files:
            extra = delta.new if fn == base.files[-1] else {}  # a fresh head goes into the last shard
            patched += _merge_shard(base, fn, delta, tmp / fn, target, force, extra, new_dtype)
        _copy_side_files(base, tmp, target, delta)
    written = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return MergeReport(out, len(base.files), patched, written, time.perf_counter() - t0, delta.config.get("overlap"))


def _out_dtype(info: st.TensorInfo, target: str | None) -> str:
    return target if target and info.dtype in st.FLOAT_DTYPES else info.dtype


def _main_dtype(base: BaseModel) -> str:
    """The floating dtype holding most of the base's entries: the dtype a fresh head is written in."""
    counts: dict[str, int] = {}
    for t in base.tensors.values():
        if t.info.dtype in st.FLOAT_DTYPES:
            counts[t.info.dtype] = counts.get(t.info.dtype, 0) + t.info.numel
    return max(counts, key=counts.get) if counts else "F32"


def _merge_shard(
    base: BaseModel,
    fn: str,
    delta: Delta,
    dst: Path,
    target: str | None,
    force: bool,
    new: dict[str, torch.Tensor] | None = None,
    new_dtype: str = "F32",
) -> int:
    header = base.headers[fn]
    order = header.ordered()
    new = new or {}
    specs = [(i.name, _out_dtype(i, target), i.shape) for i in order]
    specs += [(name, new_dtype, tuple(new[name].shape)) for name in sorted(new)]
    writer = st.StreamWriter(dst, specs, header.metadata)
    lora = delta.lora.modules if delta.lora else {}
    patched = 0
    try:
        with open(base.root / fn, "rb") as src:
            for info in order:
                p = delta.params.get(info.name)
                m = lora.get(info.name)
                odt = _out_dtype(info, target)
                if p is None and m is None and odt == info.dtype:
                    writer.copy_from(info.name, src, header, info)
                    continue
                buf = st.read_bytes(src, header, info)
                if (p is not None or m is not None) and not force:
                    if hashlib.sha256(buf).hexdigest() != delta.fingerprint["tensors"][info.name]["sha256"]:
                        raise fingerprint_error(delta, info.name)
                t = st.to_tensor(buf, info)
                if p is not None:
                    t = add_delta(t, p, st.DTYPES[odt])
                    patched += 1
                elif m is not None:
                    a, b = m.matrices()
                    t = fold(t, a, b, delta.lora.scale, st.DTYPES[odt])
                    patched += 1
                else:
                    t = t.to(st.DTYPES[odt])
                writer.write(info.name, st.tensor_bytes(t))
                del buf, t
        for name in sorted(new):
            writer.write(name, st.tensor_bytes(new[name].to(st.DTYPES[new_dtype]).contiguous()))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return patched


def add_delta(t: torch.Tensor, p: ParamDelta, out_dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """t + scale * delta at the delta's entries (summed in fp64, exact for fp32 and narrower operands, so
    the single rounding to out_dtype equals fp32 addition's), cast to out_dtype; other entries only cast.

    Works in place when t already has out_dtype (t must be writable then), so a touched tensor costs one
    copy at most.
    """
    idx, vals = p.flat()
    vals = vals.to(t.device)
    if scale != 1.0:
        vals = vals * scale
    if idx is None:
        return (t.to(torch.float64) + vals.reshape(t.shape)).to(out_dtype)
    idx = idx.to(t.device)
    out = t if t.dtype == out_dtype and t.is_contiguous() else t.to(out_dtype).contiguous()
    flat_in, flat_out = t.reshape(-1), out.view(-1)
    flat_out[idx] = (flat_in[idx].to(torch.float64) + vals).to(out_dtype)
    return out


def _copy_side_files(base: BaseModel, tmp: Path, target: str | None, delta: Delta | None = None) -> None:
    """Config, tokenizer, generation config...: every top-level file that is not a weight file."""
    weights = set(base.files)
    for p in sorted(base.root.iterdir()):
        if not p.is_file() or p.name in weights or p.name == INDEX or p.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if p.name.endswith(".index.json") or p.name.startswith("."):
            continue
        updates = delta.config_updates if delta is not None else None
        if p.name == "config.json" and (target or updates):
            _write_config(p, tmp / p.name, target, updates)
        else:
            shutil.copyfile(p, tmp / p.name)
    if base.sharded:
        index = json.loads((base.root / INDEX).read_text())
        meta = dict(index.get("metadata") or {})
        meta["total_size"] = sum((tmp / fn).stat().st_size - st.read_header(tmp / fn).data_start for fn in base.files)
        index["metadata"] = meta
        if delta is not None and delta.new:
            index["weight_map"] = {**index.get("weight_map", {}), **dict.fromkeys(delta.new, base.files[-1])}
        (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_config(src: Path, dst: Path, target: str | None, updates: dict | None = None) -> None:
    """The base's config.json with its dtype field naming the merged dtype (from_pretrained reads it) and a
    classification delta's `config_updates` (architectures, num_labels, id2label, label2id, ...) set."""
    cfg = _config_object(src)
    if cfg is None:  # not a JSON object: copied as is, unless a head must be declared in it
        if updates:
            raise _no_config_for_head(src)
        shutil.copyfile(src, dst)
        return
    for key in ("dtype", "torch_dtype"):
        if target and (key in cfg or key == "dtype"):
            cfg[key] = _HF_DTYPE[target]
    cfg.update(updates or {})
    dst.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _config_object(path: Path) -> dict | None:
    """config.json as a dict, or None when it is unreadable, not JSON or not a JSON object."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _no_config_for_head(path: Path) -> ID3Error:
    return ID3Error(f"{path} is not a readable JSON object, so the delta's new head cannot be declared in it")

"""The id3-delta format (docs/delta-format.md): write it, and load it with every check done up front.

A delta directory holds `delta.safetensors` (per tuned parameter NAME: `NAME.indices` + `NAME.values`, or
`NAME.dense`) and `delta_config.json` (format, base identity and fingerprint, ID3 settings, entry counts).
`load_delta` validates the whole delta, and against a base when one is given, before anything uses it, so
a broken delta fails with one message and never half-modifies a model or half-writes a merge.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from id3_ds.delta import st
from id3_ds.delta.atomic import check_out, staged_dir
from id3_ds.delta.base import BaseModel, combine
from id3_ds.errors import ID3Error
from id3_ds.io import write_json_atomic

FORMAT_NAME = "id3-delta"
FORMAT_VERSION = 1
DELTA_FILE = "delta.safetensors"
CONFIG_FILE = "delta_config.json"
VALUE_DTYPES = {"fp32": "F32", "bf16": "BF16"}  # --dtype of export -> safetensors dtype of NAME.values
INT32_LIMIT = 2**31
MAX_CONFIG_BYTES = 64 * 1024 * 1024


def index_dtype(numel: int) -> torch.dtype:
    """int32 addresses a parameter of fewer than 2^31 entries and halves the index bytes; int64 beyond."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


@dataclass
class ParamDelta:
    """The update of one parameter: sparse (indices + values) or dense (values shaped as the parameter).

    fix_at/fix (optional, fp32 deltas only): for the few entries whose exact update no fp32 number can
    carry (a weight that crossed zero or shrank below half its start), values[fix_at] + fix, summed in
    fp64, is the exact update, so base + delta reproduces the trained fp32 weight bit for bit.
    """

    shape: tuple[int, ...]
    base_dtype: str  # safetensors dtype of the base tensor, e.g. "BF16"
    values: torch.Tensor
    indices: torch.Tensor | None = None  # None: dense
    fix_at: torch.Tensor | None = None
    fix: torch.Tensor | None = None

    @property
    def dense(self) -> bool:
        return self.indices is None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def entries(self) -> int:
        return self.numel if self.dense else int(self.indices.numel())

    @property
    def fixes(self) -> int:
        return 0 if self.fix_at is None else int(self.fix_at.numel())

    def flat(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(int64 flat indices or None for dense, fp64 1-D update): the form every consumer adds.

        fp64 because the sum of an fp32 base and an fp32 update is exact there, so the one rounding to
        the output dtype is the same as fp32 addition's, and the fix-ups can join in.
        """
        idx = None if self.indices is None else self.indices.to(torch.int64)
        vals = self.values.reshape(-1).to(torch.float64)
        if self.fixes:
            vals[self.fix_at.to(torch.int64)] += self.fix.to(torch.float64)
        return idx, vals


@dataclass
class Delta:
    root: Path
    config: dict
    params: dict[str, ParamDelta] = field(default_factory=dict)

    @property
    def total_entries(self) -> int:
        return sum(p.entries for p in self.params.values())

    @property
    def fingerprint(self) -> dict:
        return self.config["base"]["fingerprint"]


# -- writing ----------------------------------------------------------------------------------------


def write_delta(
    out: str | os.PathLike,
    params: dict[str, ParamDelta],
    *,
    base: dict,
    id3: dict,
    dtype: str = "fp32",
    fingerprint_tensors: dict[str, dict],
    overwrite: bool = False,
    protect: list[Path] = (),
) -> Path:
    """Write a delta directory atomically; `fingerprint_tensors` maps NAME -> {shape, dtype, sha256}."""
    if dtype not in VALUE_DTYPES:
        raise ID3Error(f"--dtype {dtype!r} is not a delta value type; use one of {sorted(VALUE_DTYPES)}")
    out = Path(out)
    check_out(out, overwrite, protect=list(protect))
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    vdt = st.DTYPES[VALUE_DTYPES[dtype]]
    for name in sorted(params):
        p = params[name]
        if p.dense:
            tensors[f"{name}.dense"] = p.values.reshape(p.shape).to(vdt).contiguous()
        else:
            tensors[f"{name}.indices"] = p.indices.to(index_dtype(p.numel)).contiguous()
            tensors[f"{name}.values"] = p.values.reshape(-1).to(vdt).contiguous()
        entries[name] = {"shape": list(p.shape), "storage": "dense" if p.dense else "sparse", "entries": p.entries}
        if p.fixes and dtype == "fp32":
            tensors[f"{name}.fix_at"] = p.fix_at.to(index_dtype(p.entries)).contiguous()
            tensors[f"{name}.fix"] = p.fix.to(torch.float32).contiguous()
            entries[name]["fixes"] = p.fixes
    config = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dtype": dtype,
        "base": {
            **base,
            "fingerprint": {
                "algorithm": "sha256",
                "digest": combine(fingerprint_tensors),
                "tensors": fingerprint_tensors,
            },
        },
        "id3": id3,
        "params": entries,
        "total_entries": sum(e["entries"] for e in entries.values()),
    }
    with staged_dir(out, overwrite) as tmp:
        save_file(tensors, str(tmp / DELTA_FILE), metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION)})
        write_json_atomic(tmp / CONFIG_FILE, config)
    return out


# -- loading and validation ------------------------------------------------------------------------------


def _bad(root: Path, msg: str) -> ID3Error:
    return ID3Error(f"delta {root}: {msg}")


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _isin(x: object, allowed) -> bool:
    """Membership that a JSON list or object (unhashable) cannot turn into a TypeError."""
    return isinstance(x, str) and x in allowed


def _shape(x: object) -> bool:
    return isinstance(x, list) and all(_int(d) for d in x)


def read_config(root: Path) -> dict:
    """delta_config.json, checked for every field the loader relies on (types included)."""
    path = root / CONFIG_FILE
    if not root.is_dir():
        raise ID3Error(f"delta directory {root} does not exist: pass the directory export-delta wrote")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise _bad(root, f"{CONFIG_FILE} is implausibly large; the delta is corrupt, re-export it")
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _bad(root, f"{CONFIG_FILE} is missing; it is not a complete delta, re-export it") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _bad(root, f"{CONFIG_FILE} is not valid JSON; the delta is corrupt, re-export it") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_NAME:
        raise _bad(root, f"{CONFIG_FILE} does not declare format {FORMAT_NAME!r}; it is not an id3-ds delta")
    if cfg.get("version") != FORMAT_VERSION:
        raise _bad(root, f"format version {cfg.get('version')!r} is not supported (this id3-ds reads version 1)")
    if not _isin(cfg.get("dtype"), VALUE_DTYPES):
        raise _bad(root, f"dtype {cfg.get('dtype')!r} is not one of {sorted(VALUE_DTYPES)}")
    base, params = cfg.get("base"), cfg.get("params")
    fp = base.get("fingerprint") if isinstance(base, dict) else None
    if not isinstance(fp, dict) or not isinstance(fp.get("digest"), str) or not isinstance(fp.get("tensors"), dict):
        raise _bad(root, f"{CONFIG_FILE} has no valid base.fingerprint; the delta is corrupt, re-export it")
    if fp.get("algorithm") != "sha256":
        raise _bad(root, f"fingerprint algorithm {fp.get('algorithm')!r} is not supported (sha256)")
    if not isinstance(params, dict) or not _int(cfg.get("total_entries")):
        raise _bad(root, f"{CONFIG_FILE} lacks params/total_entries; the delta is corrupt, re-export it")
    for name, e in params.items():
        ok = isinstance(e, dict) and _shape(e.get("shape")) and _int(e.get("entries"))
        ok = ok and _int(e.get("fixes", 0)) and (e.get("fixes", 0) == 0 or cfg["dtype"] == "fp32")
        if not ok or not _isin(e.get("storage"), ("sparse", "dense")):
            raise _bad(root, f"{CONFIG_FILE} entry for {name!r} is malformed; the delta is corrupt, re-export it")
        t = fp["tensors"].get(name)
        if not isinstance(t, dict) or t.get("shape") != e["shape"] or not isinstance(t.get("sha256"), str):
            raise _bad(root, f"fingerprint of {name!r} is missing or disagrees with its shape; re-export the delta")
        if not _isin(t.get("dtype"), st.FLOAT_DTYPES):
            raise _bad(root, f"base dtype of {name!r} is {t.get('dtype')!r}, not a floating type")
    if set(fp["tensors"]) != set(params):
        raise _bad(root, "fingerprint and params name different tensors; the delta is corrupt, re-export it")
    if combine(fp["tensors"]) != fp["digest"]:
        raise _bad(root, "fingerprint digest does not match its per-tensor entries; the delta is corrupt")
    if sum(e["entries"] for e in params.values()) != cfg["total_entries"]:
        raise _bad(root, "total_entries is not the sum of the per-parameter entries; the delta is corrupt")
    if not isinstance(cfg.get("id3", {}), dict):
        raise _bad(root, "id3 settings are not an object; the delta is corrupt")
    return cfg


def load_delta(path: str | os.PathLike, base: BaseModel | None = None, *, force: bool = False) -> Delta:
    """Read and fully validate a delta; with `base`, also check names, shapes, dtypes and fingerprint.

    Every failure raises one `ID3Error`; nothing is modified. `force` skips only the fingerprint check.
    """
    root = Path(path)
    cfg = read_config(root)
    header = st.read_header(root / DELTA_FILE, "delta file")
    vdt = VALUE_DTYPES[cfg["dtype"]]
    params: dict[str, ParamDelta] = {}
    expected: set[str] = set()
    with open(root / DELTA_FILE, "rb") as f:
        for name, e in cfg["params"].items():
            shape, n = tuple(e["shape"]), math.prod(e["shape"])
            bdt = cfg["base"]["fingerprint"]["tensors"][name]["dtype"]
            if e["storage"] == "dense":
                expected.add(f"{name}.dense")
                vals = _tensor(root, f, header, f"{name}.dense", vdt, shape)
                if e["entries"] != n:
                    raise _bad(root, f"{name} is dense with {n} entries but the config counts {e['entries']}")
                params[name] = ParamDelta(shape, bdt, vals)
            else:
                expected |= {f"{name}.indices", f"{name}.values"}
                want_idx = st.ST_NAMES[index_dtype(n)]
                idx = _tensor(root, f, header, f"{name}.indices", want_idx, None)
                vals = _tensor(root, f, header, f"{name}.values", vdt, (idx.numel(),))
                _check_indices(root, name, idx, n, e["entries"])
                params[name] = ParamDelta(shape, bdt, vals, idx)
            if e.get("fixes", 0):
                p = params[name]
                expected |= {f"{name}.fix_at", f"{name}.fix"}
                p.fix_at = _tensor(root, f, header, f"{name}.fix_at", st.ST_NAMES[index_dtype(p.entries)], None)
                p.fix = _tensor(root, f, header, f"{name}.fix", "F32", (p.fix_at.numel(),))
                _check_indices(root, f"{name}.fix_at", p.fix_at, p.entries, e["fixes"])
                if not bool(torch.isfinite(p.fix).all()):
                    raise _bad(root, f"{name}.fix has NaN or infinite values; the delta is corrupt")
            if not bool(torch.isfinite(params[name].values).all()):
                raise _bad(root, f"{name} has NaN or infinite values; the training diverged or the file is corrupt")
    stray = set(header.tensors) - expected
    if stray:
        raise _bad(root, f"{DELTA_FILE} holds tensors the config does not list ({sorted(stray)[:3]}); re-export it")
    delta = Delta(root, cfg, params)
    if base is not None:
        check_against_base(delta, base, force=force)
    return delta


def _tensor(root: Path, f, header: st.Header, key: str, dtype: str, shape: tuple[int, ...] | None) -> torch.Tensor:
    info = header.tensors.get(key)
    if info is None:
        raise _bad(root, f"{DELTA_FILE} lacks tensor {key!r}; the file is truncated or corrupt, re-export it")
    if info.dtype != dtype:
        raise _bad(root, f"tensor {key!r} is {info.dtype}, expected {dtype}; the delta is corrupt, re-export it")
    if shape is None and len(info.shape) != 1:
        raise _bad(root, f"tensor {key!r} must be 1-D, got shape {list(info.shape)}")
    if shape is not None and info.shape != shape:
        raise _bad(root, f"tensor {key!r} has shape {list(info.shape)}, expected {list(shape)} (wrong shape)")
    return st.read_tensor(f, header, info)


def _check_indices(root: Path, name: str, idx: torch.Tensor, numel: int, entries: int) -> None:
    if idx.numel() != entries:
        raise _bad(root, f"{name} has {idx.numel()} indices but the config counts {entries}; re-export the delta")
    if idx.numel() == 0:
        return
    i64 = idx.to(torch.int64)
    if int(i64.min()) < 0 or int(i64.max()) >= numel:
        raise _bad(root, f"{name}.indices has an index out of range [0, {numel}); the delta is corrupt")
    if idx.numel() > 1 and not bool((i64[1:] > i64[:-1]).all()):
        raise _bad(root, f"{name}.indices are not sorted and unique; the delta is corrupt, re-export it")


def check_against_base(delta: Delta, base: BaseModel, *, force: bool = False, fingerprint: bool = True) -> None:
    """Names exist in the base with the recorded shapes and dtypes; the touched bytes hash as recorded."""
    fp = delta.fingerprint["tensors"]
    for name, p in delta.params.items():
        t = base.get(name)
        if t.info.shape != p.shape:
            raise ID3Error(
                f"delta {delta.root}: {name} has shape {list(p.shape)} but the base has {list(t.info.shape)}: "
                "this delta belongs to another model"
            )
        if t.info.dtype != fp[name]["dtype"] and not force:
            raise ID3Error(
                f"delta {delta.root}: {name} was exported against a {fp[name]['dtype']} base but this base is "
                f"{t.info.dtype}: use the base it was exported from (or --force)"
            )
    if fingerprint and not force:
        for name in sorted(delta.params):
            _, sha = base.read(name)
            if sha != fp[name]["sha256"]:
                raise fingerprint_error(delta, name)


def fingerprint_error(delta: Delta, name: str) -> ID3Error:
    return ID3Error(
        f"delta {delta.root}: base tensor {name} differs from the one the delta was exported against "
        f"(fingerprint {delta.fingerprint['digest'][:12]}): use that base, or pass --force to apply anyway"
    )

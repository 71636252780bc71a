"""The id3-delta format (docs/delta-format.md): write it, and load it with every check done up front.

A delta directory holds `delta.safetensors` (per tuned parameter NAME: `NAME.indices` + `NAME.values`, or
`NAME.dense`) and `delta_config.json` (format, base identity and fingerprint, ID3 settings, entry counts).
A LoRA run's delta adds a `lora` section: per folded base weight its A and B names, A's dense init
(`A.init`) and A's and B's entries in the same sparse form, folded by `merge` as W + (alpha/r)·B·A.
A classification run's delta adds `new` (its fresh head, `NAME.new`, whole final values) and the
`config_updates` a merge writes into config.json. `load_delta` validates the whole delta, and against a
base when one is given, before anything uses it, so a broken delta fails with one message and never
half-modifies a model or half-writes a merge.

Versions (docs/delta-format.md, "Versions"): a writer declares the lowest format version that describes what
it wrote, so a plain delta stays version 1 and readable by every id3-ds; a reader tells a delta from a newer
id3-ds (upgrade) apart from a corrupt one, in both places the version is recorded.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from id3_ds.delta.base import BaseModel, combine
from id3_ds.errors import ID3Error
from id3_ds.files import safetensors_io as st
from id3_ds.files.atomic import check_out, staged_dir, write_json_atomic

FORMAT_NAME = "id3-delta"
FORMAT_VERSION = 3  # the newest version this id3-ds reads (and the highest it writes)
# The version that introduced each optional section of delta_config.json. The previous id3-ds wrote these
# sections under version 1, so a reader accepts them there too; a writer declares the highest version among
# the sections it wrote (see written_version).
SECTION_VERSIONS = {"lora": 2, "new": 2, "config_updates": 2}
# The version that introduced each storage form of a parameter (params[NAME].storage).
STORAGE_VERSIONS = {"dense": 1, "sparse": 1, "gaps": 3}
# The version that introduced each optional per-parameter field (params[NAME].steps: NAME.steps).
FIELD_VERSIONS = {"steps": 3}
INDEX_FORMS = ("gaps", "flat")  # how write_delta stores sparse positions: uint16 gap codes, or int32/int64
GAP_ESCAPE = 65535  # a gap code meaning "advance 65535 positions, no entry here"
UPGRADE = "pip install -U id3-ds"
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
    steps: torch.Tensor | None = None  # optional (version 3): the step each entry was chosen, for `id3-ds cut`

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

    def __repr__(self) -> str:
        kind = "dense" if self.dense else "sparse"
        fixes = f", {self.fixes} fix-ups" if self.fixes else ""
        return f"ParamDelta({list(self.shape)}, {kind}, {self.entries:,} entries{fixes})"

    def add_to(self, start: torch.Tensor) -> torch.Tensor:
        """start + this update as a new fp32 tensor of `shape` (summed in fp64, rounded once)."""
        idx, vals = self.flat()
        out = start.to(torch.float64).reshape(-1).clone()
        if idx is None:
            out += vals
        else:
            out[idx] += vals
        return out.to(torch.float32).reshape(self.shape)


@dataclass
class LoraModule:
    """One LoRA-adapted base weight: W' = W + scale * B @ A, with A = a_init + a and B = 0 + b."""

    weight: str  # the base weight's name
    a_name: str  # the PEFT parameter names, e.g. base_model.model.<module>.lora_A.default.weight
    b_name: str
    a_init: torch.Tensor  # [r, in], fp32
    a: ParamDelta  # A's update against a_init
    b: ParamDelta  # B's update against zero (its init)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The trained (A [r, in], B [out, r]) in fp32."""
        return self.a.add_to(self.a_init), self.b.add_to(torch.zeros(self.b.shape))

    @property
    def shape(self) -> tuple[int, int]:
        return self.b.shape[0], self.a.shape[1]

    def __repr__(self) -> str:
        return f"LoraModule({self.weight}, A {self.a.entries:,} + B {self.b.entries:,} entries)"


@dataclass
class LoraDelta:
    rank: int
    alpha: float
    target_modules: list[str] | str | None
    modules: dict[str, LoraModule] = field(default_factory=dict)  # base weight name -> its LoRA pair

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def entries(self) -> int:
        return sum(m.a.entries + m.b.entries for m in self.modules.values())

    def __repr__(self) -> str:
        n = len(self.modules)
        return f"LoraDelta(rank={self.rank}, alpha={self.alpha:g}, {n} modules, {self.entries:,} entries)"


@dataclass
class Delta:
    root: Path
    config: dict
    params: dict[str, ParamDelta] = field(default_factory=dict)
    lora: LoraDelta | None = None
    new: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors the base lacks (a fresh head), fp32
    config_updates: dict | None = None  # config.json keys a merge sets (architectures, num_labels, ...)

    @property
    def total_entries(self) -> int:
        return sum(p.entries for p in self.params.values()) + (self.lora.entries if self.lora else 0)

    @property
    def touched_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every base tensor the delta changes, added to (params) or folded into (LoRA modules), and its shape."""
        shapes = {name: p.shape for name, p in self.params.items()}
        shapes.update({w: m.shape for w, m in (self.lora.modules if self.lora else {}).items()})
        return shapes

    @property
    def touched(self) -> list[str]:
        return sorted(self.touched_shapes)

    @property
    def fingerprint(self) -> dict:
        return self.config["base"]["fingerprint"]

    def __repr__(self) -> str:
        """One line (the tensors are summarised, never printed: a repr of a 1M-entry delta must stay short)."""
        parts = [f"{self.total_entries:,} entries in {len(self.params)} tensors"]
        if self.lora is not None:
            parts.append(f"LoRA {len(self.lora.modules)} modules")
        if self.new:
            parts.append(f"new {sorted(self.new)}")
        base = self.config.get("base", {}).get("name_or_path")
        digest = self.fingerprint.get("digest", "")[:12]
        return f"Delta({str(self.root)!r}, {', '.join(parts)}, base {base!r} sha256:{digest})"


# -- writing ----------------------------------------------------------------------------------------


def written_version(sections: Iterable[str], storages: Iterable[str] = ()) -> int:
    """The lowest format version that describes a delta with these optional sections and storage forms.

    Why not always FORMAT_VERSION: a plain delta is unchanged since version 1, and declaring 1 keeps it
    readable by an id3-ds that reads only version 1; only a delta that needs a newer reader says so.
    """
    return max([1, *(SECTION_VERSIONS[s] for s in sections), *(STORAGE_VERSIONS[s] for s in storages)])


def encode_gaps(indices: torch.Tensor) -> torch.Tensor:
    """Sorted unique flat indices -> uint16 gap codes (2 bytes an entry instead of 4 or 8).

    Each entry's gap g = index - previous index (the first from -1, so g >= 1) is written as g - 1 when that
    fits below 65535, else preceded by one GAP_ESCAPE code ("advance 65535, no entry") per 65535 skipped.
    ID3's entries are spread over whole tensors, so gaps above 65535 are rare and the file stays at ~2 bytes
    an entry; the codes cost one cumsum to decode.
    """
    idx = indices.to(torch.int64)
    gaps = torch.diff(idx, prepend=torch.tensor([-1], dtype=torch.int64)) - 1
    skips, rest = gaps // GAP_ESCAPE, gaps % GAP_ESCAPE
    if not bool((skips > 0).any()):
        return rest.to(torch.uint16)
    counts = skips + 1
    codes = torch.full((int(counts.sum()),), GAP_ESCAPE, dtype=torch.int64)
    codes[torch.cumsum(counts, 0) - 1] = rest  # each entry's code closes its run of escapes
    return codes.to(torch.uint16)


def decode_gaps(codes: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """uint16 gap codes -> (int64 flat indices, well_formed: no trailing escape)."""
    c = codes.to(torch.int64)
    entry = c != GAP_ESCAPE
    steps = torch.where(entry, c + 1, GAP_ESCAPE)
    pos = torch.cumsum(steps, 0) - 1
    return pos[entry], bool(c.numel() == 0 or entry[-1])


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
    lora: LoraDelta | None = None,
    new: dict[str, torch.Tensor] | None = None,
    config_updates: dict | None = None,
    index: str = "gaps",
) -> Path:
    """Write a delta directory atomically; `fingerprint_tensors` maps NAME -> {shape, dtype, sha256} for
    every base tensor the delta touches (params and LoRA-folded weights).

    `index`: "gaps" (default, format version 3: uint16 gap codes, ~6 bytes an fp32 entry) or "flat"
    (int32/int64 positions, ~8 bytes an entry, readable by every id3-ds since version 1).
    """
    if dtype not in VALUE_DTYPES:
        raise ID3Error(f"--dtype {dtype!r} is not a delta value type; use one of {sorted(VALUE_DTYPES)}")
    if index not in INDEX_FORMS:
        raise ID3Error(f"--index {index!r} is not an index form; use one of {', '.join(INDEX_FORMS)}")
    out = Path(out)
    check_out(out, overwrite, protect=list(protect))
    tensors: dict[str, torch.Tensor] = {}
    vdt = st.DTYPES[VALUE_DTYPES[dtype]]
    entries = {name: _put(tensors, name, params[name], vdt, dtype, index) for name in sorted(params)}
    total = sum(e["entries"] for e in entries.values())
    extra = {}
    if lora is not None:
        lora_entries, modules = {}, {}
        for weight in sorted(lora.modules):
            m = lora.modules[weight]
            tensors[f"{m.a_name}.init"] = m.a_init.reshape(m.a.shape).to(torch.float32).contiguous()
            lora_entries[m.a_name] = _put(tensors, m.a_name, m.a, vdt, dtype, index)
            lora_entries[m.b_name] = _put(tensors, m.b_name, m.b, vdt, dtype, index)
            modules[weight] = {"A": m.a_name, "B": m.b_name}
        total += sum(e["entries"] for e in lora_entries.values())
        extra["lora"] = {
            "rank": lora.rank,
            "alpha": lora.alpha,
            "target_modules": lora.target_modules,
            "modules": modules,
            "params": lora_entries,
        }
    if new:
        extra["new"] = {}
        for name in sorted(new):
            tensors[f"{name}.new"] = new[name].detach().to(torch.float32).contiguous()
            extra["new"][name] = {"shape": list(new[name].shape), "dtype": "F32"}
        extra["config_updates"] = config_updates
    storages = {e["storage"] for e in entries.values()} | {
        e["storage"] for e in (extra.get("lora") or {}).get("params", {}).values()
    }
    version = written_version(extra, storages)
    if any(e.get("steps") for e in entries.values()):
        version = max(version, FIELD_VERSIONS["steps"])
    config = {
        "format": FORMAT_NAME,
        "version": version,
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
        **extra,
        "total_entries": total,
    }
    from id3_ds.delta.card import write_card

    with staged_dir(out, "replace" if overwrite else "error") as tmp:
        save_file(tensors, str(tmp / DELTA_FILE), metadata={"format": FORMAT_NAME, "version": str(version)})
        write_json_atomic(tmp / CONFIG_FILE, config)
        write_card(tmp, config)  # README.md with the Hub's YAML header: the folder uploads as is
    return out


def _put(
    tensors: dict[str, torch.Tensor], name: str, p: ParamDelta, vdt: torch.dtype, dtype: str, index: str = "flat"
) -> dict:
    """Add one parameter's update tensors to `tensors`; returns its config entry."""
    storage = "dense" if p.dense else ("gaps" if index == "gaps" else "sparse")
    if p.dense:
        tensors[f"{name}.dense"] = p.values.reshape(p.shape).to(vdt).contiguous()
    elif storage == "gaps":
        tensors[f"{name}.gaps"] = encode_gaps(p.indices).contiguous()
        tensors[f"{name}.values"] = p.values.reshape(-1).to(vdt).contiguous()
    else:
        tensors[f"{name}.indices"] = p.indices.to(index_dtype(p.numel)).contiguous()
        tensors[f"{name}.values"] = p.values.reshape(-1).to(vdt).contiguous()
    entry = {"shape": list(p.shape), "storage": storage, "entries": p.entries}
    if p.steps is not None:
        narrow = p.steps.numel() == 0 or int(p.steps.max()) < 65535
        tensors[f"{name}.steps"] = p.steps.to(torch.uint16 if narrow else torch.int32).reshape(-1).contiguous()
        entry["steps"] = True
    if p.fixes and dtype == "fp32":
        tensors[f"{name}.fix_at"] = p.fix_at.to(index_dtype(p.entries)).contiguous()
        tensors[f"{name}.fix"] = p.fix.to(torch.float32).contiguous()
        entry["fixes"] = p.fixes
    return entry


# -- loading and validation ------------------------------------------------------------------------------


def named(root: str | os.PathLike) -> str:
    """How every message names a delta: "delta directory 'delta/'" reads well whatever the directory is called
    (a bare "delta {root}" gave "delta delta: ..." for the usual name)."""
    return f"delta directory '{str(root).rstrip('/')}/'"


def _bad(root: Path, msg: str) -> ID3Error:
    return ID3Error(f"{named(root)}: {msg}")


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
        raise ID3Error(f"{named(root)} does not exist: pass the directory export-delta wrote")
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
    _check_version(root, CONFIG_FILE, cfg.get("version"))  # before any field whose meaning it decides
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
        _check_entry(root, cfg, name, e)
    lora = cfg.get("lora")
    folded = _check_lora_config(root, cfg, lora) if lora is not None else {}
    for name, shape in [*((n, e["shape"]) for n, e in params.items()), *folded.items()]:
        t = fp["tensors"].get(name)
        if name in folded and isinstance(t, dict) and t.get("shape") != shape:
            raise _bad(
                root,
                f"LoRA module {name}: B @ A has shape {shape} but the base weight has {t.get('shape')} (wrong A or "
                "B shape); the delta is corrupt, re-export it",
            )
        if not isinstance(t, dict) or t.get("shape") != shape or not isinstance(t.get("sha256"), str):
            raise _bad(root, f"fingerprint of {name!r} is missing or disagrees with its shape; re-export the delta")
        if not _isin(t.get("dtype"), st.FLOAT_DTYPES):
            raise _bad(root, f"base dtype of {name!r} is {t.get('dtype')!r}, not a floating type")
    if lora is None and set(fp["tensors"]) > set(params):
        extra = sorted(set(fp["tensors"]) - set(params))[0]
        raise _bad(
            root,
            f"the fingerprint names {extra}, which params does not list: if this is a LoRA delta, its 'lora' "
            "section (rank, alpha, modules) is missing; the delta is corrupt, re-export it",
        )
    if set(fp["tensors"]) != set(params) | set(folded):
        raise _bad(root, "fingerprint and params name different tensors; the delta is corrupt, re-export it")
    if combine(fp["tensors"]) != fp["digest"]:
        raise _bad(root, "fingerprint digest does not match its per-tensor entries; the delta is corrupt")
    lora_entries = sum(e["entries"] for e in lora["params"].values()) if lora is not None else 0
    if sum(e["entries"] for e in params.values()) + lora_entries != cfg["total_entries"]:
        raise _bad(root, "total_entries is not the sum of the per-parameter entries; the delta is corrupt")
    if not isinstance(cfg.get("id3", {}), dict):
        raise _bad(root, "id3 settings are not an object; the delta is corrupt")
    _check_new_config(root, cfg, set(folded))
    return cfg


def _check_version(root: Path, where: str, version: object) -> int:
    """A declared format version: newer than this reader means upgrade; anything but an integer >= 1 is corrupt."""
    if version is None:
        raise _bad(root, f"{where} declares no format version; the delta is corrupt, re-export it")
    if not _int(version) or version == 0:
        what = f"declares format version {version!r}, not an integer >= 1"
        raise _bad(root, f"{where} {what}; the delta is corrupt, re-export it")
    if version > FORMAT_VERSION:
        raise _bad(
            root,
            f"written by a newer id3-ds (format version {version} in {where}; this id3-ds reads up to "
            f"{FORMAT_VERSION}): upgrade id3-ds ({UPGRADE})",
        )
    return version


def _check_file_version(root: Path, header: st.Header, config_version: int) -> None:
    """delta.safetensors' own record of format and version: valid, and the same as the (authoritative) config's.

    Both files are checked because either can be replaced alone; a tensor file from another export read
    under this config's schema would otherwise fail later with a misleading message, or not at all.
    """
    meta = header.metadata
    if meta.get("format") != FORMAT_NAME:
        raise _bad(
            root,
            f"{DELTA_FILE} does not declare format {FORMAT_NAME!r} in its metadata (found "
            f"{meta.get('format')!r}); it is not an id3-ds delta file, re-export the delta",
        )
    raw = meta.get("version")
    version = int(raw) if isinstance(raw, str) and re.fullmatch(r"[0-9]{1,9}", raw) else raw
    _check_version(root, f"{DELTA_FILE} metadata", version)
    if version != config_version:
        raise _bad(
            root,
            f"{CONFIG_FILE} declares format version {config_version} but {DELTA_FILE} declares {version}: the "
            "two files come from different exports; the delta is corrupt, re-export it",
        )


CONFIG_UPDATE_KEYS = ("architectures", "num_labels", "id2label", "label2id", "pad_token_id", "problem_type")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def _check_new_config(root: Path, cfg: dict, folded: set[str]) -> None:
    """The `new` tensors (a fresh head) and the `config_updates` a merge writes: both or neither."""
    new, upd = cfg.get("new"), cfg.get("config_updates")
    if new is None and upd is None:
        return
    if not isinstance(new, dict) or not new:
        raise _bad(
            root, "config_updates without new tensors (the 'new' object is missing or empty); the delta is corrupt"
        )
    if not isinstance(upd, dict):
        raise _bad(
            root,
            "new tensors without a valid config_updates object (architectures, num_labels, id2label, label2id): "
            "a merged model could not load its head; the delta is corrupt, re-export it",
        )
    for name, e in new.items():
        if not isinstance(e, dict) or not _shape(e.get("shape")) or e.get("dtype") != "F32":
            raise _bad(root, f"new-tensor entry for {name!r} is malformed (needs shape and dtype F32); re-export it")
        if name in cfg["params"] or name in folded or name in cfg["base"]["fingerprint"]["tensors"]:
            raise _bad(root, f"{name} is both a new tensor and an update of a base tensor; the delta is corrupt")
    unknown = sorted(set(upd) - set(CONFIG_UPDATE_KEYS))
    arch, n, i2l, l2i = (upd.get(k) for k in ("architectures", "num_labels", "id2label", "label2id"))
    ok = not unknown and isinstance(arch, list) and len(arch) == 1 and isinstance(arch[0], str) and arch[0]
    ok = ok and _int(n) and n > 0 and isinstance(i2l, dict) and isinstance(l2i, dict) and len(i2l) == len(l2i) == n
    ok = ok and all(isinstance(v, str) for v in i2l.values()) and all(_int(v) and v < n for v in l2i.values())
    ok = ok and all(k.isdigit() and int(k) < n for k in i2l) and all(isinstance(k, str) for k in l2i)
    pad = upd.get("pad_token_id")
    problem = upd.get("problem_type")
    ok = ok and (pad is None or _int(pad)) and (problem is None or _isin(problem, PROBLEM_TYPES))
    if not ok:
        what = f"has unknown key {unknown[0]!r}" if unknown else "is malformed"
        raise _bad(
            root,
            f"config_updates {what} (allowed: {', '.join(CONFIG_UPDATE_KEYS)}; architectures one class name, "
            "num_labels > 0 and id2label/label2id with that many labels); the delta is corrupt, re-export it",
        )


def _check_entry(root: Path, cfg: dict, name: str, e: object) -> None:
    ok = isinstance(e, dict) and _shape(e.get("shape")) and _int(e.get("entries"))
    ok = ok and _int(e.get("fixes", 0)) and (e.get("fixes", 0) == 0 or cfg["dtype"] == "fp32")
    if not ok or not _isin(e.get("storage"), STORAGE_VERSIONS):
        raise _bad(root, f"{CONFIG_FILE} entry for {name!r} is malformed; the delta is corrupt, re-export it")
    if e.get("steps", False) not in (True, False) or (e.get("steps") and cfg["version"] < FIELD_VERSIONS["steps"]):
        raise _bad(root, f"{CONFIG_FILE} entry for {name!r} has a malformed 'steps' flag; the delta is corrupt")
    if STORAGE_VERSIONS[e["storage"]] > cfg["version"]:
        raise _bad(
            root,
            f"{name!r} is stored as {e['storage']!r}, which format version {STORAGE_VERSIONS[e['storage']]} "
            f"introduced, but the delta declares version {cfg['version']}; the delta is corrupt, re-export it",
        )


def _check_lora_config(root: Path, cfg: dict, lora: object) -> dict[str, list[int]]:
    """The `lora` section's fields, pairing and shapes; returns folded base weight -> its [out, in]."""
    if not isinstance(lora, dict):
        raise _bad(root, "the 'lora' section is not an object; the delta is corrupt, re-export it")
    rank, alpha, targets = lora.get("rank"), lora.get("alpha"), lora.get("target_modules")
    if not _int(rank) or rank == 0:
        raise _bad(root, f"lora.rank {rank!r} is not a positive integer; the delta is corrupt, re-export it")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise _bad(root, f"lora.alpha {alpha!r} is not a positive number; the delta is corrupt, re-export it")
    names = isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    if not (targets is None or isinstance(targets, str) or names):
        raise _bad(root, "lora.target_modules is not a list of module names; the delta is corrupt, re-export it")
    modules, lparams = lora.get("modules"), lora.get("params")
    if not isinstance(modules, dict) or not isinstance(lparams, dict):
        raise _bad(root, "the 'lora' section lacks its modules/params objects; the delta is corrupt, re-export it")
    for name, e in lparams.items():
        _check_entry(root, cfg, name, e)
    used: set[str] = set()
    folded: dict[str, list[int]] = {}
    for weight, pair in modules.items():
        if weight in cfg["params"]:
            raise _bad(root, f"{weight} is both a LoRA-folded weight and a sparse param; the delta is corrupt")
        if not isinstance(pair, dict):
            raise _bad(root, f"lora.modules entry for {weight!r} is malformed; the delta is corrupt, re-export it")
        for which in ("A", "B"):
            n = pair.get(which)
            if not isinstance(n, str) or n not in lparams:
                raise _bad(
                    root,
                    f"LoRA module {weight} lacks its {which} matrix (lora.params has no entry for it); the delta "
                    "is corrupt, re-export it",
                )
            if n in used:
                raise _bad(root, f"LoRA matrix {n!r} is paired with two base weights; the delta is corrupt")
            used.add(n)
        a, b = lparams[pair["A"]]["shape"], lparams[pair["B"]]["shape"]
        if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise _bad(
                root,
                f"LoRA module {weight}: A {a} and B {b} do not have rank {rank} (A must be [r, in], B [out, r]); "
                "the rank does not match lora.rank, re-export the delta",
            )
        folded[weight] = [b[0], a[1]]
    stray = sorted(set(lparams) - used)
    if stray:
        raise _bad(root, f"lora.params lists {stray[0]!r}, which no lora.modules entry pairs; the delta is corrupt")
    return folded


def load_delta(path: str | os.PathLike, base: BaseModel | None = None, *, force: bool = False) -> Delta:
    """Read and fully validate a delta; with `base`, also check names, shapes, dtypes and fingerprint.

    Every failure raises one `ID3Error`; nothing is modified. `force` skips only the fingerprint check.
    """
    root = Path(path)
    cfg = read_config(root)
    header = st.read_header(root / DELTA_FILE, "delta file")
    _check_file_version(root, header, cfg["version"])
    vdt = VALUE_DTYPES[cfg["dtype"]]
    params: dict[str, ParamDelta] = {}
    lora = None
    expected: set[str] = set()
    with open(root / DELTA_FILE, "rb") as f:
        for name, e in cfg["params"].items():
            bdt = cfg["base"]["fingerprint"]["tensors"][name]["dtype"]
            params[name] = _load_param(root, f, header, name, e, vdt, bdt, expected)
        if cfg.get("lora") is not None:
            lc = cfg["lora"]
            lora = LoraDelta(lc["rank"], float(lc["alpha"]), lc.get("target_modules"))
            for weight, pair in lc["modules"].items():
                a_name, b_name = pair["A"], pair["B"]
                a = _load_param(root, f, header, a_name, lc["params"][a_name], vdt, "F32", expected)
                b = _load_param(root, f, header, b_name, lc["params"][b_name], vdt, "F32", expected)
                expected.add(f"{a_name}.init")
                init = _tensor(root, f, header, f"{a_name}.init", "F32", a.shape)
                if not bool(torch.isfinite(init).all()):
                    raise _bad(root, f"{a_name}.init has NaN or infinite values; the delta is corrupt, re-export it")
                lora.modules[weight] = LoraModule(weight, a_name, b_name, init, a, b)
        new = {}
        for name, e in (cfg.get("new") or {}).items():
            expected.add(f"{name}.new")
            new[name] = _tensor(root, f, header, f"{name}.new", "F32", tuple(e["shape"]))
            if not bool(torch.isfinite(new[name]).all()):
                raise _bad(root, f"new tensor {name} has NaN or infinite values; training diverged or it is corrupt")
    stray = set(header.tensors) - expected
    if stray:
        if lora is None and any(n.endswith(".init") or ".lora_" in n for n in stray):
            raise _bad(
                root,
                f"{DELTA_FILE} holds LoRA tensors ({sorted(stray)[0]}) but {CONFIG_FILE} has no 'lora' section "
                "(rank, alpha, modules); the config is incomplete, re-export the delta",
            )
        raise _bad(root, f"{DELTA_FILE} holds tensors the config does not list ({sorted(stray)[:3]}); re-export it")
    delta = Delta(root, cfg, params, lora, new, cfg.get("config_updates"))
    if base is not None:
        check_against_base(delta, base, force=force)
    return delta


def _load_param(
    root: Path, f, header: st.Header, name: str, e: dict, vdt: str, bdt: str, expected: set[str]
) -> ParamDelta:
    """One parameter's update tensors, checked (dtype, shape, indices, counts, finiteness)."""
    shape, n = tuple(e["shape"]), math.prod(e["shape"])
    if e["storage"] == "dense":
        expected.add(f"{name}.dense")
        vals = _tensor(root, f, header, f"{name}.dense", vdt, shape)
        if e["entries"] != n:
            raise _bad(root, f"{name} is dense with {n} entries but the config counts {e['entries']}")
        p = ParamDelta(shape, bdt, vals)
    elif e["storage"] == "gaps":
        expected |= {f"{name}.gaps", f"{name}.values"}
        codes = _tensor(root, f, header, f"{name}.gaps", "U16", None)
        idx, closed = decode_gaps(codes)
        if not closed:
            raise _bad(root, f"{name}.gaps ends in an escape code (no entry after it); the delta is corrupt")
        vals = _tensor(root, f, header, f"{name}.values", vdt, (idx.numel(),))
        _check_indices(root, name, idx, n, e["entries"])
        p = ParamDelta(shape, bdt, vals, idx)
    else:
        expected |= {f"{name}.indices", f"{name}.values"}
        want_idx = st.ST_NAMES[index_dtype(n)]
        idx = _tensor(root, f, header, f"{name}.indices", want_idx, None)
        vals = _tensor(root, f, header, f"{name}.values", vdt, (idx.numel(),))
        _check_indices(root, name, idx, n, e["entries"])
        p = ParamDelta(shape, bdt, vals, idx)
    if e.get("steps"):
        expected.add(f"{name}.steps")
        info = header.tensors.get(f"{name}.steps")
        sdt = info.dtype if info is not None and info.dtype in ("U16", "I32") else "U16"
        p.steps = _tensor(root, f, header, f"{name}.steps", sdt, (p.entries,)).to(torch.int32)
        if p.entries and int(p.steps.min()) < 0:
            raise _bad(root, f"{name}.steps has a negative step; the delta is corrupt, re-export it")
    if e.get("fixes", 0):
        expected |= {f"{name}.fix_at", f"{name}.fix"}
        p.fix_at = _tensor(root, f, header, f"{name}.fix_at", st.ST_NAMES[index_dtype(p.entries)], None)
        p.fix = _tensor(root, f, header, f"{name}.fix", "F32", (p.fix_at.numel(),))
        _check_indices(root, f"{name}.fix_at", p.fix_at, p.entries, e["fixes"])
        if not bool(torch.isfinite(p.fix).all()):
            raise _bad(root, f"{name}.fix has NaN or infinite values; the delta is corrupt")
    if not bool(torch.isfinite(p.values).all()):
        raise _bad(root, f"{name} has NaN or infinite values; the training diverged or the file is corrupt")
    return p


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
    for name, shape in delta.touched_shapes.items():
        t = base.get(name)
        if t.info.shape != shape:
            what = "LoRA B @ A" if name not in delta.params else name
            raise ID3Error(
                f"{named(delta.root)}: {what} has shape {list(shape)} but the base's {name} has "
                f"{list(t.info.shape)}: this delta belongs to another model"
            )
        if t.info.dtype != fp[name]["dtype"] and not force:
            raise ID3Error(
                f"{named(delta.root)}: {name} was exported against a {fp[name]['dtype']} base but this base is "
                f"{t.info.dtype}: use the base it was exported from (or --force)"
            )
    for name in delta.new:
        if name in base.tensors:
            raise ID3Error(
                f"{named(delta.root)}: new tensor {name} already exists in the base {base.root}: this delta's head "
                "would replace a base weight; it belongs to another base (or is corrupt)"
            )
    if fingerprint and not force:
        for name in delta.touched:
            _, sha = base.read(name)
            if sha != fp[name]["sha256"]:
                raise fingerprint_error(delta, name)


def fingerprint_error(delta: Delta, name: str) -> ID3Error:
    return ID3Error(
        f"{named(delta.root)}: base tensor {name} differs from the one the delta was exported against "
        f"(fingerprint {delta.fingerprint['digest'][:12]}): use that base, or pass --force to apply anyway"
    )

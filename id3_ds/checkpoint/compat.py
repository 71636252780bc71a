"""Whether this run may continue the checkpoint `train.resume` points at, decided before any work is done.

Picking up whatever checkpoint the output directory holds would let a rerun with another lr or seed after a
finished run train nothing and say nothing. The rules, checked from the config and the checkpoint's
COMPLETE marker alone (no process group, model or data is needed):

- Settings that change what the run computes (`RESULT_KEYS`, and the data files' content) must equal the
  checkpoint's, else the resume is refused with one line naming each difference and the fixes. World size,
  micro batch and grad_accum are not compared: resuming on other hardware is supported (a changed global
  batch is only a note, see resuming.global_batch_note). `train.resume_mismatch=allow` continues anyway,
  except across `_FIXED_KEYS`, which change which weights train, so no checkpoint of them can be loaded.
- A finished run (its latest checkpoint holds every step) is not trained again: the run says so and ends
  with exit code 0, so rerunning a finished command is a harmless no-op. Asked for a delta or final model
  it has not written yet, it loads the checkpoint, trains nothing and writes them.
- A run that would write its checkpoints next to ones it does not continue from (`train.resume=null`, or a
  path outside `train.output_dir`, while that folder holds checkpoints) is refused: a later `resume: auto`
  would pick whichever is latest, mixing two runs.

Checkpoints record their compared settings (`settings`) and the whole run config in COMPLETE. Those written
before that recorded only the method, the id3 section, lr and dtype: those are compared, nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from id3_ds.checkpoint.layout import latest_checkpoint, list_checkpoints, read_complete
from id3_ds.errors import ID3Error
from id3_ds.models.resolve import is_named

if TYPE_CHECKING:
    from id3_ds.config import RunConfig

# compared as configured (JSON values); data.path and data.eval_path are compared by content (DATA_KEYS)
RESULT_KEYS = (
    "method",
    "model.name_or_path",
    "model.dtype",
    "model.quantization",
    "data.format",
    "data.max_length",
    "data.packing",
    "data.labels",
    "id3.budget",
    "id3.eps",
    "id3.exp",
    "id3.targets",
    "id3.fully_trainable",
    "id3.bias_correction",
    "id3.no_decay",
    "id3.state",
    "train.steps",
    "train.epochs",
    "train.lr",
    "train.lr_scheduler",
    "train.warmup_steps",
    "train.weight_decay",
    "train.max_grad_norm",
    "train.optimizer",
    "train.seed",
    "lora.rank",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
)
DATA_KEYS = ("data.path", "data.eval_path")
# these change which weights train (or their dtype): DeepSpeed's state and the mask cannot be loaded across
_FIXED_KEYS = (
    "method",
    "model.name_or_path",
    "model.dtype",
    "model.quantization",  # the base training saw: the masters are values of that effective weight
    "lora.rank",
    "lora.target_modules",
    "id3.targets",
    "id3.fully_trainable",
    "id3.state",  # dense checkpoints hold DeepSpeed's optimizer, sparse ones the chosen entries' Adam state
)
# fixed keys that change something other than which weights train, and what
_WHY_FIXED = {
    "id3.state": "the same entries train either way, but a dense checkpoint holds DeepSpeed's optimizer state "
    "for every weight and a sparse one only the chosen entries' own, so neither loads into the other",
}
_LEGACY_ID3 = ("budget", "eps", "exp", "targets", "fully_trainable", "bias_correction", "no_decay")


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint this run continues, as `check_resume` found it."""

    ckpt: Path
    info: dict  # its COMPLETE marker
    step: int
    differences: list[tuple[str, Any, Any]]  # (key, checkpoint's value, this run's), allowed by the user


def settings(cfg: RunConfig) -> dict[str, Any]:
    """This run's result-changing settings as JSON values, by dotted key: what a checkpoint records.

    A model path is made absolute, so one run started from two directories compares equal; a data file
    counts by its content. A configured data path that does not exist is left out (loading it will say so).
    """
    raw = json.loads(json.dumps(cfg.to_dict()))
    out = {key: _at(raw, key) for key in RESULT_KEYS}
    name = out["model.name_or_path"]
    if name and not is_named(name):
        out["model.name_or_path"] = str(Path(name).resolve())
    for key in DATA_KEYS:
        path = _at(raw, key)
        digest = content_digest(path) if path else None
        if not path or digest is not None:
            out[key] = digest
    return out


def recorded_settings(info: dict) -> dict[str, Any]:
    """The settings a checkpoint's COMPLETE marker records; for a checkpoint written before they were
    recorded whole, the few its marker holds (method, id3 section, lr, dtype)."""
    if isinstance(info.get("settings"), dict):
        return {"id3.state": "dense", **info["settings"]}  # written before id3.state existed: dense
    out: dict[str, Any] = {}
    if "method" in info:
        out["method"] = info["method"]
    id3 = info.get("id3") or {}
    out.update({f"id3.{k}": id3[k] for k in _LEGACY_ID3 if k in id3})
    if "lr" in (info.get("train") or {}):
        out["train.lr"] = info["train"]["lr"]
    if "dtype" in (info.get("model") or {}):
        out["model.dtype"] = info["model"]["dtype"]
    return out


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for each key both sides know and that differs."""
    return [(k, saved[k], now[k]) for k in saved if k in now and saved[k] != now[k]]


def resume_target(cfg: RunConfig) -> Path | None:
    """The checkpoint `train.resume` names: auto -> the latest complete one in train.output_dir (None if
    there is none), a path -> that checkpoint, null -> None (start from step 0)."""
    target = cfg.train.resume
    if target in (None, "", "none"):
        return None
    if target == "auto":
        return latest_checkpoint(cfg.train.output_dir)
    return Path(target)


def check_resume(cfg: RunConfig) -> ResumePoint | None:
    """The checkpoint this run continues (None: it starts at step 0), or one ID3Error line saying why not."""
    ckpt = resume_target(cfg)
    _refuse_mixing(cfg, ckpt)
    if ckpt is None:
        return None
    info = read_complete(ckpt)
    diffs = differences(recorded_settings(info), settings(cfg))
    if diffs:
        _refuse_8bit_crossing(ckpt, diffs, cfg.train.resume_mismatch)
        fixed = [d for d in diffs if d[0] in _FIXED_KEYS]
        if fixed or cfg.train.resume_mismatch != "allow":
            raise ID3Error(_mismatch_line(ckpt, cfg, diffs, fixed))
    return ResumePoint(ckpt, info, int(info["step"]), diffs)


def _refuse_8bit_crossing(ckpt: Path, diffs: list[tuple[str, Any, Any]], mismatch: str) -> None:
    """train.resume_mismatch=allow cannot cross adamw_8bit and an fp32 optimizer: the saved optimizer state
    (bitsandbytes' uint8 codes and scales, or fp32 exp_avg/exp_avg_sq) would not load into the other."""
    for key, saved, now in diffs:
        if key == "train.optimizer" and "adamw_8bit" in (saved, now) and mismatch == "allow":
            raise ID3Error(
                f"{ckpt} holds train.optimizer={saved} state, which train.optimizer={now} cannot load (8-bit "
                f"and fp32 Adam moments do not convert): set train.optimizer={saved}, or a new train.output_dir"
            )


def already_finished(cfg: RunConfig) -> bool:
    """Check the resume before any process group, model or file exists; True: nothing to train.

    Every rank calls it and decides alike (they read the same files); rank 0 prints. A finished run prints
    where its results are and how to train again; allowed differences print as a note.
    """
    point = check_resume(cfg)
    if point is None:
        return False
    main = os.environ.get("RANK", "0") == "0"
    if point.differences and main:
        print(
            f"note: continuing {point.ckpt} with other settings than it was trained with "
            f"(train.resume_mismatch=allow): {_listed(point.differences)}",
            flush=True,
        )
    total = _known_total(point, cfg)
    if total is None or point.step < total or _asked_for_missing_outputs(cfg):
        return False  # resume() loads it and says so; the run then writes what it was asked for
    if main:
        out = cfg.train.output_dir
        print(
            f"nothing to train: {point.ckpt} already holds all {total} steps of this run, whose results are in "
            f"{out}; to train again set a new train.output_dir, or remove {Path(out) / 'checkpoint-*'} "
            "to start over there",
            flush=True,
        )
    return True


def _asked_for_missing_outputs(cfg: RunConfig) -> bool:
    """A finished run rerun with train.export_delta or train.save_final_model it has no result of yet: it
    resumes its last checkpoint, trains nothing and writes them (e.g. the README's export after the main job)."""
    out = Path(cfg.train.output_dir)
    return (cfg.train.export_delta and not (out / "delta").is_dir()) or (
        cfg.train.save_final_model and not (out / "final_model").is_dir()
    )


def _known_total(point: ResumePoint, cfg: RunConfig) -> int | None:
    """The run's total steps where the config and the checkpoint tell it without loading the data:
    train.steps, or the finished run's own total when epochs, data and global batch are the same."""
    if cfg.train.steps is not None:
        return cfg.train.steps
    train = point.info.get("train") or {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    same_batch = train.get("global_batch") == cfg.train.global_batch(world)
    if point.differences or not same_batch or "settings" not in point.info:
        return None
    return train.get("steps")


def _refuse_mixing(cfg: RunConfig, ckpt: Path | None) -> None:
    """Refuse to write checkpoints next to complete ones this run does not continue from."""
    out = Path(cfg.train.output_dir)
    if ckpt is not None and ckpt.resolve().parent == out.resolve():
        return
    found = list_checkpoints(out)
    if not found:
        return
    held = found[0].name if len(found) == 1 else f"{found[0].name} ... {found[-1].name}"
    why = (
        "train.resume=null starts over"
        if ckpt is None
        else f"this run continues {ckpt}, which is not in train.output_dir"
    )
    raise ID3Error(
        f"{why}, but {out} already holds checkpoints of another run ({held}) that a later resume would mix "
        f"with this run's; set a new train.output_dir, or remove them first (rm -r {out / 'checkpoint-*'})"
    )


def _mismatch_line(ckpt: Path, cfg: RunConfig, diffs: list, fixed: list) -> str:
    """One line: each differing key with both values, then the fixes that apply."""
    scratch = "set a new train.output_dir"
    if cfg.train.resume != "auto":
        scratch = f"drop train.resume={cfg.train.resume} (train.resume=auto) and {scratch}"
    line = f"{ckpt} was trained with other settings (checkpoint -> this run): {_listed(diffs)}; "
    line += f"to train this run's settings from scratch {scratch}"
    if fixed:
        weights = [k for k, _, _ in fixed if k not in _WHY_FIXED]
        why = (
            [f"{', '.join(weights)} {'changes' if len(weights) == 1 else 'change'} which weights train"]
            if weights
            else []
        )
        why += [f"{k}: {_WHY_FIXED[k]}" for k, _, _ in fixed if k in _WHY_FIXED]
        return line + f" ({'; '.join(why)}; so the checkpoint cannot be continued with them)"
    return line + ", or to continue the checkpoint with them anyway add train.resume_mismatch=allow"


def _listed(diffs: list[tuple[str, Any, Any]]) -> str:
    """`train.lr 0.003 -> 0.0001, data.path content sha256:1a2b... -> sha256:3c4d...` (none: no eval file)."""
    return ", ".join(
        f"{k} content {old or 'none'} -> {new or 'none'}"
        if k in DATA_KEYS
        else f"{k} {json.dumps(old)} -> {json.dumps(new)}"
        for k, old, new in diffs
    )


def _at(raw: dict, dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def content_digest(path: str | os.PathLike) -> str | None:
    """sha256 of a data file, or of a directory's JSON/JSONL files (names and bytes, as the data cache
    reads them); None when there is no such file. Cached per file size and mtime: checkpoints record it."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl")) if p.is_dir() else [p]
    try:
        stamp = tuple((str(f), st.st_size, st.st_mtime_ns) for f in files if (st := f.stat()))
    except OSError:
        return None
    return _digest(stamp) if stamp else None


@functools.lru_cache(maxsize=16)
def _digest(stamp: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in stamp:
        h.update(Path(name).name.encode())
        part = hashlib.sha256()
        with open(name, "rb") as f:
            while chunk := f.read(1 << 20):
                part.update(chunk)
        h.update(part.digest())
    return "sha256:" + h.hexdigest()[:16]

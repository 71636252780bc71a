"""Everything a run config can be checked for before any process group, model load or folder exists.

The recipe (id3_ds/recipe/train.py) calls `preflight(cfg)` right after `load_config`, so a bad ZeRO stage, data
or model path fails in seconds with one line instead of after the model loaded, and leaves nothing on disk.
Every rank runs the same checks on the same config and files, so every rank fails the same way:
`SameOnEveryRank` (id3_ds.errors) tells the launcher's error handler that rank 0 alone needs to say it.

Nothing here imports DeepSpeed or builds a model: `builtin:` models are checked by name only, `package:`
ones with importlib's finder (which does not import the package).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from id3_ds.config import RunConfig
from id3_ds.data.hub_data import check_hub_dataset, is_hub_dataset
from id3_ds.data.sources import check_source, is_source
from id3_ds.errors import ID3Error
from id3_ds.integration.ds_config import build_ds_config
from id3_ds.models.resolve import BUILTIN_MODELS, resolve_model
from id3_ds.plan import check_engine, zero_stage

DATA_SUFFIXES = (".json", ".jsonl")


def preflight(cfg: RunConfig, world: int | None = None) -> list[str]:
    """Check `cfg` against the DeepSpeed block and the file system (the config checked itself at load); returns
    notes worth one line each (rank 0 prints them). Raises ID3Error naming the key and the fix. Creates nothing."""
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    check_deepspeed(cfg, world)
    check_model(cfg)
    check_data(cfg)
    check_resume(cfg)
    check_tensorboard(cfg)
    check_writable("train.output_dir", cfg.train.output_dir)
    if cfg.data.cache_dir:
        check_writable("data.cache_dir", cfg.data.cache_dir)
    return [note.text() for note in cfg.path_notes.values()] + sparse_stage_notes(cfg)


def check_tensorboard(cfg: RunConfig) -> None:
    """train.tensorboard=true needs the tensorboard package: refused now, not found missing mid-run (when the
    run would train on without the logs asked for)."""
    if cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ID3Error(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard, or set "
            "train.tensorboard=false (log.jsonl holds every record either way)"
        )


def sparse_stage_notes(cfg: RunConfig) -> list[str]:
    """id3.state=sparse at ZeRO stage 1 or 2 runs as stage 0 (integration/ds_config.py says why): said once
    at start-up, so a user who asked for stage 2's partitioning is not left to find it in the log."""
    ds = cfg.deepspeed if isinstance(cfg.deepspeed, dict) else {}
    stage = zero_stage(ds.get("zero_optimization", {}))
    if not cfg.plan.sparse_state or stage not in (1, 2):
        return []
    return [
        f"id3.state=sparse runs ZeRO stage {stage} as stage 0: sparse state keeps no optimizer state or gradient "
        "partitions in DeepSpeed for stages 1-2 to split, so each rank holds the whole model plus the O(B) Adam "
        "state of the chosen entries; set deepspeed.zero_optimization.stage=3 to partition the weights too"
    ]


def check_deepspeed(cfg: RunConfig, world: int) -> None:
    """The DeepSpeed values id3-ds reads (and the ones ID3's masking cannot work with), before DeepSpeed does."""
    ds = cfg.deepspeed if isinstance(cfg.deepspeed, dict) else {}
    for name in ("zero_optimization", "fp16", "bf16", "optimizer", "data_types"):
        _object(ds, name, "deepspeed")
    zero = ds.get("zero_optimization", {})
    for name in ("offload_param", "offload_optimizer"):
        _object(zero, name, "deepspeed.zero_optimization")
    _object(ds.get("optimizer", {}), "params", "deepspeed.optimizer")
    stage = zero_stage(zero)
    check_engine(cfg, stage, zero, ds)  # the modes against the DeepSpeed block (id3_ds/plan.py)
    build_ds_config(cfg, world)  # its own checks: batch sizes against train, fp16, bf16, offload, optimizer, "auto"


def _object(section: dict, name: str, where: str) -> None:
    if name in section and not isinstance(section[name], dict):
        raise ID3Error(f"{where}.{name} must be a JSON object, got {section[name]!r}")


def check_model(cfg: RunConfig) -> None:
    """model.name_or_path names a known builtin, an installed package with a model, or a model directory."""
    spec = cfg.model.name_or_path
    if spec.startswith("builtin:"):  # by name only: materialising it is the run's job, on rank 0
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            raise ID3Error(
                f"unknown builtin model '{name}' in model.name_or_path; available: {', '.join(BUILTIN_MODELS)}"
            )
        return
    note = cfg.path_notes.get("model.name_or_path")
    if note is not None and not note.used.exists():  # names both readings and how to get the other
        raise ID3Error(note.text())
    resolve_model(spec, download=False)  # a package's model, a Hub name cached or downloadable, or a directory


def check_data(cfg: RunConfig) -> None:
    """data.path and data.eval_path are JSON/JSONL files or directories holding some."""
    for key, path in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)):
        if not path:
            continue
        if is_source(path):  # a named source (package:...): known name, package installed
            check_source(path)
            continue
        if is_hub_dataset(path):  # a Hub data set: in the HF cache, or downloads are allowed
            check_hub_dataset(path, key)
            continue
        p = Path(path)
        if p.is_dir():
            if not any(f.suffix in DATA_SUFFIXES for f in p.iterdir()):
                raise ID3Error(f"{key} {path} is a directory without a .json or .jsonl file")
        elif not p.is_file():
            _missing(cfg, key, f"set {key} to a JSON/JSONL file or a directory of them")


def check_resume(cfg: RunConfig) -> None:
    """A train.resume path names an existing checkpoint folder (auto and null need nothing)."""
    target = cfg.train.resume
    if target in (None, "", "auto", "none"):
        return
    if not Path(target).is_dir():
        _missing(cfg, "train.resume", "give a checkpoint-NNNNNNNN folder of an earlier run, or train.resume=auto")


def _missing(cfg: RunConfig, key: str, fix: str) -> None:
    """Raise for a path that does not exist: the path note's line when the other reading exists, since it
    names both and how to get the other; else the path and `fix`."""
    note = cfg.path_notes.get(key)
    if note is not None:
        raise ID3Error(note.text())
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    raise ID3Error(f"{key} {getattr(node, last)} does not exist; {fix}")


def check_writable(key: str, path: str) -> None:
    """The run can create `path` (or write into it) without creating anything now: the path itself when it
    exists, else its nearest existing ancestor, must be a writable directory."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    if p.exists() and not p.is_dir():
        raise ID3Error(f"{key} {path} is not writable: it is a file, not a directory; choose another directory")
    nearest = p
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ID3Error(f"{key} {path} is not writable: {nearest} is a file, not a directory; choose another directory")
    if not os.access(nearest, os.W_OK | os.X_OK):
        where = "" if nearest == p else f" ({nearest}, where it would be created, is not)"
        raise ID3Error(f"{key} {path} is not writable by this user{where}; choose another directory")

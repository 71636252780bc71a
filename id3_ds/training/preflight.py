"""Everything a run config can be checked for before any process group, model load or folder exists.

launch/train.py calls `preflight(cfg)` right after `load_config`, so a bad budget, ZeRO stage, data or
model path fails in seconds with one line instead of after the model loaded, and leaves nothing on disk.
Every rank runs the same checks on the same config and files, so every rank fails the same way:
`SameOnEveryRank` (id3_ds.errors) tells the launcher's error handler that rank 0 alone needs to say it.

Nothing here imports DeepSpeed or builds a model: `builtin:` models are checked by name only, `package:`
ones with importlib's finder (which does not import the package).
"""

from __future__ import annotations

import os
from pathlib import Path

from id3_ds.config import RunConfig
from id3_ds.data.hub_data import check_hub_dataset, is_hub_dataset
from id3_ds.data.sources import check_source, is_source
from id3_ds.errors import ID3Error

DATA_SUFFIXES = (".json", ".jsonl")
BF16_OPTIMIZER_ACCUM = ("fp32", "float32", "float")  # data_types.grad_accum_dtype values that pick it


def preflight(cfg: RunConfig, world: int | None = None) -> list[str]:
    """Check `cfg` against itself and the file system; returns notes worth one line each (rank 0 prints
    them). Raises ID3Error naming the key and the fix. Creates nothing."""
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    check_budget(cfg)
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
    import importlib.util

    if cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ID3Error(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard, or set "
            "train.tensorboard=false (log.jsonl holds every record either way)"
        )


def sparse_stage_notes(cfg: RunConfig) -> list[str]:
    """id3.state=sparse at ZeRO stage 1 or 2 runs as stage 0 (integration/ds_config.py says why): said once
    at start-up, so a user who asked for stage 2's partitioning is not left to find it in the log."""
    ds = cfg.deepspeed if isinstance(cfg.deepspeed, dict) else {}
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if cfg.id3.state != "sparse" or stage not in (1, 2):
        return []
    return [
        f"id3.state=sparse runs ZeRO stage {stage} as stage 0: sparse state keeps no optimizer state or gradient "
        "partitions in DeepSpeed for stages 1-2 to split, so each rank holds the whole model plus the O(B) Adam "
        "state of the chosen entries; set deepspeed.zero_optimization.stage=3 to partition the weights too"
    ]


def check_budget(cfg: RunConfig) -> None:
    """A count of entries must be >= 1 (ID3Config already keeps a float fraction inside (0, 1))."""
    budget = cfg.id3.budget
    if isinstance(budget, int) and budget < 1:
        raise ID3Error(
            f"id3.budget={budget}: give a count of entries >= 1 (e.g. id3.budget=100000) or a fraction in (0, 1) "
            "(e.g. id3.budget=0.001)"
        )


def check_deepspeed(cfg: RunConfig, world: int) -> None:
    """The DeepSpeed values id3-ds reads (and the ones ID3's masking cannot work with), before DeepSpeed does."""
    from id3_ds.integration.ds_config import build_ds_config
    from id3_ds.methods.registry import MASKED

    ds = cfg.deepspeed if isinstance(cfg.deepspeed, dict) else {}
    for name in ("zero_optimization", "fp16", "bf16", "optimizer", "data_types"):
        _object(ds, name, "deepspeed")
    zero = ds.get("zero_optimization", {})
    for name in ("offload_param", "offload_optimizer"):
        _object(zero, name, "deepspeed.zero_optimization")
    _object(ds.get("optimizer", {}), "params", "deepspeed.optimizer")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ID3Error(f"deepspeed.zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    check_quantization(cfg, stage)  # first: its lines name the quantization, not sparse state's own fixes
    check_sparse_state(cfg, stage, zero, ds)
    check_adamw_8bit(cfg, zero)
    build_ds_config(cfg, world)  # its own checks: batch sizes against train, fp16, bf16, offload, optimizer, "auto"
    if cfg.method not in MASKED:
        return
    # what integration/zero_slices.check_supported refuses once the engine exists, known from the config alone
    if zero.get("round_robin_gradients") is True:
        raise ID3Error(
            "deepspeed.zero_optimization.round_robin_gradients=true is not supported by ID3; set it to false"
        )
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if stage == 1 and cfg.model.dtype == "bf16" and accum in BF16_OPTIMIZER_ACCUM and not offloaded:
        raise ID3Error(
            "DeepSpeed's BF16_Optimizer (ZeRO-1 + bf16 + data_types.grad_accum_dtype=fp32) is not supported by "
            "ID3: drop grad_accum_dtype or use zero_optimization.stage 2"
        )


def check_sparse_state(cfg: RunConfig, stage: int, zero: dict, ds: dict) -> None:
    """id3.state=sparse: what it cannot run with, from the config alone (one line each, before any model loads).

    Sparse state writes chosen entries straight into each rank's ZeRO-3 partition (or the whole weight at
    stage 0) and keeps no DeepSpeed optimizer: anything that moves, re-partitions or quantizes those
    partitions, or a method that needs a dense optimizer or DeepSpeed's backward, cannot work with it.
    """
    if cfg.id3.state != "sparse":
        return
    if cfg.method in ("full", "lora"):
        raise ID3Error(
            f"id3.state=sparse needs a masked method, but method '{cfg.method}' trains densely; use id3.state=dense"
        )
    if cfg.method == "fish":
        raise ID3Error(
            "id3.state=sparse does not support method 'fish' (its Fisher pass needs DeepSpeed's "
            "optimizer); use id3.state=dense or another method"
        )
    if cfg.train.optimizer != "deepspeed":  # ignoring it would leave a user who asked for 8-bit moments with fp32
        raise ID3Error(
            f"id3.state=sparse keeps its own fp32 Adam for the chosen entries only, so train.optimizer="
            f"{cfg.train.optimizer} does not apply: drop train.optimizer or use id3.state=dense"
        )
    if cfg.lora.rank:
        raise ID3Error(
            "id3.state=sparse does not support ID3 over LoRA (lora.rank > 0); set lora.rank=0 or use id3.state=dense"
        )
    for name in ("offload_optimizer", "offload_param"):
        if zero.get(name, {}).get("device", "none") not in ("none", None):
            raise ID3Error(
                f"id3.state=sparse does not support deepspeed.zero_optimization.{name} (no offload): "
                f"drop {name} or use id3.state=dense"
            )
    if (zero.get("zero_hpz_partition_size") or 1) > 1:
        raise ID3Error(
            "id3.state=sparse does not support hpZ (deepspeed.zero_optimization.zero_hpz_partition_size"
            " > 1); set it to 1"
        )
    for name in ("zero_quantized_weights", "zero_quantized_nontrainable_weights"):
        if zero.get(name):
            raise ID3Error(f"id3.state=sparse does not support deepspeed.zero_optimization.{name}; set it to false")


def check_quantization(cfg: RunConfig, stage: int) -> None:
    """model.quantization (nf4/int8): the selectable linear weights become a bitsandbytes-packed base plus an
    overlay of chosen entries (models/quantized.py), which only the sparse-state update can train."""
    q = cfg.model.quantization
    if q == "none":
        return
    if stage == 3:
        raise ID3Error(
            f"model.quantization={q} does not work with ZeRO stage 3 (ZeRO-3 partitions nn.Parameters, and a "
            "bitsandbytes-packed base is none: every rank holds it whole); use deepspeed.zero_optimization.stage 2"
        )
    if cfg.train.save_final_model:
        raise ID3Error(
            f"train.save_final_model=true with model.quantization={q}: the trained model has no dense weights to "
            "save; set it to false (sparse ID3: merge its delta into the unquantized base)"
        )
    if cfg.method == "lora":  # QLoRA: PEFT's LoRA layers over bnb Linear4bit
        if q != "nf4" or cfg.data.format == "classification":
            raise ID3Error(
                f"method lora with model.quantization={q} supports nf4 on a causal LM (QLoRA) only; use "
                "model.quantization=nf4, or none"
            )
        return
    if cfg.lora.rank:
        raise ID3Error(
            f"model.quantization={q} does not support ID3 over LoRA (lora.rank > 0); set lora.rank=0 (sparse ID3 on "
            "the quantized base) or method=lora (QLoRA)"
        )
    if cfg.method in ("full", "fish", "bitfit"):
        why = {
            "full": "trains every weight densely",
            "fish": "needs DeepSpeed's optimizer for its Fisher pass",
            "bitfit": "trains biases and norms only, so no linear weight is selectable",
        }[cfg.method]
        raise ID3Error(f"model.quantization={q} does not support method '{cfg.method}' (it {why}); use method id3")
    if cfg.id3.state != "sparse":
        raise ID3Error(
            f"model.quantization={q} needs id3.state=sparse (a quantized base has no dense fp32 master for "
            "DeepSpeed's optimizer to update); set id3.state=sparse"
        )


def check_adamw_8bit(cfg: RunConfig, zero: dict) -> None:
    """train.optimizer=adamw_8bit: the one DeepSpeed set-up that cannot hold its 8-bit state.

    DeepSpeed's NVMe optimizer swapper (runtime/swap_tensor) swaps every state tensor through fp32 buffers of
    the partition's size; bitsandbytes' uint8 codes and per-block absmax are neither (read in its code, not run:
    NVMe needs libaio). Every stage 0-3 x fp32/bf16 x CPU offload combination trains (tests/test_adamw_8bit.py).
    """
    if cfg.train.optimizer != "adamw_8bit":
        return
    if zero.get("offload_optimizer", {}).get("device") == "nvme":
        raise ID3Error(
            "train.optimizer=adamw_8bit cannot be swapped to NVMe (DeepSpeed's optimizer swapper holds fp32 state "
            "only): set deepspeed.zero_optimization.offload_optimizer.device to cpu or none"
        )


def _object(section: dict, name: str, where: str) -> None:
    if name in section and not isinstance(section[name], dict):
        raise ID3Error(f"{where}.{name} must be a JSON object, got {section[name]!r}")


def check_model(cfg: RunConfig) -> None:
    """model.name_or_path names a known builtin, an installed package with a model, or a model directory."""
    from id3_ds.models.resolve import BUILTIN_MODELS, resolve_model

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

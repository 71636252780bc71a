"""The one JSON config of a training run: model, data, id3, train and deepspeed sections.

Strict on purpose: an unknown key or a wrong type is an error naming the dotted key, found before any
process group or model is created. pydantic checks the types and ranges; its first error becomes one
ID3Error line. Dotted overrides (`train.lr=1e-4`) are parsed as JSON where they
parse, else taken as strings.
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
)

from id3_ds.algorithm.config import ID3Config
from id3_ds.algorithm.id3 import unmask_horizon
from id3_ds.data.cache import DataSpec
from id3_ds.data.formats import FORMATS
from id3_ds.data.hub_data import looks_like_hub_dataset
from id3_ds.errors import ID3Error
from id3_ds.hub import looks_like_hub_id
from id3_ds.methods.registry import METHODS
from id3_ds.models.resolve import PREFIXES
from id3_ds.plan import RunPlan, check_modes, plan_of
from id3_ds.training.batches import global_batch

NonNegativeFloat = Annotated[float, Field(ge=0)]


class _Section(BaseModel):
    """Strict JSON: unknown keys are refused, and so are "3" for 3, true for 1 and NaN or infinite floats
    (ints do pass as floats)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelSection(_Section):
    name_or_path: str = ""
    dtype: Literal["bf16", "fp32"] = "bf16"
    gradient_checkpointing: bool = False
    # nf4 / int8: selectable linear weights stored by bitsandbytes (id3.state=sparse; models/quantized.py)
    quantization: Literal["none", "nf4", "int8"] = "none"


class DataSection(_Section):
    path: str = ""
    format: Literal[FORMATS] = "alpaca"
    max_length: PositiveInt = 512
    eval_path: str | None = None
    packing: bool = False
    labels: tuple[str, ...] | None = None
    cache_dir: str | None = None
    bad_records: Literal["error", "skip"] = "error"

    def spec(self, **changes: Any) -> DataSpec:
        """This section's fields that shape the tokens, as the cache's DataSpec, with `changes` on top (an
        eval set: another path, no packing, the training run's label names)."""
        own = self.model_dump(include=set(DataSpec.__dataclass_fields__))
        return DataSpec(**{**own, **changes})


class LoRASection(_Section):
    """PEFT LoRA: rank 0 = off. With method lora it trains densely; with a masked method (id3, ...) the
    mask is chosen inside the LoRA A/B matrices (plus id3.fully_trainable groups)."""

    rank: NonNegativeInt = 0
    alpha: PositiveFloat = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: list[str] | None = None


class TrainSection(_Section):
    steps: PositiveInt | None = None
    epochs: PositiveFloat | None = None
    lr: PositiveFloat = 1e-4
    weight_decay: NonNegativeFloat = 0.0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    optimizer: Literal["deepspeed", "torch_adamw", "adamw_8bit"] = "deepspeed"  # adamw_8bit: bitsandbytes
    warmup_steps: NonNegativeInt = 0
    max_grad_norm: float = 1.0
    micro_batch_size: PositiveInt = 1
    grad_accum: PositiveInt = 1
    seed: int = 42
    output_dir: str = "outputs/{config}-{method}"  # placeholders: expand_output_dir
    save_steps: NonNegativeInt = 0
    save_total_limit: PositiveInt | None = None  # keep the newest N complete checkpoints (checkpoint/rotation.py)
    log_steps: PositiveInt = 10
    eval_steps: NonNegativeInt = 0
    resume: str | None = "auto"
    resume_mismatch: Literal["refuse", "allow"] = "refuse"  # allow: continue a checkpoint of other settings
    export_delta: bool = False
    save_final_model: bool = False
    tensorboard: bool = False
    progress_bar: bool = True
    collective_timeout_s: PositiveInt = 1800

    def global_batch(self, world: int) -> int:
        """Examples per optimizer step over `world` ranks."""
        return global_batch(self.micro_batch_size, self.grad_accum, world)


class RunConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    id3: ID3Config = Field(default_factory=ID3Config)  # the algorithm's own config, validated here as a section
    train: TrainSection = Field(default_factory=TrainSection)
    lora: LoRASection = Field(default_factory=LoRASection)
    deepspeed: dict | str = Field(default_factory=dict)
    method: Literal[METHODS] = "id3"
    _path_notes: dict[str, PathNote] = PrivateAttr(default_factory=dict)

    @property
    def path_notes(self) -> dict[str, PathNote]:
        """Dotted path key -> PathNote, for the relative paths whose other reading also exists."""
        return self._path_notes

    @property
    def plan(self) -> RunPlan:
        """What this config runs (id3_ds/plan.py): every module asks it instead of re-deriving the mode."""
        return plan_of(self)

    def to_dict(self) -> dict:
        return self.model_dump()


def _validate(raw: Any) -> RunConfig:
    """The run config, or the first problem pydantic found as one ID3Error line naming the dotted key."""
    try:
        return RunConfig.model_validate_json(json.dumps(raw))  # JSON mode: arrays become tuples, strictly
    except ValidationError as e:
        raise _one_line(e.errors()[0], raw) from None


def _one_line(error: dict, raw: Any) -> ID3Error:
    """pydantic's error as one line: the dotted key, what is wrong with its value, what it should be."""
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx") or {}
    if kind == "value_error" and isinstance(ctx.get("error"), ID3Error):
        return ctx["error"]  # ID3Config's own check, already one line naming its key
    path, annotation = _field_at(loc)
    dotted = ".".join(path)
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        key = ".".join(str(part) for part in loc)
        return ID3Error(unknown_key_line(key, str(loc[-1]), _fields(annotation)))
    value = raw
    for part in path:
        value = value[part]
    if kind in ("model_type", "dataclass_type"):
        where = f"config section {dotted!r}" if path else "the config"
        return ID3Error(f"{where} must be a JSON object, got {type(value).__name__}")
    if kind == "finite_number":
        return ID3Error(f"config key {dotted!r} must be a finite number, got {value!r}")
    if kind == "literal_error":
        return ID3Error(f"config key {dotted!r} must be one of {list(typing.get_args(annotation))}, got {value!r}")
    bound = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    for name, op in bound.items():
        if name in ctx:
            return ID3Error(f"config key {dotted!r} must be {op} {ctx[name]:g}, got {value!r}")
    return ID3Error(f"config key {dotted!r} has the wrong type: got {value!r}, expected {_type_name(annotation)}")


# the names other fine-tuning tools (HF TrainingArguments, PEFT, DeepSpeed) give keys this config calls otherwise
ALIASES = {
    "learning_rate": "lr",
    "max_steps": "steps",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch_size",
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "warmup_ratio": "warmup_steps",
    "lr_scheduler_type": "lr_scheduler",
    "logging_steps": "log_steps",
    "model_name_or_path": "name_or_path",
    "r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "max_seq_length": "max_length",
    "dataset": "path",
}


def unknown_key_line(key: str, name: str, known: dict[str, Any] | list[str]) -> str:
    """The refusal of an unknown key: the near miss first (`train.learning_rate` -> did you mean `train.lr`?,
    by another tool's name or by spelling), then the keys of that section."""
    import difflib

    section = key[: -len(name)]
    guess = ALIASES.get(name) if ALIASES.get(name) in known else None
    if guess is None:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        guess = close[0] if close else None
    hint = f" (did you mean {section + guess!r}?)" if guess else ""
    return f"unknown config key {key!r}{hint}; known keys here: {', '.join(sorted(known))}"


def _fields(section: Any) -> dict[str, Any]:
    """Field name -> annotation of a config section (a pydantic model or a dataclass), else {}."""
    if isinstance(section, type) and issubclass(section, BaseModel):
        return {name: f.annotation for name, f in section.model_fields.items()}
    if isinstance(section, type) and hasattr(section, "__dataclass_fields__"):
        hints = typing.get_type_hints(section)
        return {name: hints[name] for name in section.__dataclass_fields__}
    return {}


def _field_at(loc: tuple) -> tuple[list[str], Any]:
    """The longest prefix of an error location that names config keys, and the annotation it ends at
    (the rest of the location is inside the value: a list index, a union member)."""
    path: list[str] = []
    annotation: Any = RunConfig
    for part in loc:
        fields = _fields(annotation)
        if part not in fields:
            break
        path.append(part)
        annotation = fields[part]
    return path, annotation


def _type_name(annotation: Any) -> str:
    """A JSON user's name for a type: `list[str]` for a tuple, `int | None`, without pydantic's constraints."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list[{_type_name(args[0])}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ID3Error(f"override '{text}' must look like section.key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ID3Error(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config.

    Relative paths written in the file are relative to the file's folder; those given as overrides are
    relative to the working directory; train.output_dir always is (see PATH_KEYS and docs/training.md, "Paths").
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ID3Error(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ID3Error(f"config file {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    overrides = overrides or []
    given = {".".join(parse_override(text)[0]) for text in overrides}
    if isinstance(raw, dict) and any(key.startswith("deepspeed.") for key in given):
        raw = _inline_deepspeed(raw, path.parent)  # `deepspeed.zero_optimization.stage=2` reaches into its file
    cfg = config_from_dict(apply_overrides(raw, overrides), base_dir=path.parent, given=given)
    return expand_output_dir(cfg, path.stem)


OUTPUT_DIR_FIELDS = ("method", "config")


def run_label(cfg: RunConfig) -> str:
    """What `{method}` stands for in train.output_dir: the method, then `-sparse` under id3.state=sparse and
    the base's quantization (`-nf4`, `-int8`): settings no checkpoint can be continued across, so a run
    that changes one of them starts in its own folder instead of being refused by the other's checkpoints."""
    label = cfg.method
    if cfg.plan.sparse_state:
        label += "-sparse"
    if cfg.model.quantization != "none":
        label += f"-{cfg.model.quantization}"
    return label


def expand_output_dir(cfg: RunConfig, config_name: str) -> RunConfig:
    """Fill `{method}` (see `run_label`) and `{config}` (the config file's stem) in train.output_dir, once, at load.

    So one config run with method=pafi does not land in (and resume from) the id3 run's folder, and the
    config.json a run writes names its concrete folder. Any other `{...}` is refused: a typo would otherwise
    become a folder name.
    """
    values = {"method": run_label(cfg), "config": config_name}
    out = re.sub(r"\{(\w*)\}", lambda m: values.get(m.group(1), m.group(0)), cfg.train.output_dir)
    if unknown := re.search(r"\{[^{}]*\}", out):
        known = " or ".join("{" + k + "}" for k in OUTPUT_DIR_FIELDS)
        raise ID3Error(
            f"train.output_dir {cfg.train.output_dir!r} has an unknown placeholder {unknown.group(0)}; use {known}"
        )
    cfg.train.output_dir = out
    return cfg


def config_from_dict(
    raw: dict, base_dir: str | Path = ".", given: set[str] | frozenset[str] = frozenset()
) -> RunConfig:
    """Validate a raw config; its relative paths are taken from `base_dir`, those of the dotted keys in `given`
    (command-line overrides) and train.output_dir from the working directory."""
    cfg = _validate(raw)
    base_dir = Path(base_dir)
    if not cfg.model.name_or_path:
        raise ID3Error("config key 'model.name_or_path' is required: a local Hugging Face model directory")
    if not cfg.data.path:
        raise ID3Error("config key 'data.path' is required: a JSON/JSONL file or a directory of them")
    _resolve_paths(cfg, base_dir, given)
    if isinstance(cfg.deepspeed, str):
        cfg.deepspeed = _read_deepspeed(cfg.deepspeed, cfg.path_notes.get("deepspeed"))
    if (cfg.train.steps is None) == (cfg.train.epochs is None):
        raise ID3Error("give exactly one of 'train.steps' and 'train.epochs'")
    _check_method(cfg)
    return cfg


def _check_method(cfg: RunConfig) -> None:
    """Combinations of method, lora, data and eval settings that cannot work, refused before any launch."""
    check_modes(cfg)
    t = cfg.train
    if t.steps:  # with train.epochs the run's steps are known once the data is read: ID3 checks then
        unmask_horizon(cfg.id3, t.steps)
    if t.eval_steps and not cfg.data.eval_path:
        raise ID3Error("train.eval_steps is set but data.eval_path is not: give an eval file or set eval_steps=0")
    if cfg.data.packing and cfg.data.format == "classification":
        raise ID3Error("data.packing does not apply to classification data; set data.packing=false")
    # alpaca/messages with data.labels: the eval set's responses are class names, ranked by likelihood
    if cfg.data.labels is not None and cfg.data.format not in ("classification", "alpaca", "messages"):
        raise ID3Error(f"data.labels does not apply to data.format '{cfg.data.format}'; remove it")
    if cfg.data.labels is not None and cfg.data.format != "classification" and not cfg.data.eval_path:
        raise ID3Error(
            f"data.labels with data.format '{cfg.data.format}' ranks the eval set's responses by likelihood: "
            "set data.eval_path, or remove data.labels"
        )


# -- paths --------------------------------------------------------------------------------------------
# One rule for every path in a config: a relative path written in the config file is relative to that
# file's folder (the config names its inputs the same way whoever runs it, from wherever); one given as a
# command-line override is relative to the working directory (as the shell the user types it into).
# The exception is train.output_dir, always relative to the working directory: results land where you run.
PATH_KEYS = (
    "model.name_or_path",
    "data.path",
    "data.eval_path",
    "data.cache_dir",
    "train.output_dir",
    "train.resume",
    "deepspeed",
)
WORKING_DIR_KEYS = ("train.output_dir",)
RESUME_WORDS = ("auto", "none")


@dataclass(frozen=True)
class PathNote:
    """A relative path whose other reading (config folder vs working directory) exists: worth one line,
    or the fix inside the error when the reading the rule chose does not exist."""

    key: str
    value: str  # as the user wrote it
    used: Path  # the rule's reading, absolute
    other: Path  # the other reading, which exists
    rule: str  # why `used`
    fix: str  # how to get `other` instead

    def text(self) -> str:
        where = f"{self.key} {self.value!r} is {self.used} ({self.rule})"
        if self.used.exists():
            return f"{where}; {self.other} also exists and is not used"
        return f"{where}, which does not exist; {self.other} does: {self.fix}"


def _is_path(key: str, value: Any) -> bool:
    """Whether a path key's value names a file or folder (not a model name, a resume keyword or empty)."""
    if not isinstance(value, str) or not value:
        return False
    if key in ("model.name_or_path", "data.path", "data.eval_path"):
        return not value.startswith(PREFIXES)  # builtin:/package: are names (models/resolve.py, data/sources.py)
    if key == "train.resume":
        return value not in RESUME_WORDS
    return True


def _resolve_paths(cfg: RunConfig, base_dir: Path, given: set[str] | frozenset[str]) -> None:
    """Apply the path rule to every path key of `cfg` in place, recording a PathNote where the other reading
    exists. Input paths become absolute, so output_dir/config.json reads the same from anywhere; output_dir
    stays as written (it already means the working directory)."""
    for key in PATH_KEYS:
        *parents, last = key.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        value = getattr(node, last)
        if not _is_path(key, value) or _hub_name(key, value, base_dir):
            continue
        on_cli = any(key == g or key.startswith(g + ".") for g in given)
        resolved, note = _resolve_one(key, value, base_dir, on_cli)
        setattr(node, last, os.path.expanduser(value) if key in WORKING_DIR_KEYS else resolved)
        if note is not None:
            cfg.path_notes[key] = note


def _hub_name(key: str, value: str, base_dir: Path) -> bool:
    """A model or data value shaped like a Hugging Face Hub name (`owner/name`, data `owner/name:split`) that
    exists under neither reading of a relative path: a Hub name, left as written (id3_ds/hub.py)."""
    if key not in ("model.name_or_path", "data.path", "data.eval_path"):
        return False
    if not (looks_like_hub_id(value) if key == "model.name_or_path" else looks_like_hub_dataset(value)):
        return False
    return not any((root / value).exists() for root in (Path.cwd(), Path(base_dir)))


def _resolve_one(key: str, value: str, base_dir: Path, on_cli: bool) -> tuple[str, PathNote | None]:
    """(absolute path by the rule, note if the other reading exists) for one path value."""
    path = Path(os.path.expanduser(value))  # os.path's leaves an unknown ~user as is; Path's raises
    if path.is_absolute():
        return str(path), None
    cwd, folder = Path.cwd(), Path(os.path.abspath(base_dir))
    here = on_cli or key in WORKING_DIR_KEYS
    used, other = (Path(os.path.abspath(root / path)) for root in ((cwd, folder) if here else (folder, cwd)))
    if used == other or not other.exists():
        return str(used), None
    if not here:
        rule = f"relative paths in a config file are relative to its folder {folder}"
        there = os.path.relpath(other, folder)
        fix = f"write {there!r} or an absolute path there, or give {key}={value} on the command line"
    elif on_cli:
        rule = "a relative path given on the command line is relative to the working directory"
        fix = f"give {key}={os.path.relpath(other, cwd)}"
    else:
        rule = f"{key} is relative to the working directory, where the run is started"
        fix = f"write the absolute path {other}"
    return str(used), PathNote(key, value, used, other, rule, fix)


def _read_deepspeed(path: str, note: PathNote | None) -> dict:
    """The DeepSpeed config a `deepspeed` path names, as a dict; one line if it is missing or not JSON."""
    try:
        ds = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ID3Error(note.text() if note else f"deepspeed config file {path} does not exist") from None
    except OSError as e:
        raise ID3Error(f"deepspeed config file {path!r} cannot be read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ID3Error(f"deepspeed config {path} is not valid JSON (line {e.lineno})") from None
    if not isinstance(ds, dict):
        raise ID3Error(f"deepspeed config {path} must hold a JSON object, got {type(ds).__name__}")
    return ds


def _inline_deepspeed(raw: dict, base_dir: Path) -> dict:
    """`raw` with its `deepspeed` file path replaced by the file's contents, so dotted overrides reach into it."""
    value = raw.get("deepspeed")
    if not isinstance(value, str) or not value:
        return raw
    path, note = _resolve_one("deepspeed", value, base_dir, on_cli=False)
    return {**raw, "deepspeed": _read_deepspeed(path, note)}

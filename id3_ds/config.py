"""The one JSON config of a training run: model, data, id3, train and deepspeed sections.

Strict on purpose: an unknown key or a wrong type is an error naming the dotted key, found before any
process group or model is created. Dotted overrides (`train.lr=1e-4`) are parsed as JSON where they
parse, else taken as strings.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from id3_ds.algorithm.config import ID3Config
from id3_ds.data.formats import FORMATS
from id3_ds.errors import ID3Error
from id3_ds.methods.registry import METHODS


@dataclass
class ModelSection:
    name_or_path: str = ""
    dtype: str = "bf16"
    gradient_checkpointing: bool = False
    _choices = {"dtype": ("bf16", "fp32")}


@dataclass
class DataSection:
    path: str = ""
    format: str = "alpaca"
    max_length: int = 512
    eval_path: str | None = None
    packing: bool = False
    labels: list[str] | None = None
    cache_dir: str | None = None
    bad_records: str = "error"
    _choices = {"format": FORMATS, "bad_records": ("error", "skip")}


@dataclass
class ID3Section:
    budget: int | float = 0.001
    eps: float = 1e-3
    exp: float = 1.0
    targets: list[str] = field(default_factory=lambda: ["*"])
    fully_trainable: list[str] = field(default_factory=list)
    bias_correction: str = "shared"
    no_decay: list[str] = field(default_factory=lambda: ["*bias", "*norm*"])
    fish_batches: int = 8
    _choices = {"bias_correction": ("shared", "per_entry")}

    def algorithm_config(self) -> ID3Config:
        return ID3Config(
            budget=self.budget,
            eps=self.eps,
            exp=self.exp,
            targets=tuple(self.targets),
            fully_trainable=tuple(self.fully_trainable),
            bias_correction=self.bias_correction,
            no_decay=tuple(self.no_decay),
        )


@dataclass
class LoRASection:
    """PEFT LoRA: rank 0 = off. With method lora it trains densely; with a masked method (id3, ...) the
    mask is chosen inside the LoRA A/B matrices (plus id3.fully_trainable groups)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None


@dataclass
class TrainSection:
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    optimizer: str = "deepspeed"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 1
    grad_accum: int = 1
    seed: int = 42
    output_dir: str = "outputs/run"
    save_steps: int = 0
    log_steps: int = 10
    eval_steps: int = 0
    resume: str | None = "auto"
    export_delta: bool = False
    save_final_model: bool = False
    tensorboard: bool = False
    progress_bar: bool = True
    collective_timeout_s: int = 1800
    _choices = {"lr_scheduler": ("constant", "linear", "cosine"), "optimizer": ("deepspeed", "torch_adamw")}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    id3: ID3Section = field(default_factory=ID3Section)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoRASection = field(default_factory=LoRASection)
    deepspeed: dict | str = field(default_factory=dict)
    method: str = "id3"
    _choices = {"method": METHODS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return isinstance(value, annotation)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ID3Error(f"config section '{where}' must be a JSON object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields:
            raise ID3Error(f"unknown config key '{dotted}'; known keys here: {', '.join(sorted(fields))}")
        ann = hints[key]
        if dataclasses.is_dataclass(ann):
            kwargs[key] = _build(ann, value, dotted)
            continue
        if not _type_ok(value, ann):
            raise ID3Error(f"config key '{dotted}' has the wrong type: got {value!r}, expected {_type_name(ann)}")
        choices = getattr(cls, "_choices", {}).get(key)
        if choices and value not in choices:
            raise ID3Error(f"config key '{dotted}' must be one of {list(choices)}, got {value!r}")
        if ann is float and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


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

    Relative paths inside it are taken from the working directory when they exist there, else from the
    config file's directory.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ID3Error(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ID3Error(f"config file {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    return config_from_dict(apply_overrides(raw, overrides or []), base_dir=path.parent)


def config_from_dict(raw: dict, base_dir: str | Path = ".") -> RunConfig:
    cfg = _build(RunConfig, raw, "")
    base_dir = Path(base_dir)
    if isinstance(cfg.deepspeed, str):
        ds_path = _resolve(cfg.deepspeed, base_dir)
        try:
            cfg.deepspeed = json.loads(Path(ds_path).read_text())
        except FileNotFoundError:
            raise ID3Error(f"deepspeed config file {ds_path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ID3Error(f"deepspeed config {ds_path} is not valid JSON (line {e.lineno})") from None
    if not cfg.model.name_or_path:
        raise ID3Error("config key 'model.name_or_path' is required: a local Hugging Face model directory")
    if not cfg.model.name_or_path.startswith(("builtin:", "package:")):
        cfg.model.name_or_path = _resolve(cfg.model.name_or_path, base_dir)
    if not cfg.data.path:
        raise ID3Error("config key 'data.path' is required: a JSON/JSONL file or a directory of them")
    cfg.data.path = _resolve(cfg.data.path, base_dir)
    if cfg.data.eval_path:
        cfg.data.eval_path = _resolve(cfg.data.eval_path, base_dir)
    t = cfg.train
    if (t.steps is None) == (t.epochs is None):
        raise ID3Error("give exactly one of 'train.steps' and 'train.epochs'")
    for key in ("micro_batch_size", "grad_accum"):
        if getattr(t, key) < 1:
            raise ID3Error(f"config key 'train.{key}' must be >= 1")
    if t.steps is not None and t.steps < 1:
        raise ID3Error("config key 'train.steps' must be >= 1")
    if t.weight_decay < 0 or t.lr <= 0:
        raise ID3Error("config keys 'train.lr' must be > 0 and 'train.weight_decay' >= 0")
    cfg.id3.algorithm_config()  # validates budget, eps, bias_correction
    _check_method(cfg)
    return cfg


def _check_method(cfg: RunConfig) -> None:
    """Combinations of method, lora, data and eval settings that cannot work, refused before any launch."""
    lora, t = cfg.lora, cfg.train
    if lora.rank < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
        raise ID3Error("config keys 'lora.rank' must be >= 0, 'lora.alpha' > 0 and 'lora.dropout' in [0, 1)")
    if cfg.method == "lora" and lora.rank == 0:
        raise ID3Error("method 'lora' needs lora.rank > 0 (e.g. lora.rank=8)")
    if cfg.method == "full" and lora.rank > 0:
        raise ID3Error("method 'full' trains every weight and ignores LoRA; set lora.rank=0 or use method 'lora'")
    if cfg.id3.fish_batches < 1:
        raise ID3Error("config key 'id3.fish_batches' must be >= 1 (sample batches for the Fisher estimate)")
    if t.eval_steps < 0:
        raise ID3Error("config key 'train.eval_steps' must be >= 0 (0: evaluate only at the end)")
    if t.eval_steps and not cfg.data.eval_path:
        raise ID3Error("train.eval_steps is set but data.eval_path is not: give an eval file or set eval_steps=0")
    if cfg.data.packing and cfg.data.format == "classification":
        raise ID3Error("data.packing does not apply to classification data; set data.packing=false")
    if t.export_delta and cfg.method in ("full", "lora"):
        raise ID3Error(
            f"train.export_delta: method '{cfg.method}' trains densely, so there is no sparse delta to export; "
            "set train.export_delta=false and keep the model with train.save_final_model=true"
        )
    # a plain classification run exports its fresh head whole (id3.fully_trainable); under LoRA it is PEFT's
    # trainable copy, which a delta cannot carry
    if t.export_delta and cfg.data.format == "classification" and lora.rank:
        raise ID3Error(
            "train.export_delta: this run trains a fresh classification head, which the base model does not "
            "hold, so a sparse delta against it cannot be written; set train.export_delta=false "
            "(train.save_final_model=true keeps the model)"
        )
    if cfg.data.labels is not None and cfg.data.format != "classification":
        raise ID3Error("data.labels applies only to data.format 'classification'; remove it")


def _resolve(p: str, base_dir: Path) -> str:
    path = Path(p).expanduser()
    return str(path if path.is_absolute() or path.exists() else (base_dir / path))

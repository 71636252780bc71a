"""Saving a run: DeepSpeed's engine state plus the mask shards, complete only when marked (layout.py).

What a checkpoint holds for the run's update is what its `parts` say (id3_ds/update/contract.py): DeepSpeed's
engine state (dense optimizer state), every rank's mask shard (masked methods), and the LR schedule an update
drives itself (sparse state, whose shards hold the chosen entries' fp32 masters and Adam moments, O(B)).

Every rank writes its DeepSpeed part and its mask shard, then rank 0 writes the COMPLETE marker; a
checkpoint without it never counts, so a run killed mid-save resumes from the one before.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from id3_ds.checkpoint.compat import settings
from id3_ds.checkpoint.disk import ensure_disk_for_checkpoint
from id3_ds.checkpoint.layout import (
    DS_TAG,
    checkpoint_dir,
    mark_complete,
    write_id3_shard,
    write_lora_state,
    write_trainer_state,
)
from id3_ds.checkpoint.rotation import after_save
from id3_ds.errors import ID3Error
from id3_ds.files.atomic import staged_dir
from id3_ds.integration.params import full_shape, gathered
from id3_ds.models.lora_names import is_lora_param
from id3_ds.models.quantized import quantized_names
from id3_ds.runtime.faults import maybe_kill
from id3_ds.runtime.watchdog import beat

if TYPE_CHECKING:
    from id3_ds.config import RunConfig
    from id3_ds.update.contract import Update


def check_output_dir(output_dir: str, is_main: bool) -> None:
    """Refuse an unwritable output directory before any work is done."""
    if not is_main:
        return
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ID3Error(
            f"train.output_dir {output_dir} is not writable ({e.strerror}); choose another directory"
        ) from None


def save(engine, update: Update, cfg: RunConfig, step: int, model_dir: str) -> Path:
    """Write checkpoint-<step>: every rank its parts (DeepSpeed's, its mask shard), then rank 0 marks it complete."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ensure_disk_for_checkpoint(cfg.train.output_dir, engine)
    ckpt = checkpoint_dir(cfg.train.output_dir, step)
    if rank == 0 and ckpt.exists():  # an incomplete leftover of a killed run at this very step
        shutil.rmtree(ckpt)
    dist.barrier()
    beat()
    if update.parts.engine:
        engine.save_checkpoint(str(ckpt / "ds"), tag=DS_TAG, save_latest=False)
    beat()
    maybe_kill("kill_during_save", step, rank)
    state = update.state_dict()
    if update.parts.mask:
        write_id3_shard(ckpt, rank, world, state.mask, state.meta)
        _save_lora(engine.module, ckpt, rank)
    if update.parts.trainer and rank == 0:
        write_trainer_state(ckpt, state.trainer)
    dist.barrier()
    beat()
    classify = cfg.data.format == "classification" and not cfg.lora.rank
    if rank == 0:
        mark_complete(
            ckpt,
            {
                "step": step,
                "world_size": world,
                "method": cfg.method,
                "zero_stage": engine.zero_optimization_stage(),
                "model": {
                    "name_or_path": model_dir,
                    "dtype": cfg.model.dtype,
                    "quantization": cfg.model.quantization,  # and which weights: the export re-quantizes them
                    "quantized": quantized_names(engine.module),
                },
                **({"classification": classification_info(engine.module)} if classify else {}),
                "id3": {**cfg.id3.__dict__, "budget_entries": state.budget},
                "train": {
                    "steps": update.steps,
                    "lr": cfg.train.lr,
                    "global_batch": cfg.train.global_batch(world),
                },
                "settings": settings(cfg),  # what a resume compares (compat.py)
                "config": cfg.to_dict(),  # the whole run config, for the record
            },
        )
        after_save(ckpt, cfg, state.budget, cfg.plan.sparse_state)  # save_total_limit; size note
    dist.barrier()
    return ckpt


def classification_info(model) -> dict:
    """What export needs to turn a classification run into a delta against its base (a plain, non-PEFT model):
    the architecture, the prefix that base parameter names lose in the base file (`bert.` for a BertModel
    base), the fresh head's parameters (those outside that prefix) and the config.json keys a merge must set."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    c = model.config
    updates = {
        "architectures": [type(model).__name__],
        "num_labels": int(c.num_labels),
        "id2label": {str(k): v for k, v in c.id2label.items()},
        "label2id": {str(k): int(v) for k, v in c.label2id.items()},
    }
    if getattr(c, "pad_token_id", None) is not None:
        updates["pad_token_id"] = int(c.pad_token_id)
    if getattr(c, "problem_type", None) is not None:
        updates["problem_type"] = c.problem_type
    head = {n: list(full_shape(p)) for n, p in model.named_parameters() if not (prefix and n.startswith(prefix + "."))}
    return {"architecture": type(model).__name__, "base_model_prefix": prefix, "head": head, "config_updates": updates}


def _whole_on_rank0(named: list, rank: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """CPU copies of whole parameters on rank 0 ({} elsewhere); every rank must call it. Under ZeRO-3 each
    parameter is gathered alone, so memory holds one whole parameter above the partitions at a time."""
    out = {}
    for name, p in named:
        with gathered([p]):
            if rank == 0:
                out[name] = p.detach().to(dtype or p.dtype).cpu().clone()
    return out


def _save_lora(model, ckpt: Path, rank: int) -> None:
    """A PEFT LoRA model's A/B matrices, whole and fp32, into id3/lora.safetensors (rank 0 writes).

    The delta of a LoRA run needs A's random init, which the base model does not hold; export rebuilds it
    from these and the shards' base values. Every rank must call this (ZeRO-3 gathers the matrices).
    """
    config = (getattr(model, "peft_config", None) or {}).get("default")
    params = [(n, p) for n, p in model.named_parameters() if is_lora_param(n)]
    if config is None or not params:
        return
    tensors = _whole_on_rank0(params, rank, torch.float32)
    if rank == 0:
        targets = config.target_modules
        settings = {
            "rank": int(config.r),
            "alpha": float(config.lora_alpha),
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
            "use_rslora": bool(config.use_rslora),
            "use_dora": bool(getattr(config, "use_dora", False)),
            "fan_in_fan_out": bool(config.fan_in_fan_out),
            "rank_pattern": dict(config.rank_pattern or {}),
            "alpha_pattern": dict(config.alpha_pattern or {}),
        }
        write_lora_state(ckpt, tensors, settings)


def save_final_model(engine, model_dir: str, out_dir: str) -> None:
    """The consolidated trained model as a Hugging Face directory (rank 0 writes; ZeRO-3 gathers per tensor).

    Written to a temp directory and renamed, so a crash never leaves a loadable half model.
    """
    rank = dist.get_rank()
    state = _whole_on_rank0(list(engine.module.named_parameters()), rank)
    if rank == 0:
        out = Path(out_dir)
        with staged_dir(out, exists="replace") as tmp:
            engine.module.save_pretrained(tmp, state_dict=state)
            for f in Path(model_dir).iterdir():  # tokenizer files travel with the weights
                if f.is_file() and ("token" in f.name or f.name == "special_tokens_map.json"):
                    shutil.copy2(f, tmp / f.name)
    dist.barrier()

"""Saving and resuming a run: DeepSpeed's engine state plus the ID3 shards, complete only when marked.

Same world size and ZeRO stage: DeepSpeed's own checkpoint restores weights, optimizer moments and
scheduler, and the ID3 shards restore the mask, so the run continues bit-for-bit. Another world size
(or ZeRO-1 <-> ZeRO-2): DeepSpeed's partitioned files do not re-partition, so rank 0 converts them once
into DeepSpeed's universal checkpoint (`ds_universal/`: per-parameter fp32 values, Adam moments and
step) and every rank loads its new partition of it, scheduler included: the run continues like the
uninterrupted one up to floating-point reduction order. Stage 0 to stage 0 needs no conversion (its
optimizer state is whole on every rank). Elsewhere (stage 0 against 1-3, ZeRO-1/2 against ZeRO-3, whose
universal files DeepSpeed 0.19 cannot cross-load, or a conversion that fails) the model does not need
DeepSpeed's files: unchosen entries equal the pretrained weights (already loaded) and the shards hold
every chosen entry's fp32 value, so weights and mask are restored exactly and Adam's moments restart from
zero (logged with the reason).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from id3_ds.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    mark_complete,
    read_complete,
    read_id3_state,
    write_id3_shard,
    write_lora_state,
)
from id3_ds.config import RunConfig
from id3_ds.errors import ID3Error
from id3_ds.io import fsync_dir
from id3_ds.training.faults import maybe_kill
from id3_ds.training.guards import beat, ensure_disk_for_checkpoint, start_watchdog

__all__ = ["check_output_dir", "checkpoint_dir", "resume", "save", "save_final_model"]
DS_TAG = "state"
UNIVERSAL = "ds_universal"  # DeepSpeed's universal checkpoint of ds/, made on a resume that needs it


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


def save(engine, hook, cfg: RunConfig, step: int, model_dir: str) -> Path:
    """Write checkpoint-<step>: every rank its DeepSpeed part and ID3 shard, then rank 0 marks it complete."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ensure_disk_for_checkpoint(cfg.train.output_dir, engine)
    ckpt = checkpoint_dir(cfg.train.output_dir, step)
    if rank == 0 and ckpt.exists():  # an incomplete leftover of a killed run at this very step
        shutil.rmtree(ckpt)
    dist.barrier()
    beat()
    engine.save_checkpoint(str(ckpt / "ds"), tag=DS_TAG, save_latest=False)
    beat()
    maybe_kill("kill_during_save", step, rank)
    if hook is not None:
        write_id3_shard(ckpt, rank, world, hook.shard_state(), hook.id3.state_meta())
        _save_lora(engine.module, ckpt, rank)
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
                "model": {"name_or_path": model_dir, "dtype": cfg.model.dtype},
                **({"classification": classification_info(engine.module)} if classify else {}),
                "id3": {**cfg.id3.__dict__, "budget_entries": hook.id3.budget if hook else None},
                "train": {
                    "steps": hook.id3.schedule.steps if hook else None,
                    "lr": cfg.train.lr,
                    "global_batch": global_batch(cfg, world),
                },
            },
        )
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
    head = {
        n: list(getattr(p, "ds_shape", p.shape))
        for n, p in model.named_parameters()
        if not (prefix and n.startswith(prefix + "."))
    }
    return {"architecture": type(model).__name__, "base_model_prefix": prefix, "head": head, "config_updates": updates}


def _whole_on_rank0(named: list, rank: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """CPU copies of whole parameters on rank 0 ({} elsewhere); every rank must call it. Under ZeRO-3 each
    parameter is gathered alone, so memory holds one whole parameter above the partitions at a time."""
    import deepspeed

    out = {}
    for name, p in named:
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            if rank == 0:
                out[name] = p.detach().to(dtype or p.dtype).cpu().clone()
    return out


def _save_lora(model, ckpt: Path, rank: int) -> None:
    """A PEFT LoRA model's A/B matrices, whole and fp32, into id3/lora.safetensors (rank 0 writes).

    The delta of a LoRA run needs A's random init, which the base model does not hold; export rebuilds it
    from these and the shards' base values. Every rank must call this (ZeRO-3 gathers the matrices).
    """
    from id3_ds.delta.lora import is_lora_param

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


def resume(engine, hook, cfg: RunConfig, world: int) -> int:
    """Restore the latest complete checkpoint (or the one named by train.resume); returns the next step.

    Also starts the progress watchdog: from here on, a rank that waits longer than
    train.collective_timeout_s for its peers ends the job.
    """
    start_watchdog(cfg.train.collective_timeout_s)
    target = cfg.train.resume
    if target in (None, "", "none"):
        return 0
    if target == "auto":
        ckpt = latest_checkpoint(cfg.train.output_dir)
        if ckpt is None:
            return 0
    else:
        ckpt = Path(target)
    info = read_complete(ckpt)
    if info.get("method") != cfg.method:
        raise ID3Error(f"checkpoint {ckpt} was trained with method={info.get('method')}, this run uses {cfg.method}")
    stage = engine.zero_optimization_stage()
    same_world = info.get("world_size") == world and info.get("zero_stage") == stage
    if same_world:
        _load_deepspeed(engine, ckpt / "ds")
        moments = None
    else:
        moments = _load_resharded(engine, ckpt, info)
    if hook is not None:
        state, meta = read_id3_state(ckpt)
        hook.id3.load_state(state, meta)
        if not same_world:  # exact fp32 values of the chosen entries, whatever DeepSpeed restored
            _restore_chosen_values(engine, hook, state)
    step = int(info["step"])
    note = global_batch_note(info, cfg, world)
    if note and dist.get_rank() == 0:
        print(note, flush=True)
    if not same_world:
        if moments is not None:  # DeepSpeed's optimizer and scheduler state was not loaded
            _fast_forward_scheduler(engine, step)
        if dist.get_rank() == 0:
            how = (
                "weights, mask and optimizer moments restored"
                if moments is None
                else f"weights and mask restored exactly, optimizer moments restart ({moments})"
            )
            print(
                f"resumed {ckpt} saved by {info.get('world_size')} ranks at ZeRO-{info.get('zero_stage')} on "
                f"{world} ranks at ZeRO-{stage}: {how}",
                flush=True,
            )
    return step


def global_batch(cfg: RunConfig, world: int) -> int:
    """Examples per optimizer step over all ranks: what a resume must keep to continue the same run."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum * world


def global_batch_note(info: dict, cfg: RunConfig, world: int) -> str | None:
    """A resume with another global batch is allowed (a deliberate change) but no longer the same run."""
    saved = (info.get("train") or {}).get("global_batch")
    now = global_batch(cfg, world)
    if saved is None or saved == now:
        return None
    per_accum = cfg.train.micro_batch_size * world
    fix = f"; set train.grad_accum={saved // per_accum} to match" if saved % per_accum == 0 else ""
    return (
        f"note: the checkpoint's global batch was {saved} examples per step, this run's is {now} "
        f"(micro_batch_size x grad_accum x {world} ranks): the run continues, but not as the original would{fix}"
    )


def _load_deepspeed(engine, path: Path) -> None:
    loaded, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_lr_scheduler_states=True)
    if loaded is None:
        raise ID3Error(f"DeepSpeed could not load {path}: the checkpoint is incomplete or corrupt")


def _load_resharded(engine, ckpt: Path, info: dict) -> str | None:
    """Load DeepSpeed's state saved by another world size or stage; None, or why the moments restart.

    ZeRO-1/2 to ZeRO-1/2, or ZeRO-3 to ZeRO-3: DeepSpeed's universal checkpoint, converted once by rank 0
    and loaded by every rank with the engine's `load_universal_checkpoint` setting (what the config key
    `checkpoint.load_universal` sets; DeepSpeed reads it only in load_checkpoint) on for this load only.
    Stage 0 on both sides: its optimizer state is whole in every rank's file, DeepSpeed loads it as is.
    """
    src, dst = info.get("zero_stage"), engine.zero_optimization_stage()
    if src == 0 and dst == 0:
        _load_deepspeed(engine, ckpt / "ds")
        return None
    if src == 0 or dst == 0:
        return f"DeepSpeed's universal checkpoint needs ZeRO stage 1-3 on both sides, not ZeRO-{src} -> ZeRO-{dst}"
    if (src == 3) != (dst == 3):  # DeepSpeed 0.19: ZeRO-1/2 and ZeRO-3 universal files differ in names and layout
        return f"DeepSpeed's universal checkpoint does not load across ZeRO-{src} -> ZeRO-{dst}"
    reason = _convert_to_universal(ckpt) if dist.get_rank() == 0 else None
    box = [reason]
    dist.broadcast_object_list(box, src=0)  # the wait is bounded by train.collective_timeout_s
    beat()
    if box[0] is not None:
        return box[0]
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        loaded, _ = engine.load_checkpoint(str(ckpt / UNIVERSAL), tag=DS_TAG, load_lr_scheduler_states=True)
    except Exception as e:  # optimizer state may be half loaded: going on would train from a mix
        raise ID3Error(
            f"loading DeepSpeed's universal checkpoint {ckpt / UNIVERSAL} failed ({type(e).__name__}: "
            f"{str(e)[:200]}); resume on {info.get('world_size')} ranks at ZeRO-{src} instead"
        ) from e
    finally:
        config.load_universal_checkpoint = False
    beat()
    if loaded is None:
        raise ID3Error(f"DeepSpeed could not load {ckpt / UNIVERSAL}: the universal checkpoint is incomplete")
    return None


def _convert_to_universal(ckpt: Path) -> str | None:
    """Rank 0: ckpt/ds -> ckpt/ds_universal (built aside, then renamed; kept for later resumes).

    Returns None, or why it could not be made. DeepSpeed's converter prints progress: it is kept quiet.
    """
    out = ckpt / UNIVERSAL
    if (out / "latest_universal").is_file():
        return None
    source = ckpt / "ds" / DS_TAG
    if not any(source.glob("*_optim_states.pt")):
        return f"{source} holds no ZeRO optimizer files to convert"
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = ckpt / f".{UNIVERSAL}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for leftover in ckpt.glob(f".{UNIVERSAL}.tmp-*"):  # of a conversion killed midway
        shutil.rmtree(leftover, ignore_errors=True)
    args = Namespace(
        input_folder=str(source),
        output_folder=str(tmp / DS_TAG),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # engine.save_checkpoint records no universal_checkpoint_info without AutoTP
    )
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            ds_to_universal(args)
    except Exception as e:  # DeepSpeed raises assorted errors (AssertionError, KeyError, ...) on layouts it lacks
        shutil.rmtree(tmp, ignore_errors=True)
        return f"converting to DeepSpeed's universal checkpoint failed: {type(e).__name__}: {str(e)[:200]}"
    if out.exists():  # not ours (no latest_universal): replaced
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_dir(ckpt)
    return None


def _restore_chosen_values(engine, hook, state) -> None:
    """Write every chosen entry's saved fp32 value into this rank's masters and model weights."""
    params = dict(engine.module.named_parameters())
    stage = engine.zero_optimization_stage()
    for h in hook.id3.held:
        pm = state.params.get(h.info.name)
        if pm is None or len(h.mask) == 0:
            continue
        lo = int(torch.searchsorted(pm.indices, torch.tensor(h.info.start)))
        vals = pm.value[lo : lo + len(h.mask)]
        h.access.value()[h.mask.positions] = vals
        p = params[h.info.name]
        if stage == 3:  # the model's own low-precision partition starts at the same offset
            p.ds_tensor.data.view(-1)[h.mask.positions] = vals.to(p.ds_tensor.dtype)
    if stage != 3:  # replicated model weights: every rank writes every chosen entry
        for name, pm in state.params.items():
            p = params[name]
            if p.data.data_ptr() != 0:
                p.data.view(-1)[pm.indices] = pm.value.to(p.dtype)


def _fast_forward_scheduler(engine, step: int) -> None:
    sched = engine.lr_scheduler
    if sched is not None:
        for _ in range(step):
            sched.step()
    engine.global_steps = step


def save_final_model(engine, model_dir: str, out_dir: str) -> None:
    """The consolidated trained model as a Hugging Face directory (rank 0 writes; ZeRO-3 gathers per tensor).

    Written to a temp directory and renamed, so a crash never leaves a loadable half model.
    """
    rank = dist.get_rank()
    state = _whole_on_rank0(list(engine.module.named_parameters()), rank)
    if rank == 0:
        out = Path(out_dir)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(tmp, state_dict=state)
        for f in Path(model_dir).iterdir():  # tokenizer files travel with the weights
            if f.is_file() and ("token" in f.name or f.name == "special_tokens_map.json"):
                shutil.copy2(f, tmp / f.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    dist.barrier()

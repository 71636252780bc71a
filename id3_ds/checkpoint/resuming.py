"""Resuming a run: DeepSpeed's engine state plus the mask shards, on the same or another world size.

Same world size and ZeRO stage: DeepSpeed's own checkpoint restores weights, optimizer moments and
scheduler, and the mask shards restore the mask, so the run continues bit-for-bit. Another world size
(or ZeRO-1 <-> ZeRO-2): DeepSpeed's partitioned files do not re-partition, so rank 0 converts them once
into DeepSpeed's universal checkpoint (`ds_universal/`: per-parameter fp32 values, Adam moments and
step) and every rank loads its new partition of it, scheduler included: the run continues like the
uninterrupted one up to floating-point reduction order. Stage 0 to stage 0 needs no conversion (its
optimizer state is whole on every rank). Elsewhere (stage 0 against 1-3, ZeRO-1/2 against ZeRO-3, whose
universal files DeepSpeed 0.19 cannot cross-load, or a conversion that fails) the model does not need
DeepSpeed's files: unchosen entries equal the pretrained weights (already loaded) and the shards hold
every chosen entry's fp32 value, so weights and mask are restored exactly and Adam's moments restart from
zero (logged with the reason). A dense method (full, lora) has no shards: DeepSpeed's files are its weights,
so there it resumes only where they load, and says so in one line. Sparse state has no DeepSpeed state at
all: its shards hold every chosen entry's fp32 master and moments in global coordinates, so any world size
loads them exactly, and its LR schedule comes from id3/trainer_state.json. One path serves every update:
it loads the parts the update's checkpoint consists of (`update.parts`) and hands them to
`update.load_state_dict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from id3_ds.checkpoint.compat import check_resume
from id3_ds.checkpoint.layout import DS_TAG, UNIVERSAL, read_id3_state, read_trainer_state
from id3_ds.errors import ID3Error
from id3_ds.files.atomic import staged_dir
from id3_ds.integration.engine_state import (
    fast_forward_scheduler,
    load_checkpoint,
    load_universal_checkpoint,
    set_step_counters,
)
from id3_ds.integration.universal import convert_to_universal
from id3_ds.runtime.watchdog import beat, start_watchdog
from id3_ds.update.contract import UpdateState

if TYPE_CHECKING:
    from id3_ds.config import RunConfig
    from id3_ds.update.contract import Update


def resume(engine, update: Update, cfg: RunConfig, world: int) -> int:
    """Restore the latest complete checkpoint (or the one named by train.resume); returns the next step.

    Refuses (ID3Error) a checkpoint trained with other settings, as `compat.already_finished` did before the
    model was built (checked again for callers that skip it). Rank 0 prints one line: which checkpoint,
    at which step of how many, and, on another world size or stage, what was restored. Also starts the
    progress watchdog: from here on, a rank that waits longer than train.collective_timeout_s for its
    peers ends the job.
    """
    start_watchdog(cfg.train.collective_timeout_s)
    point = check_resume(cfg)
    if point is None:
        return 0
    ckpt, info, step = point.ckpt, point.info, point.step
    parts = update.parts
    stage = engine.zero_optimization_stage()
    same_world = info.get("world_size") == world and (not parts.engine or info.get("zero_stage") == stage)
    moments = None  # why DeepSpeed's optimizer state was not loaded, if it was not
    if parts.engine and same_world:
        load_checkpoint(engine, ckpt / "ds", DS_TAG, cfg.plan.strict_load)
    elif parts.engine:
        moments = _load_resharded(engine, ckpt, info, cfg.plan.strict_load, cfg.train.optimizer == "adamw_8bit")
        if moments is not None and not parts.mask:  # DeepSpeed loaded nothing, weights included
            raise ID3Error(  # no mask shards to restore the weights from: DeepSpeed's files are all there is
                f"{ckpt} was saved by {info.get('world_size')} ranks at ZeRO-{info.get('zero_stage')}; a "
                f"method {cfg.method} run resumes only there ({moments}): resume on "
                f"{info.get('world_size')} ranks at ZeRO-{info.get('zero_stage')}"
            )
    state = UpdateState()
    if parts.mask:
        state.mask, state.meta = read_id3_state(ckpt)
    if parts.trainer:
        state.trainer = read_trainer_state(ckpt)
    update.load_state_dict(state, engine_exact=same_world)
    note = global_batch_note(info, cfg, world) if parts.engine else None
    if note and dist.get_rank() == 0:
        print(note, flush=True)
    if not same_world and moments is not None:  # DeepSpeed's optimizer and scheduler state was not loaded
        fast_forward_scheduler(engine, step)
        set_step_counters(engine, step)
    if dist.get_rank() == 0:
        how = _how(info, world, stage, parts.engine, moments)
        print(f"resumed from {ckpt} at step {_of(step, update.steps or cfg.train.steps)}{how}", flush=True)
    return step


def _how(info: dict, world: int, stage: int, engine_state: bool, moments: str | None) -> str:
    """What a resume on another world size (or stage) restored; empty on the same one."""
    was_world, was_stage = info.get("world_size"), info.get("zero_stage")
    if not engine_state:  # the shards hold every chosen entry's master and moments, in global coordinates
        return (
            ""
            if was_world == world
            else f", saved by {was_world} ranks, now {world}: weights, mask and moments restored"
        )
    if was_world == world and was_stage == stage:
        return ""
    how = (
        "weights, mask and optimizer moments restored"
        if moments is None
        else f"weights and mask restored exactly, optimizer moments restart ({moments})"
    )
    return f", saved by {was_world} ranks at ZeRO-{was_stage}, now {world} ranks at ZeRO-{stage}: {how}"


def _of(step: int, total: int | None) -> str:
    """`20 of 40`; a finished run says so (compat.already_finished stops it earlier where the total is known)."""
    if total is None:
        return str(step)
    return f"{step} of {total}" + (" (the run is already complete: nothing to train)" if step >= total else "")


def global_batch_note(info: dict, cfg: RunConfig, world: int) -> str | None:
    """A resume with another global batch is allowed (a deliberate change) but no longer the same run."""
    saved = (info.get("train") or {}).get("global_batch")
    now = cfg.train.global_batch(world)
    if saved is None or saved == now:
        return None
    per_accum = cfg.train.micro_batch_size * world
    fix = f"; set train.grad_accum={saved // per_accum} to match" if saved % per_accum == 0 else ""
    return (
        f"note: the checkpoint's global batch was {saved} examples per step, this run's is {now} "
        f"(micro_batch_size x grad_accum x {world} ranks): the run continues, but not as the original would{fix}"
    )


def _load_resharded(engine, ckpt: Path, info: dict, strict: bool = True, eight_bit: bool = False) -> str | None:
    """Load DeepSpeed's state saved by another world size or stage; None, or why the moments restart.

    ZeRO-1/2 to ZeRO-1/2, or ZeRO-3 to ZeRO-3: DeepSpeed's universal checkpoint, converted once by rank 0
    and loaded by every rank. Stage 0 on both sides: its optimizer state is whole in every rank's file,
    DeepSpeed loads it as is. 8-bit moments (`eight_bit`: bitsandbytes' per-block codes and absmax) have no
    universal form: the universal converter knows fp32 Adam moments only, so they restart.
    """
    src, dst = info.get("zero_stage"), engine.zero_optimization_stage()
    if src == 0 and dst == 0:
        load_checkpoint(engine, ckpt / "ds", DS_TAG, strict)
        return None
    if eight_bit:
        return "8-bit optimizer states (train.optimizer=adamw_8bit) do not re-partition"
    if src == 0 or dst == 0:
        return f"DeepSpeed's universal checkpoint needs ZeRO stage 1-3 on both sides, not ZeRO-{src} -> ZeRO-{dst}"
    if (src == 3) != (dst == 3):  # DeepSpeed 0.19: ZeRO-1/2 and ZeRO-3 universal files differ in names and layout
        return f"DeepSpeed's universal checkpoint does not load across ZeRO-{src} -> ZeRO-{dst}"
    reason = _make_universal(ckpt) if dist.get_rank() == 0 else None
    box = [reason]
    dist.broadcast_object_list(box, src=0)  # the wait is bounded by train.collective_timeout_s
    beat()
    if box[0] is not None:
        return box[0]
    try:
        load_universal_checkpoint(engine, ckpt / UNIVERSAL, DS_TAG)
    except ID3Error:
        raise
    except Exception as e:  # optimizer state may be half loaded: going on would train from a mix
        raise ID3Error(
            f"loading DeepSpeed's universal checkpoint {ckpt / UNIVERSAL} failed ({type(e).__name__}: "
            f"{str(e)[:200]}); resume on {info.get('world_size')} ranks at ZeRO-{src} instead"
        ) from e
    beat()
    return None


def _make_universal(ckpt: Path) -> str | None:
    """Rank 0: ckpt/ds -> ckpt/ds_universal (built aside, then renamed; kept for later resumes).

    Returns None, or why it could not be made.
    """
    out = ckpt / UNIVERSAL
    if (out / "latest_universal").is_file():
        return None
    try:  # built aside and renamed: a killed conversion leaves only a temp directory, removed by the next one
        with staged_dir(out, exists="replace") as tmp:
            reason = convert_to_universal(ckpt / "ds" / DS_TAG, tmp / DS_TAG)
            if reason is not None:
                raise _NotConverted(reason)
    except _NotConverted as e:
        return str(e)
    return None


class _NotConverted(Exception):
    """Why DeepSpeed could not convert: ends the staged directory without publishing it."""

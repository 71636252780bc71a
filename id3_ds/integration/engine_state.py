"""A DeepSpeed engine's training state that id3-ds must set by hand: step counters, LR schedule, checkpoints.

A resume that could not load DeepSpeed's optimizer state, and the FISH pass that drives the engine for
sample gradients without training, both leave the engine's own counters out of step with the run; these
functions put them where the run is. They touch engine attributes DeepSpeed does not document
(`global_steps`, `_config`), so they live here, behind one seam, with the other internals.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

from id3_ds.errors import ID3Error
from id3_ds.integration.zero_slices import inner_optimizer


def set_step_counters(engine, steps: int, samples: int | None = None) -> None:
    """Set the engine's optimizer-step count (and, if given, its sample count), which DeepSpeed logs by."""
    engine.global_steps = steps
    if samples is not None:
        engine.global_samples = samples


def fast_forward_scheduler(engine, steps: int) -> None:
    """Step a fresh LR scheduler `steps` times: its state was not in what was loaded."""
    sched = engine.lr_scheduler
    if sched is not None:
        for _ in range(steps):
            sched.step()


def rewind_scheduler(engine) -> None:
    """Put the LR scheduler back to its first step, as if the steps taken so far never happened."""
    sched = engine.lr_scheduler
    if sched is None:
        return
    with warnings.catch_warnings():  # torch warns about stepping a scheduler before its optimizer
        warnings.simplefilter("ignore")
        sched.last_epoch = -1
        sched.step()


@contextlib.contextmanager
def optimizer_step_disabled(engine) -> Iterator[None]:
    """Inside, `engine.step()` updates nothing: the inner torch optimizer's `step` is a no-op.

    DeepSpeed still reduces, clips and clears its gradient buffers, so the engine can be driven exactly as in
    training to read reduced gradients (FISH's Fisher pass) while weights and Adam's moments stay untouched.
    The instance attribute shadows the class method and with it the ID3 step hooks; it is removed on exit.
    """
    inner = inner_optimizer(engine)
    inner.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del inner.step


def load_checkpoint(engine, path: str | Path, tag: str, strict: bool = True) -> None:
    """Load a DeepSpeed checkpoint saved by this world size and stage: weights, optimizer and LR scheduler.

    strict=False for a QLoRA run: its bitsandbytes base saves quantization constants (`weight.absmax`, ...)
    that loading does not take back; the base is re-quantized identically at every load anyway."""
    loaded, _ = engine.load_checkpoint(str(path), tag=tag, load_lr_scheduler_states=True, load_module_strict=strict)
    if loaded is None:
        raise ID3Error(f"DeepSpeed could not load {path}: the checkpoint is incomplete or corrupt")


def load_universal_checkpoint(engine, path: str | Path, tag: str) -> None:
    """Load DeepSpeed's universal checkpoint (id3_ds.integration.universal) into this world size's partitions.

    DeepSpeed reads its `checkpoint.load_universal` setting only inside load_checkpoint, from the engine's
    config object: it is switched on for this one load and back off after. Exceptions pass through: the
    optimizer state may then be half loaded, so the caller must not go on training.
    """
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        loaded, _ = engine.load_checkpoint(str(path), tag=tag, load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = False
    if loaded is None:
        raise ID3Error(f"DeepSpeed could not load {path}: the universal checkpoint is incomplete")

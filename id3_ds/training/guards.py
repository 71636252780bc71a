"""Checks that stop a run cleanly, on every rank at once, before it can damage its own state.

Policy for a non-finite loss (bf16/fp32; fp16 is refused): the step is not taken, every rank stops with
one clear message, and the last complete checkpoint stays the one to resume from. (Skipping the step
would still move chosen entries: Adam's momentum keeps going with a zero gradient.)
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from id3_ds.checkpoint.layout import UNIVERSAL, latest_checkpoint
from id3_ds.errors import ID3Error
from id3_ds.integration.collectives import device_name
from id3_ds.integration.params import full_numel


def any_rank(flag: bool, device: str | None = None) -> bool:
    """True on every rank if it is True on any rank (one small all-reduce)."""
    device = device_name() if device is None else device
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class Watchdog:
    """Ends this process when the run makes no progress for `timeout_s` (a peer hung or died).

    Backends differ in whether a collective ever times out (DeepSpeed's shared-memory CPU all-reduce
    spins forever), so progress is watched here instead: each optimizer step and each checkpoint phase
    calls `beat()`; a daemon thread exits the process with one clear line if beats stop. The launcher
    then tears the other ranks down.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.last = time.monotonic()
        threading.Thread(target=self._watch, daemon=True, name="id3-watchdog").start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(min(5.0, self.timeout_s / 4))
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                rank = dist.get_rank() if dist.is_initialized() else 0
                print(
                    f"error: rank {rank} made no progress for {idle:.0f} s (train.collective_timeout_s="
                    f"{self.timeout_s:g}): another rank hung or died; the job stops, resume with train.resume=auto",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(3)


_watchdog: Watchdog | None = None


def start_watchdog(timeout_s: float) -> None:
    global _watchdog
    if _watchdog is None:
        _watchdog = Watchdog(timeout_s)


def beat() -> None:
    if _watchdog is not None:
        _watchdog.beat()


def stop_if_nonfinite(bad: bool, step: int, output_dir: str, device: str) -> None:
    """Called once per optimizer step on every rank: also the watchdog's heartbeat."""
    beat()
    if any_rank(bad, device):
        last = latest_checkpoint(output_dir)
        where = f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"
        raise ID3Error(
            f"loss became NaN/inf at step {step + 1}; stopped before the optimizer step ({where}): "
            "lower train.lr or check the data, then resume"
        )


def free_bytes(path: str) -> int:
    """Free space at `path`; ID3_DS_FAKE_FREE_BYTES overrides it for the disk-full tests."""
    fake = os.environ.get("ID3_DS_FAKE_FREE_BYTES")
    return int(fake) if fake else shutil.disk_usage(path).free


def checkpoint_bytes_estimate(output_dir: str, engine) -> int:
    """The last checkpoint's size, or weights + fp32 master + two Adam moments per trainable entry."""
    last = latest_checkpoint(output_dir)
    if last is not None:  # less the universal conversion a resume on another world size may have added
        files = (f for f in Path(last).rglob("*") if UNIVERSAL not in f.relative_to(last).parts[0])
        return sum(f.stat().st_size for f in files if f.is_file())
    total = 0
    for p in engine.module.parameters():
        n = full_numel(p)
        total += n * p.element_size() + (12 * n if p.requires_grad else 0)
    return total


def ensure_disk_for_checkpoint(output_dir: str, engine) -> None:
    """Refuse to start a checkpoint that would not fit (estimate + 10 %), before writing a byte of it."""
    short = None
    if dist.get_rank() == 0:
        need = int(checkpoint_bytes_estimate(output_dir, engine) * 1.1)
        have = free_bytes(output_dir)
        if have < need:
            short = (need, have)
    if any_rank(short is not None):
        detail = f"needs about {short[0] / 1e6:,.1f} MB, {short[1] / 1e6:,.1f} MB free" if short else "see rank 0"
        raise ID3Error(
            f"not enough disk space for the next checkpoint in {output_dir} ({detail}); free space or set "
            "train.output_dir elsewhere, then resume: earlier checkpoints are intact"
        )

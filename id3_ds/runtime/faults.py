"""Fault injection for the reliability tests: ID3_DS_FAULT=<what>:<step>[:<rank>].

kill_after_step   SIGKILL this rank right after optimizer step <step> (after its checkpoint, if any)
kill_during_save  SIGKILL this rank in the middle of writing checkpoint <step> (before COMPLETE)
nan_loss_at_step  this rank's loss becomes NaN at step <step> (0-based)
hang_at_step      this rank sleeps forever at the start of step <step> (0-based), before any collective
ID3_DS_FAKE_FREE_BYTES=<n> makes the disk look like it has n free bytes (see checkpoint/disk.free_bytes).
Unset in normal runs; the checks cost one dict lookup per step.
"""

from __future__ import annotations

import os
import signal
import time


def _parse() -> tuple[str, int, int] | None:
    spec = os.environ.get("ID3_DS_FAULT")
    if not spec:
        return None
    parts = spec.split(":")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else 0


def maybe_kill(point: str, step: int, rank: int) -> None:
    fault = _parse()
    if fault and fault == (point, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_hang(step: int, rank: int) -> None:
    fault = _parse()
    if fault and fault == ("hang_at_step", step, rank):
        while True:
            time.sleep(60)


def maybe_poison(loss, step: int, rank: int):
    fault = _parse()
    if fault and fault == ("nan_loss_at_step", step, rank):
        return loss * float("nan")
    return loss

"""Fault injection for the reliability tests: ID3_DS_FAULT=<what>:<step>[:<rank>].

kill_after_step   SIGKILL this rank right after optimizer step <step> (after its checkpoint, if any)
kill_during_save  SIGKILL this rank in the middle of writing checkpoint <step> (before COMPLETE)
Unset in normal runs; the checks cost one dict lookup per step.
"""

from __future__ import annotations

import os
import signal


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

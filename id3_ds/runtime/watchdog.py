"""A rank that stops making progress ends the job, with one line, instead of hanging it.

Every rank beats once per optimizer step and per checkpoint phase; `any_rank` is the one small all-reduce
that lets every rank take a decision one of them made.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from id3_ds.integration.collectives import device_name


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

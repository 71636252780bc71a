"""Run launch/train.py as real processes (torchrun, gloo on CPU) and read what they wrote."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from id3_ds.runtime.launching import launch_command, torchrun_command

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
TINY_CONFIG = str(ROOT / "configs" / "tiny_cpu.json")

CURRENT_TEST: pytest.Item | None = None  # set by tests/conftest.py while a test sets up and runs


def require_markers(nproc: int) -> None:
    """Fail the running test unless it is marked `slow` (and `distributed` when it launches several ranks).

    Every helper here that starts a process calls this, so `pytest -m "not slow"` can never start one and
    `-m "not distributed"` never starts torchrun ranks: a missing marker fails the test instead of slipping by.
    """
    item = CURRENT_TEST
    if item is None:  # called outside pytest (e.g. by hand)
        return
    need = ("slow", "distributed") if nproc > 1 else ("slow",)
    missing = [m for m in need if item.get_closest_marker(m) is None]
    if missing:
        marks = " and ".join(f"@pytest.mark.{m}" for m in missing)
        pytest.fail(f"{item.nodeid} launches {nproc} process(es) but lacks {marks}", pytrace=False)


def train(
    overrides: list[str],
    nproc: int = 2,
    env: dict | None = None,
    config: str = TINY_CONFIG,
    timeout: int = 600,
    torchrun: bool = False,
) -> subprocess.CompletedProcess:
    """Launch a training run; returns the finished process (stdout and stderr merged).

    The ranks are forked by the session's fork server (id3_ds/runtime/fork_ranks.py, started in conftest.py), or
    started by torchrun itself with `torchrun=True`: the users' launcher path, kept by a few tests.
    """
    require_markers(nproc)
    cmd = torchrun_command(nproc, TRAIN) if torchrun else launch_command(nproc, TRAIN)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # own process group: on a timeout every rank dies with the launcher, none is left running
    proc = subprocess.Popen(
        [*cmd, "--config", config, *overrides, "train.progress_bar=false"],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc


def weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory's safetensors files."""
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out

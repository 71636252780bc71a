"""Run launch/train.py as real processes (torchrun, gloo on CPU) and read what they wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks._launch import torchrun_command

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
TINY_CONFIG = str(ROOT / "configs" / "tiny_cpu.json")


def train(
    overrides: list[str], nproc: int = 2, env: dict | None = None, config: str = TINY_CONFIG, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Launch a training run; returns the finished process (stdout and stderr merged)."""
    cmd = torchrun_command(nproc, TRAIN) if nproc > 1 else [sys.executable, TRAIN]
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

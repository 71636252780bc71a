"""Whether the next checkpoint fits on disk, decided before a byte of it is written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist

from id3_ds.checkpoint.layout import UNIVERSAL, latest_checkpoint
from id3_ds.errors import ID3Error
from id3_ds.integration.params import full_numel
from id3_ds.runtime.watchdog import any_rank


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

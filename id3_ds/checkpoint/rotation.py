"""What rank 0 does once a checkpoint is complete: drop the oldest beyond `train.save_total_limit`, and say,
once, when sparse state would make the checkpoints much smaller.

`train.save_total_limit` is Hugging Face Trainer's name and meaning: keep the newest N checkpoints. Only
complete checkpoints count and only complete ones are removed (an incomplete one is a leftover that a save
at its step replaces, or one being written); the checkpoint this run was told to resume from
(`train.resume=PATH`) is never removed. A checkpoint is removed by first deleting its COMPLETE marker (from
then on no resume or export reads it), then renaming it aside and deleting it, so a kill part-way leaves
either a checkpoint that counts whole or a hidden leftover that the next rotation clears.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from id3_ds.checkpoint.layout import COMPLETE, list_checkpoints

REMOVING = ".removing-"  # prefix of a checkpoint being deleted (never matches checkpoint-NNNNNNNN)
SPARSE_BYTES_PER_ENTRY = 28  # mask 16 B + fp32 master and two moments 12 B (README "Sparse state")
_size_noted = False


def rotate_checkpoints(output_dir: str | Path, limit: int | None, protect: list[Path] = ()) -> list[Path]:
    """Remove the complete checkpoints older than the newest `limit` (None or 0: keep all), except those in
    `protect`; returns the removed ones."""
    root = Path(output_dir)
    for leftover in root.glob(f"{REMOVING}*") if root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)  # a removal a kill interrupted
    if not limit:
        return []
    kept = {p.resolve() for p in protect}
    complete = list_checkpoints(root)
    removed = []
    for ckpt in complete[: max(len(complete) - limit, 0)]:
        if ckpt.resolve() in kept:
            continue
        (ckpt / COMPLETE).unlink()  # from here on it does not count
        aside = ckpt.with_name(REMOVING + ckpt.name)
        os.replace(ckpt, aside)
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(ckpt)
    return removed


def resume_target(resume: str | None) -> list[Path]:
    """The checkpoint `train.resume` names as a path ([] for auto/null): never removed by rotation."""
    if resume in (None, "", "auto", "none"):
        return []
    return [Path(resume)]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sparse_size_note(ckpt: Path, budget: int | None) -> str | None:
    """A dense-state ID3 checkpoint many times the size sparse state would write: one line saying so."""
    if not budget:
        return None
    size = dir_bytes(ckpt)
    sparse = SPARSE_BYTES_PER_ENTRY * budget
    if size < 64 * 2**20 or size < 20 * sparse:
        return None
    return (
        f"note: {ckpt.name} holds {_mb(size)} for {budget:,} trained entries; id3.state=sparse keeps Adam state "
        f"for the chosen entries only and would write about {_mb(sparse)} per checkpoint (docs/sparse-state.md)"
        "; train.save_total_limit=N keeps only the newest N"
    )


def after_save(ckpt: Path, cfg, budget: int | None, sparse: bool) -> None:
    """Rank 0, once `ckpt` is complete: rotate, and the first time in this process, the size note."""
    global _size_noted
    rotate_checkpoints(ckpt.parent, cfg.train.save_total_limit, resume_target(cfg.train.resume))
    if not _size_noted and not sparse and cfg.plan.sparse_state_fits:
        _size_noted = True
        note = sparse_size_note(ckpt, budget)
        if note:
            print(note, flush=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} KB"

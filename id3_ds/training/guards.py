"""Checks that stop a run cleanly, on every rank at once, before it can damage its own state.

Policy for a non-finite loss (bf16/fp32; fp16 is refused): the step is not taken, every rank stops with
one clear message, and the last complete checkpoint stays the one to resume from. (Skipping the step
would still move chosen entries: Adam's momentum keeps going with a zero gradient.)
"""

from __future__ import annotations

from id3_ds.checkpoint.layout import latest_checkpoint
from id3_ds.errors import ID3Error
from id3_ds.runtime.watchdog import any_rank, beat


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

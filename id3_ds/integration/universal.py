"""Conversion of a ZeRO checkpoint into DeepSpeed's universal checkpoint, which any world size can load.

DeepSpeed's partitioned optimizer files only load on the world size and stage that wrote them. Its
`ds_to_universal` converter rewrites them as per-parameter fp32 values, Adam moments and step, which
`engine_state.load_universal_checkpoint` then partitions for the new world. The converter is a script's
`main(args)`, so it is driven here with the arguments its command line would give.
"""

from __future__ import annotations

import contextlib
import io
from argparse import Namespace
from pathlib import Path


def convert_to_universal(source: Path, dest: Path) -> str | None:
    """Convert the DeepSpeed checkpoint tag folder `source` into a universal one at `dest`.

    Returns None, or why it could not be made (the caller then restarts the optimizer moments). `dest` may be
    left half written on failure: build it aside. DeepSpeed's progress output is kept quiet.
    """
    if not any(Path(source).glob("*_optim_states.pt")):
        return f"{source} holds no ZeRO optimizer files to convert"
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = Namespace(
        input_folder=str(source),
        output_folder=str(dest),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # engine.save_checkpoint records no universal_checkpoint_info without AutoTP
    )
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            ds_to_universal(args)
    except Exception as e:  # DeepSpeed raises assorted errors (AssertionError, KeyError, ...) on layouts it lacks
        return f"converting to DeepSpeed's universal checkpoint failed: {type(e).__name__}: {str(e)[:200]}"
    return None

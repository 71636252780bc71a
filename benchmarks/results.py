"""Appending a benchmark's table to benchmarks/RESULTS.md with the machine, versions and exact command."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def append_results(title: str, details: str, command: str, text: str) -> None:
    """One section: `## title (date, machine, cores, versions; details)`, the command, then the table."""
    import torch

    versions = f"torch {torch.__version__}"
    try:
        import deepspeed

        versions += f", deepspeed {deepspeed.__version__}"
    except ImportError:
        pass
    machine = f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores, {versions}"
    with open(RESULTS, "a") as f:
        f.write(f"\n## {title} ({machine}; {details})\n\n`{command}`\n\n{text}\n")

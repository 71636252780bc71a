"""Recording a benchmark's table in benchmarks/RESULTS.md: one section per benchmark, the current figures.

A rerun replaces its benchmark's section where it stands and leaves every other section as it was, so
the file always reads as the latest run of each benchmark; earlier figures live in git history, not in
an ever longer file. Each section keeps the date, machine, core count, versions and exact command.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## "


def machine_line() -> str:
    """Date, architecture, cores and library versions: what a reader needs to compare two runs."""
    import torch

    versions = f"torch {torch.__version__}"
    try:
        import deepspeed

        versions += f", deepspeed {deepspeed.__version__}"
    except ImportError:
        pass
    return f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores, {versions}"


def section(title: str, details: str, command: str, text: str) -> str:
    """`## title (machine; details)`, the command, then the table; ends with one newline."""
    return f"{HEADING}{title} ({machine_line()}; {details})\n\n`{command}`\n\n{text.strip()}\n"


def split_sections(doc: str) -> tuple[str, list[str]]:
    """The text before the first `## ` heading, and each section from its heading to the next one."""
    head, sections = [], []
    for line in doc.splitlines(keepends=True):
        if line.startswith(HEADING):
            sections.append(line)
        elif sections:
            sections[-1] += line
        else:
            head.append(line)
    return "".join(head), sections


def is_section_of(sec: str, title: str) -> bool:
    """Whether `sec` is `title`'s section: its heading is the title, alone or followed by ` (`."""
    heading = sec.split("\n", 1)[0].rstrip()
    return heading == HEADING + title or heading.startswith(f"{HEADING}{title} (")


def replace_section(doc: str, title: str, new: str) -> str:
    """`doc` with `title`'s section replaced by `new` where the first one stood (any later duplicate
    dropped), or `new` appended at the end when the benchmark has no section yet."""
    head, sections = split_sections(doc)
    new = new.strip() + "\n"
    out, placed = [], False
    for sec in sections:
        if not is_section_of(sec, title):
            out.append(sec.strip() + "\n")
        elif not placed:
            out.append(new)
            placed = True
    if not placed:
        out.append(new)
    head = head.strip()
    return "\n".join(([head + "\n"] if head else []) + out)


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` so a reader or a crash sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_results(title: str, details: str, command: str, text: str) -> None:
    """Put this run's section into RESULTS.md in place of the benchmark's previous one (or at the end)."""
    path = RESULTS
    doc = path.read_text() if path.exists() else ""
    write_atomically(path, replace_section(doc, title, section(title, details, command, text)))

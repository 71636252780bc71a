"""Directory outputs that appear whole or not at all.

A delta or a merged model is built in a hidden sibling temp directory (same filesystem, so the final step
is one rename) and published only when complete: an interrupted export or merge never leaves a half
result under the requested name. On an exception the temp directory is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from id3_ds.errors import ID3Error
from id3_ds.io import fsync_dir


def check_out(out: Path, overwrite: bool, *, protect: list[Path] = ()) -> None:
    """Refuse an output that exists (unless overwrite) or that overlaps a protected input directory."""
    out_r = out.resolve()
    for p in protect:
        p_r = p.resolve()
        if out_r == p_r or p_r in out_r.parents or out_r in p_r.parents:
            raise ID3Error(f"refusing to write {out}: it overlaps the input directory {p}; choose another --out")
    if out.exists() and not overwrite:
        raise ID3Error(f"{out} already exists: choose another --out, or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ID3Error(f"{out} exists and is not a directory: choose another --out")


def remove_orphans(out: Path) -> None:
    """Delete temp directories that a killed earlier write of `out` left behind (their process is gone)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temp directory; on normal exit it replaces `out`, on error it is deleted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        if out.exists():
            if not overwrite:
                raise ID3Error(f"{out} appeared while writing: choose another --out, or pass --overwrite")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

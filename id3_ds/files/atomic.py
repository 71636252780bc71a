"""The one way id3-ds writes files and directories: whole under the final name, or not at all.

Every output is built under a hidden sibling temp name (same directory, so same filesystem: the last step
is one `rename`, which POSIX makes atomic), flushed to disk with fsync before the rename, and the parent
directory is fsynced after it, so a crash or a power cut at any point leaves either the previous result or
the new one. Temp names carry the writer's pid; a later write removes temps whose process is gone.

- `atomic_file(path)`: a temp path to write (by any library: safetensors, json, ...) that replaces `path`.
- `write_text_atomic` / `write_json_atomic`: the common cases of it.
- `staged_dir(out, ...)`: the same for a directory (a delta, a merged model, a checkpoint part, a cache
  entry), with a choice of what an existing `out` means: an error, replaced, or kept (first writer wins,
  for caches that several ranks may build at once with identical content).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from id3_ds.errors import ID3Error

__all__ = [
    "atomic_file",
    "check_out",
    "fsync_dir",
    "remove_orphans",
    "staged_dir",
    "write_json_atomic",
    "write_text_atomic",
]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (the directory entry, not only the file, must reach the disk)."""
    _fsync(path)


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's data to disk (both are opened read-only for it on POSIX)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _default_mode() -> int:
    """The mode `open()` gives a new file: 0666 less the process umask (which can only be read by setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _widen(path: Path, default: int) -> None:
    """Give a file written inside a staged directory at least the umask's default permissions: safetensors'
    `save_file` creates 0600 files, which would make a delta's tensors private while its JSON is not."""
    mode = path.stat().st_mode & 0o777
    if mode | default != mode:
        os.chmod(path, mode | default)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path next to `path`; when the block ends normally it replaces `path`, else it is removed.

    The caller may write the temp file with any library (safetensors' `save_file` takes a path, not a file
    object). Its permissions become `mode`, by default the umask's default for a new file (0644 under the
    usual 022), before it appears under the final name: some writers create files private (0600), which
    would make e.g. mask shards unlike every other output and unreadable to the group that shares the run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.chmod(tmp, _default_mode() if mode is None else mode)
        _fsync(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
    """Delete temp files/directories that a killed earlier write of `out` left behind (their process is gone)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, exists: Literal["error", "replace", "keep"] = "error") -> Iterator[Path]:
    """Yield a fresh temp directory that becomes `out` when the block ends normally; on error it is deleted.

    Files inside get at least the umask's default mode, as `atomic_file` gives. `exists` says what an `out`
    already there at publish time means: `error` (refuse; the caller checked first, so it appeared while
    writing), `replace` (the old one is swapped out, then deleted), or `keep` (another process published
    identical content first: ours is dropped).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)
    tmp = _temp_name(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        default = _default_mode()
        for f in tmp.rglob("*"):
            if f.is_file():
                _widen(f, default)
                _fsync(f)
        fsync_dir(tmp)
        if out.exists() and exists == "keep":
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if out.exists() and exists == "error":
            raise ID3Error(f"{out} appeared while writing: choose another --out, or pass --overwrite")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, out)
            except OSError:
                if exists != "keep" or not out.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost a race to an identical build
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

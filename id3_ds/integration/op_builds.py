"""DeepSpeed's JIT-compiled ops: one build folder per environment, a line while one builds, no stale locks.

DeepSpeed JIT-compiles its ops into torch's one shared extensions folder, so two virtualenvs rebuild each
other's ops on every switch (minutes, silently). Builds now go to a folder of their own per environment
(`use_per_environment_extensions`), rank 0 says so while one runs (`announce_op_builds`), and a lock left
by a build that was killed is removed before it can make every later start wait (`clear_stale_build_locks`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from importlib import metadata
from pathlib import Path


def environment_key() -> str:
    """A short hash of what a compiled op depends on: this environment's prefix, Python, torch, DeepSpeed."""
    import torch

    try:
        ds_version = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        ds_version = "none"
    parts = [os.path.realpath(sys.prefix), sys.version, torch.__version__, ds_version]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def extensions_dir(env: dict[str, str] | None = None) -> Path:
    """Where torch builds DeepSpeed's ops for this run: TORCH_EXTENSIONS_DIR if the user set it, else a
    folder keyed by `environment_key()` under torch's own default root (~/.cache/torch_extensions).

    Why that root and not `<sys.prefix>` or $ID3_DS_CACHE: sys.prefix may be read-only (a system Python, a
    shared conda env); ID3_DS_CACHE is pointed at a fresh temp folder by every test session, which would
    rebuild the ops each time. Under torch's root the builds sit where users and .ci/run already look, and
    clearing torch's cache clears them too.
    """
    env = os.environ if env is None else env
    if env.get("TORCH_EXTENSIONS_DIR"):
        return Path(env["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root()) / f"id3-ds-{environment_key()}"


def use_per_environment_extensions(is_main: bool) -> Path:
    """Point TORCH_EXTENSIONS_DIR at this environment's folder unless the user chose one, and have rank 0
    announce each op build (`announce_op_builds`). Call before anything loads a DeepSpeed op."""
    path = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(path)
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list and (parsable := deepspeed_arch_list(arch_list)) != arch_list:
        os.environ["TORCH_CUDA_ARCH_LIST"] = parsable
        if is_main:
            print(f"TORCH_CUDA_ARCH_LIST={arch_list!r} becomes {parsable!r} for DeepSpeed's op builds", flush=True)
    announce_op_builds(is_main)
    quiet_op_loaded_line()
    return path


def quiet_op_loaded_line() -> None:
    """Drop DeepSpeed's "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", which every
    CPU rank prints at every start, also when it only loaded the op built before (a real build is announced
    by `announce_op_builds`; a failed one still raises). It is the one `print` in deepspeed/comm/torch.py, so
    that module gets a `print` that drops this line and passes anything else on."""
    import importlib

    try:  # by module name: `import deepspeed.comm.torch as m` would bind deepspeed.comm's attribute `torch`
        ds_torch = importlib.import_module("deepspeed.comm.torch")  # (the torch package itself)
    except ImportError:  # another DeepSpeed layout: the line stays
        return
    if getattr(getattr(ds_torch, "print", None), "_id3_quiet", False):
        return

    def quiet_print(*args, **kwargs):
        text = " ".join(str(a) for a in args)
        if not (text.startswith("DeepSpeed ") and text.endswith(" built successfully")):
            print(*args, **kwargs)

    quiet_print._id3_quiet = True
    ds_torch.print = quiet_print


def deepspeed_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed 0.19's JIT builder can read it: arch-specific entries lose their
    letter ("9.0a" -> "9.0"), "+PTX" stays, repeats go.

    Why: CUDA images for Hopper and Blackwell set entries such as "9.0a" (torch reads them), and DeepSpeed
    sorts the list with int() on each part, so every op build, FusedAdam under GPU training included, stops
    with "invalid literal for int() with base 10: '0a'" (seen on an H200 image). Ops such as FusedAdam use
    no arch-specific instructions, so building them for the plain architecture loses nothing."""
    entries = value.replace(";", " ").split()
    out: list[str] = []
    for entry in entries:
        arch, plus, ptx = entry.partition("+")
        major, dot, minor = arch.partition(".")
        cleaned = f"{major}{dot}{minor.rstrip('abcdefghijklmnopqrstuvwxyz')}{plus}{ptx}"
        if cleaned not in out:
            out.append(cleaned)
    return value if out == entries else ";".join(out)  # a list DeepSpeed reads keeps the user's spelling


def op_is_built(name: str, root: Path) -> bool:
    """Whether torch has already linked op `name` under `root` (with TORCH_EXTENSIONS_DIR set: root/name/name.so)."""
    return (root / name / f"{name}.so").is_file()


def build_message(name: str, root: Path) -> str | None:
    """The line rank 0 prints before a JIT build of `name`, or None when the op is already built."""
    if op_is_built(name, root):
        return None
    return (
        f"building DeepSpeed's {name} op once for this environment (1-3 min on 2 cores, nothing is printed "
        f"meanwhile; later runs reuse it from {root})..."
    )


def announce_op_builds(is_main: bool) -> None:
    """Make DeepSpeed's JIT loader print `build_message` on rank 0 before it compiles an op it has not built.

    Wraps `OpBuilder.jit_load`, the one method DeepSpeed calls for every op not pre-built at install time;
    other ranks wait on the same build's lock, so one line from rank 0 explains the whole pause.
    """
    if not is_main:
        return
    try:
        from deepspeed.ops.op_builder.builder import OpBuilder
    except ImportError:  # another DeepSpeed layout: the build stays silent, nothing else changes
        return
    original = OpBuilder.jit_load
    if getattr(original, "_id3_announces", False):
        return

    @functools.wraps(original)
    def jit_load(self, verbose: bool = True):
        message = build_message(self.name, extensions_dir())
        if message:
            print(message, flush=True)
        return original(self, verbose)

    jit_load._id3_announces = True
    OpBuilder.jit_load = jit_load


def clear_stale_build_locks(max_age_s: float = 900.0, root: str | None = None) -> list[str]:
    """Remove torch-extension build locks older than `max_age_s`; returns the paths removed.

    DeepSpeed JIT-compiles its CPU ops through torch.utils.cpp_extension, which takes a `lock` file in the
    op's build directory and makes every other process wait until the file is gone. A run killed during
    the build leaves the lock behind and every later run waits on it forever, silently. A build takes a
    minute or two, so a lock untouched for 15 minutes belongs to a dead process.
    """
    if root is None:
        root = extensions_dir()  # where this run's ops build (TORCH_EXTENSIONS_DIR or this environment's)
    removed = []
    now = time.time()
    locks = [*Path(root).glob("*/lock"), *Path(root).glob("*/*/lock")]  # <op>/lock, or py311_cpu/<op>/lock
    for lock in locks:
        try:
            if now - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(str(lock))
        except FileNotFoundError:  # another rank of this node removed it first
            pass
    for path in removed:
        print(f"note: removed a stale torch build lock left by a killed run: {path}", file=sys.stderr, flush=True)
    return removed

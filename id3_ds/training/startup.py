"""Start-up checks that turn the first hour's silent waits and deep tracebacks into one line each.

- `check_rendezvous_port`: two jobs on one machine both get the launcher's default port (29500); the second
  used to die in a deep EADDRINUSE traceback (after a two-minute hang on some backends). Rank 0 now tries
  the port first and stops with the launcher flag that fixes it.
- `use_per_environment_extensions` / `announce_op_builds`: DeepSpeed JIT-compiles its ops into torch's one
  shared extensions folder, so two virtualenvs rebuild each other's ops on every switch (minutes, silently).
  Builds now go to a folder of their own per environment, and rank 0 says so while one runs.
- `quiet_third_party_noise`: warnings id3-ds cannot act on, repeated once per rank.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import sys
import warnings
from importlib import metadata
from pathlib import Path

from id3_ds.errors import ID3Error

# -- the rendezvous port ------------------------------------------------------------------------------


def agent_hosts_store(env: dict[str, str] | None = None) -> bool:
    """True when a torchrun agent already hosts the rendezvous store on MASTER_PORT (rank 0 only connects).

    torchrun's agent binds MASTER_PORT itself and tells its workers with TORCHELASTIC_USE_AGENT_STORE=True;
    torch.distributed reads the same variable (`rendezvous._torchelastic_use_agent_store`). Under the
    deepspeed launcher or plain `python`, rank 0 binds the port when it creates the store.
    """
    env = os.environ if env is None else env
    return env.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)


def port_in_use(port: int) -> bool:
    """True if a TCP server could not bind `port` on all interfaces now (how rank 0's TCPStore binds it).

    SO_REUSEADDR as the store sets it: a port left in TIME_WAIT by a finished run is free to it, and so here.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def check_rendezvous_port(env: dict[str, str] | None = None) -> None:
    """On the rank that will host the rendezvous store, refuse a MASTER_PORT another job already holds.

    Runs before `deepspeed.init_distributed`; raising ID3Error there makes launch/train.py print one line and
    exit 2, and the deepspeed launcher then stops the other ranks.
    """
    env = os.environ if env is None else env
    port = env.get("MASTER_PORT", "")
    if env.get("RANK", "0") != "0" or agent_hosts_store(env) or not port.isdigit():
        return
    if port_in_use(int(port)):
        from id3_ds.processes import free_port

        free = free_port()
        raise ID3Error(
            f"rendezvous port {port} (MASTER_PORT) is already in use on this machine, probably by another "
            f"training job: give this run its own port, e.g. `deepspeed --master_port {free} ...` or "
            f"`torchrun --master_port {free} ...` (or MASTER_PORT={free} for plain python)"
        )


# -- DeepSpeed's JIT-compiled ops ---------------------------------------------------------------------


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
    announce_op_builds(is_main)
    return path


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


# -- third-party noise --------------------------------------------------------------------------------


def quiet_third_party_noise(rank: int | None = None) -> None:
    """Filter warnings a user cannot act on; ranks > 0 keep transformers to errors (rank 0 shows them once).

    - torch 2.13 deprecates `all_gather_into_tensor`, which DeepSpeed's ZeRO calls (id3-ds does not): a
      FutureWarning per rank that only a DeepSpeed release can fix. torch's `_exception_logger` wrapper makes
      every such warning point at torch/distributed/c10d_logger.py, so it is matched by that module and the
      message, and nothing else is hidden.
    - transformers' load report ("classifier.weight | MISSING ... newly initialized" for a fresh head) and
      its "Loading weights" bar are worth reading once, not once per rank.
    `rank` defaults to the launcher's RANK (main() calls this before the process group exists).
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        category=FutureWarning,
        module=r"torch\.distributed\.c10d_logger",
    )
    if rank > 0:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

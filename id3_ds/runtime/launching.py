"""How the benchmarks and the tests start their 2-rank runs (torchrun on a free port) and end their workers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from id3_ds.processes import free_port

FORK_RANKS = "ID3_DS_FORK_RANKS"  # a fork server's socket (tests/conftest.py starts one): see fork_ranks.py


def fork_server() -> str | None:
    """The socket of the fork server this process launches through, or None (unset, or "0": disabled)."""
    server = os.environ.get(FORK_RANKS, "")
    return None if server in ("", "0") else server


def launch_command(nproc: int, script: str | Path, *args: str) -> list[str]:
    """The command that runs `script` on `nproc` local ranks: through the fork server named by ID3_DS_FORK_RANKS
    (the test suite: the same ranks at a fraction of the start-up CPU), else torchrun (plain python for 1)."""
    server = fork_server()
    if server is not None:
        forker = str(Path(__file__).with_name("fork_ranks.py"))
        return [
            sys.executable,
            forker,
            f"--server={server}",
            f"--nproc={nproc}",
            f"--port={free_port()}",
            str(script),
            *args,
        ]
    if nproc == 1:
        return [sys.executable, str(script), *args]
    return torchrun_command(nproc, script, *args)


def torchrun_command(nproc: int, script: str | Path, *args: str) -> list[str]:
    """`python -m torch.distributed.run` of `script` on `nproc` local processes, on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads still running (Linux: /proc/self/task; elsewhere none are seen)."""
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return names
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return names


def end_worker() -> None:
    """End a 2-rank DeepSpeed/gloo worker that succeeded, once its results are written and closed.

    `shutdown()` (id3_ds/integration/shutdown.py: barrier, then every process group destroyed and released,
    so gloo's threads are joined before the interpreter's exit, which would otherwise abort at times) and
    then a normal return. The workers are the project's own: a group that outlives shutdown, or a gloo
    thread still running, fails the worker, so a DeepSpeed that keeps groups somewhere new is caught here.
    """
    from id3_ds.integration.shutdown import shutdown

    left = shutdown()
    threads = gloo_threads()
    if left or threads:
        raise RuntimeError(f"process groups outlived shutdown(): {left}; gloo threads still running: {threads}")

"""Starting local multi-process runs: a free rendezvous port and the torchrun command line that uses it."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    """A TCP port free on this machine now: a fixed port would make two runs at once collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, script: str, *args: str) -> list[str]:
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

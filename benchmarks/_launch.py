"""The torchrun command line the benchmarks and the tests launch their 2-rank runs with (not shipped)."""

from __future__ import annotations

import sys

from id3_ds.processes import free_port


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

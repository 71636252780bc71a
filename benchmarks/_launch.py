"""How the benchmarks and the tests start their 2-rank runs (torchrun on a free port) and end their workers."""

from __future__ import annotations

import os
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


def end_worker() -> None:
    """End a 2-rank DeepSpeed/gloo worker that succeeded, once its results are written and closed.

    destroy_process_group() is the documented clean exit, but under DeepSpeed it cannot end gloo's
    threads: the engine, every ZeRO parameter (`ds_process_group`), zero.Init and
    deepspeed.utils.groups keep the groups alive, so their C++ teardown (joining the `pt_gloo_runloop`
    threads) would run during interpreter finalization. A runloop thread that still holds the last
    collective's tensors must take the GIL to drop a Python-owned one; Python ends a thread that does
    so during finalization with pthread_exit, which unwinds through a noexcept destructor: SIGABRT,
    "terminate called without an active exception", after every byte of output was written. So after
    the barrier (no peer waits on this rank any more) and destroy_process_group(), the process leaves
    with os._exit(0) and skips finalization; only a run that succeeded gets here.
    """
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to lose there
            pass
    os._exit(0)

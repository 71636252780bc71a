"""How often a finished 2-rank gloo worker aborts at interpreter exit, with and without `shutdown()`.

    python benchmarks/exit_abort.py --launches 60 --mode destroy    # the old exit: destroy_process_group()
    python benchmarks/exit_abort.py --launches 60 --mode shutdown   # id3_ds.integration.shutdown.shutdown()

Each launch starts two plain-torch ranks (no DeepSpeed import, so a launch costs about a second of CPU)
that hold their process groups the way DeepSpeed does (a second group and references outside torch's
tables), run the kind of collectives a training step ends with (synchronous ones on temporary tensors,
an async all-gather), and leave through a normal interpreter exit. Counted: rank exits that died of
SIGABRT ("terminate called without an active exception"), the failure issue 12 saw in CI, and any other
failure. Figures are a rate over many exits: the abort is a timing race of gloo's threads against
interpreter finalization.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HELD: list = []  # references outside torch's tables, as the engine, ZeRO parameters and zero.Init keep them


def worker(mode: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    HELD.append(dist.group.WORLD)
    HELD.append(dist.new_group([0, 1]))
    for i in range(20):  # the end of a step: small reductions on temporaries, one async gather
        dist.all_reduce(torch.full((64,), float(i)))
        dist.all_reduce(torch.ones(4096), group=HELD[1])
        out = [torch.empty(1024) for _ in range(2)]
        dist.all_gather(out, torch.randn(1024), async_op=True).wait()
    if mode == "shutdown":
        from id3_ds.integration.shutdown import shutdown

        left = shutdown()
        assert not left, left
    else:  # what launch/train.py did: barrier and destroy_process_group(), then a normal exit
        dist.barrier()
        dist.destroy_process_group()


def launch_pair(mode: str, port: int) -> list[int]:
    """Return codes of the two ranks of one launch."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--mode", mode],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    codes = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        if p.returncode not in (0, -signal.SIGABRT):
            print(err[-2000:], file=sys.stderr)
        codes.append(p.returncode)
    return codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--launches", type=int, default=40)
    ap.add_argument("--mode", choices=["destroy", "shutdown"], default="shutdown")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.mode)
        return
    from id3_ds.processes import free_port

    aborts = failures = 0
    for i in range(args.launches):
        codes = launch_pair(args.mode, free_port())
        aborts += sum(c == -signal.SIGABRT for c in codes)
        failures += sum(c not in (0, -signal.SIGABRT) for c in codes)
        print(f"launch {i + 1}: return codes {codes}", flush=True)
    exits = 2 * args.launches
    print(f"mode {args.mode}: {aborts} aborts and {failures} other failures in {exits} rank exits")


if __name__ == "__main__":
    main()

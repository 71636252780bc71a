"""How often a finished 2-rank gloo worker aborts at interpreter exit, with and without `shutdown()`.

    python benchmarks/exit_abort.py --launches 60 --mode destroy    # the old exit: destroy_process_group()
    python benchmarks/exit_abort.py --launches 60 --mode shutdown   # id3_ds.integration.shutdown.shutdown()
    python benchmarks/exit_abort.py --launches 20 --deepspeed       # ranks that also train 2 ZeRO-3 steps

Each launch starts two plain-torch ranks (no DeepSpeed import, so a launch costs about a second of CPU)
that hold their process groups the way DeepSpeed does (a second group and references outside torch's
tables), run the kind of collectives a training step ends with (synchronous ones on temporary tensors,
an async all-gather), and leave through a normal interpreter exit. Counted: rank exits that died of
SIGABRT ("terminate called without an active exception"), the failure issue 12 saw in CI, and any other
failure. Figures are a rate over many exits: the abort is a timing race of gloo's threads against
interpreter finalization. With --deepspeed each rank first trains two steps of a tiny ZeRO-3 model under
DeepSpeed (its engine, parameters and zero.Init then hold the groups as in the trainer): slower launches.
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


def deepspeed_steps() -> None:
    """Two ZeRO-3 steps of a tiny model: DeepSpeed's engine, parameters and zero.Init now hold the groups."""
    import deepspeed
    import torch

    from id3_ds.integration.op_builds import use_per_environment_extensions

    use_per_environment_extensions(os.environ.get("RANK", "0") == "0")  # the trainer's op folder: no second build
    deepspeed.init_distributed(dist_backend="gloo")
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    HELD.append(engine)
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 64)).pow(2).mean())
        engine.step()


def worker(mode: str, use_deepspeed: bool) -> None:
    import torch
    import torch.distributed as dist

    if use_deepspeed:
        deepspeed_steps()
    else:
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


def launch_pair(mode: str, port: int, use_deepspeed: bool) -> list[int]:
    """Return codes of the two ranks of one launch."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--mode", mode, *(["--deepspeed"] if use_deepspeed else [])],
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
    ap.add_argument("--deepspeed", action="store_true", help="ranks train 2 ZeRO-3 steps under DeepSpeed first")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.mode, args.deepspeed)
        return
    from id3_ds.processes import free_port

    aborts = failures = 0
    for i in range(args.launches):
        codes = launch_pair(args.mode, free_port(), args.deepspeed)
        aborts += sum(c == -signal.SIGABRT for c in codes)
        failures += sum(c not in (0, -signal.SIGABRT) for c in codes)
        print(f"launch {i + 1}: return codes {codes}", flush=True)
    exits = 2 * args.launches
    kind = "DeepSpeed ZeRO-3" if args.deepspeed else "plain torch"
    print(f"{kind}, mode {args.mode}: {aborts} aborts and {failures} other failures in {exits} rank exits")


if __name__ == "__main__":
    main()

"""The tests' rank launcher: import the heavy libraries once, then fork one process per rank.

Why: on the 2-core CI machine a 2-rank run of the tiny model spends most of its CPU importing torch,
DeepSpeed and transformers in each rank and in torchrun's agent (~13.5 s of CPU for a 4-step run, of which
the work is under 1 s). Forking the ranks from one process that imported them shares that cost: the same
run takes ~9.5 s, and the suite launches dozens of them. Each rank is still its own process with its own
gloo process group, DeepSpeed engine, exit path and exit code; only the imports happen before the fork.

It does what the tests need of torchrun and no more: RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE /
MASTER_ADDR / MASTER_PORT in each rank's environment (rank 0 hosts the rendezvous store, as with plain
python), every rank's output on the launcher's own stdout/stderr, and when a rank fails the others get
SIGTERM, then SIGKILL after a grace period, and the launcher exits 1. Users launch with `deepspeed` or
`torchrun`; tests/conftest.py sets ID3_DS_FORK_RANKS=1 so `benchmarks._launch.launch_command` picks this.

Only libraries that start no thread on import are imported before the fork (torch, DeepSpeed,
transformers); `datasets` is not: pyarrow starts a jemalloc thread.

Usage: python benchmarks/fork_ranks.py --nproc N --port P script.py [script args...]
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
import time

GRACE_S = 10.0  # after SIGTERM, a rank that is still alive (e.g. hung in a collective) gets SIGKILL


def preimport() -> None:
    """The modules every rank imports and that cost the most (torch ~1.6 s, transformers' model index ~1 s)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401


def run_rank(rank: int, nproc: int, port: int, script: str, args: list[str]) -> int:
    """Run `script` as `python script args` would, as rank `rank`; returns its exit code."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # sys.exit("message") prints and exits 1, as the interpreter does
        return 1
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


def stop(pids: dict[int, int]) -> None:
    """SIGTERM every rank still running; SIGKILL those alive after GRACE_S; reap them all."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while pids and time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.05)
        else:
            pids.pop(pid, None)
    for pid in pids:
        _signal(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # ended meanwhile
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    preimport()
    sys.stdout.flush()
    sys.stderr.flush()
    pids: dict[int, int] = {}
    for rank in range(opts.nproc):
        pid = os.fork()
        if pid == 0:  # the rank: its exit goes through the interpreter's normal shutdown, as a fresh process
            sys.exit(run_rank(rank, opts.nproc, opts.port, opts.script, opts.args))
        pids[pid] = rank

    def forward(signum: int, _frame: object) -> None:
        stop(pids)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while pids:
        pid, status = os.wait()
        rank = pids.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            print(f"fork_ranks: rank {rank} (pid {pid}) exited with {code}; stopping the others", file=sys.stderr)
            stop(pids)
            sys.exit(1)


if __name__ == "__main__":
    main()

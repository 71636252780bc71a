"""Start-up checks that turn the first hour's silent waits and deep tracebacks into one line each.

- `check_rendezvous_port`: two jobs on one machine both get the launcher's default port (29500); the second
  would die in a deep EADDRINUSE traceback (after a two-minute hang on some backends). Rank 0 tries the
  port first and stops with the launcher flag that fixes it.
- `quiet_third_party_noise`: warnings id3-ds cannot act on, repeated once per rank.
- `share_cpu_threads`: ranks on one machine split its cores instead of each taking all of them.

DeepSpeed's op builds (their folder, the line while one runs, stale locks) are in
`id3_ds.integration.op_builds`.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings

import torch

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


# -- third-party noise --------------------------------------------------------------------------------

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def _drop_optional_kernel_line(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def quiet_third_party_noise(rank: int | None = None) -> None:
    """Filter warnings a user cannot act on; ranks > 0 keep transformers to errors (rank 0 shows them once).

    - torch 2.13 deprecates `all_gather_into_tensor` and `reduce_scatter_tensor`, which DeepSpeed's ZeRO calls
      (id3-ds does not): a FutureWarning per rank that only a DeepSpeed release can fix. torch's
      `_exception_logger` wrapper makes every such warning point at torch/distributed/c10d_logger.py, so each
      is matched by that module and its message, and nothing else is hidden.
    - bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" at import: an optional
      faster kernel (the `kernels` package) is absent and it falls back to its own; only that record is
      dropped, every other bitsandbytes warning stays.
    - transformers' load report ("classifier.weight | MISSING ... newly initialized" for a fresh head) and
      its "Loading weights" bar are worth reading once, not once per rank.
    `rank` defaults to the launcher's RANK (main() calls this before the process group exists).
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):  # DeepSpeed's ZeRO calls both (id3-ds: neither)
        warnings.filterwarnings(
            "ignore",
            message=rf"`torch\.distributed\.{name}` is deprecated",
            category=FutureWarning,
            module=r"torch\.distributed\.c10d_logger",
        )
    logging.getLogger(BNB_CPU_LOGGER).addFilter(_drop_optional_kernel_line)
    if rank > 0:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


# -- CPU threads per rank -------------------------------------------------------------------------------


def share_cpu_threads(env: dict[str, str] | None = None, cores: int | None = None) -> int | None:
    """Give each rank on this machine its share of the cores when nobody chose a thread count; return it.

    torchrun sets OMP_NUM_THREADS=1 for several ranks, but the `deepspeed` launcher leaves it unset, so
    every rank starts one torch thread per core: N ranks then fight over the same cores, and on CPU a
    step ran several times slower than with one thread per rank (sparse-state ID3 on the tiny LLaMA, 2 ranks
    on 2 cores: 161-641 tokens/s against 3.7k-7.4k). An OMP_NUM_THREADS the user set always wins; one
    process alone keeps torch's default.
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None
    local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or "1"
    try:
        ranks_here = int(local)
    except ValueError:
        return None
    if ranks_here <= 1:
        return None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // ranks_here)
    torch.set_num_threads(threads)
    return threads

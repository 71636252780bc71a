"""The tests' launcher: ranks forked from a server that imported torch, DeepSpeed and transformers once.

Why: on the 2-core CI machine a launched run of the tiny model spends most of its CPU importing torch,
DeepSpeed and transformers, in each rank and in torchrun's agent (~13.5 s of CPU for a 2-rank 4-step run whose
work is under 1 s), and the suite launches about 75 runs. Here each pytest worker starts one server
(tests/conftest.py) that imports those libraries once; every launch forks its ranks from it. Each rank is
still its own process, with its own gloo process group, DeepSpeed engine, exit path (the interpreter's normal
shutdown) and exit code; only the imports happened before the fork.

One launch, as `launch_command` (id3_ds/runtime/launching.py) spells it when ID3_DS_FORK_RANKS names a server:
    python id3_ds/runtime/fork_ranks.py --server SOCKET --nproc N --port P script.py [args...]
This client imports nothing heavy. It hands the server its environment, working directory and stdin/stdout/
stderr, and exits with the run's exit code. The server forks a manager for the launch, which takes the
client's environment, directory and streams, then forks the ranks. With several ranks each gets RANK /
LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT, and rank 0 hosts the rendezvous
store, as under plain python. One rank is run as `python script.py` would be. When a rank fails, the others
get SIGTERM, then SIGKILL after GRACE_S, and the exit code is 1, as under torchrun. When the client dies
(a test's timeout kills its process group), the manager stops the ranks.

What the server imports starts no thread: a fork copies only the calling thread. `datasets` is left out
because pyarrow starts a jemalloc thread. Users launch with `deepspeed` or `torchrun`; a few tests keep
torchrun (tests/launcher.py `torchrun=True`), and ID3_DS_FORK_RANKS=0 starts every test launch as fresh
processes (torchrun, or plain python for one rank).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import runpy
import select
import signal
import socket
import struct
import sys
import time

GRACE_S = 10.0  # after SIGTERM, a rank still alive (e.g. hung in a collective) gets SIGKILL
_LEN = struct.Struct("!I")
_CODE = struct.Struct("!i")


# ---- client: one launch ----------------------------------------------------------------------------------


def launch(server: str, nproc: int, port: int, script: str, args: list[str]) -> int:
    """Run `script` on `nproc` ranks forked by the server at `server`; returns the run's exit code."""
    conn = _connect(server)
    request = {"nproc": nproc, "port": port, "script": script, "args": args}
    request.update(env=dict(os.environ), cwd=os.getcwd())
    socket.send_fds(conn, [b"F"], [_usable(fd) for fd in (0, 1, 2)])
    body = json.dumps(request).encode()
    conn.sendall(_LEN.pack(len(body)) + body)
    reply = _recv_exact(conn, _CODE.size)
    if reply is None:
        print("fork_ranks: the server ended the launch without an exit code", file=sys.stderr)
        return 1
    return _CODE.unpack(reply)[0]


def _connect(server: str, wait_s: float = 180.0) -> socket.socket:
    """Connect to the server, waiting while it starts (its imports take seconds on a loaded machine)."""
    deadline = time.monotonic() + wait_s
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(server)
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            if time.monotonic() > deadline:
                sys.exit(
                    f"fork_ranks: no fork server listening on {server} after {wait_s:.0f} s (its log: "
                    "fork_server_*.log in pytest's base temp folder); ID3_DS_FORK_RANKS=0 launches without it"
                )
            time.sleep(0.1)


def _usable(fd: int) -> int:
    """`fd` when it is open, else /dev/null (a client started with a closed stdin still launches)."""
    try:
        os.fstat(fd)
        return fd
    except OSError:
        return os.open(os.devnull, os.O_RDWR)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# ---- server: one per pytest worker -----------------------------------------------------------------------


def preimport() -> None:
    """The modules every rank imports and that cost the most (torch ~1.6 s, transformers' model index ~1 s),
    and the CPU's description: `avoid_start_costs` keeps py-cpuinfo's answer for the process, so a forked
    rank skips the probe's 1-second clock measurement (a fresh rank pays it once)."""
    import cpuinfo
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from id3_ds.integration.start_costs import avoid_start_costs

    avoid_start_costs()
    cpuinfo.get_cpu_info()


def serve(path: str) -> None:
    """Accept launches on the unix socket `path` until the parent (the pytest worker) is gone."""
    parent = os.getppid()
    preimport()
    threads = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["main"]
    if len(threads) > 1:  # a fork would copy the main thread only, leaving the others' locks held forever
        sys.exit(
            f"fork_ranks: {len(threads)} threads after the imports (OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS')}); start the server with OMP_NUM_THREADS=1"
        )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    listener.settimeout(1.0)
    while os.getppid() == parent:
        _reap()
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            manage(conn)  # never returns
        conn.close()


def _reap() -> None:
    """Collect finished managers, so none stays a zombie."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def manage(conn: socket.socket) -> None:
    """One launch, in a process forked for it: take on the client's environment and streams, run the ranks,
    send back the exit code. Ends the process."""
    _, fds, _, _ = socket.recv_fds(conn, 1, 3)
    size = _LEN.unpack(_recv_exact(conn, _LEN.size) or b"\0\0\0\0")[0]
    request = json.loads(_recv_exact(conn, size) or b"{}")
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    _fresh_std_streams()
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    code = run_ranks(request["nproc"], request["port"], request["script"], request["args"], conn)
    try:
        conn.sendall(_CODE.pack(code))
    except OSError:  # the client is gone
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the manager is plumbing: no interpreter shutdown over the imported heap


def _fresh_std_streams() -> None:
    """sys.stdout/stderr over the client's fds 1 and 2, line-buffered (the server's own streams were made for
    /dev/null and a log file)."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = io.TextIOWrapper(
            os.fdopen(fd, "wb", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


# ---- the ranks -------------------------------------------------------------------------------------------


def run_ranks(nproc: int, port: int, script: str, args: list[str], client: socket.socket) -> int:
    """Fork `nproc` ranks of `script`, wait for them; returns 0, or 1 when one failed or the client left."""
    sys.stdout.flush()
    sys.stderr.flush()
    pids: dict[int, int] = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:  # the rank: its exit is the interpreter's normal shutdown, as in a fresh process
            client.close()
            sys.exit(run_rank(rank, nproc, port, script, args))
        pids[pid] = rank
    while pids:
        readable, _, _ = select.select([client], [], [], 0.05)
        if readable and not client.recv(1):
            print("fork_ranks: the launch's client is gone; stopping its ranks", file=sys.stderr)
            stop(pids)
            return 1
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            continue
        rank = pids.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            if not pids and nproc == 1:
                return code if code > 0 else 1
            print(f"fork_ranks: rank {rank} (pid {pid}) exited with {code}; stopping the others", file=sys.stderr)
            stop(pids)
            return 1
    return 0


def run_rank(rank: int, nproc: int, port: int, script: str, args: list[str]) -> int:
    """Run `script` as `python script args` would (as rank `rank` of `nproc`); returns its exit code."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if nproc > 1:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    sys.argv = [script, *args]
    # the path a fresh `python script` would start with: the script's folder, then the client's PYTHONPATH
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[:1] = [os.path.dirname(os.path.abspath(script)), *extra]
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
    parser.add_argument("--serve", metavar="SOCKET", help="run the server on this unix socket")
    parser.add_argument("--server", metavar="SOCKET", help="launch through the server on this socket")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("script", nargs="?")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    if opts.serve:
        serve(opts.serve)
    elif opts.server and opts.script:
        sys.exit(launch(opts.server, opts.nproc, opts.port, opts.script, opts.args))
    else:
        parser.error("give --serve SOCKET, or --server SOCKET and a script")


if __name__ == "__main__":
    main()

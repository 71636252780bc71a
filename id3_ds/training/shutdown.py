"""End a DeepSpeed/gloo worker process without running interpreter finalization under live gloo threads.

A worker that returns normally reaches Python's finalization with its gloo process groups alive: each
group keeps two C++ worker threads (`pt_gloo_runloop`) plus a `gloo_tcp_loop`, and nothing in the worker
can stop them first. The DeepSpeed engine outlives the worker's frame (still alive after gc.collect())
and holds the groups, and torch's
destroy_process_group() only calls shutdown() on them: the threads stay, as /proc/self/task shows. The
abort comes from that teardown: "terminate called without an active exception", SIGABRT, exit code -6,
after every byte of the worker's output was written, at about one launch in 40 on a loaded 2-core machine
(a timing race). The gloo threads are the only threads besides the main one then. The likely path: a
runloop thread owns the last collective it ran until it loops back; dropping that work while the
interpreter finalizes can need the GIL (the last reference to a tensor made in Python), Python ends such
a thread with pthread_exit, and the forced unwind through a noexcept frame aborts.

`exit_process()` is for the very end of a worker, after its last collective (a barrier: every rank has
finished every collective, so no peer waits on this one) and after its results are written and closed.
It flushes stdout/stderr and leaves with os._exit(0): the kernel ends the gloo threads, the sockets and
the memory at once, and no C++ destructor or Python finalizer runs. Nothing is lost: the worker's files
are closed, its streams flushed, and DeepSpeed's CPU shared-memory all-reduce keeps no state to clean up
(it maps segments only when the deepspeed launcher sets LOCAL_SIZE; torchrun does not). An exception
before this call still propagates and exits non-zero as usual: this ends only runs that succeeded.
"""

from __future__ import annotations

import os
import sys


def exit_process() -> None:
    """Flush the standard streams and end the process with status 0, skipping interpreter finalization."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to lose there
            pass
    os._exit(0)

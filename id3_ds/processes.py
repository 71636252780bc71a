"""A free TCP port for a local rendezvous: launch/train.py's single-node runs use it (and so do the
benchmark and test launchers, id3_ds/runtime/launching.py)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on this machine now: a fixed port would make two runs at once collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

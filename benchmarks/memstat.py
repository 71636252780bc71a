"""Process memory readings for the benchmarks (Linux /proc): current and peak RSS, and a peak reset."""

from __future__ import annotations


def proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> bool:
    """VmHWM := current RSS (Linux >= 4.0), so the next peak belongs to what runs next."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

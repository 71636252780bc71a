"""The benchmark's quick mode runs, and its numbers hold the stated bounds.

Stated bounds (docs/delta-format.md): delta bytes within 10 % of B x 8 (+ 4 KB) for a 0.1 % budget,
and merge peak RSS growth at most the largest shard (it streams one tensor at a time).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_stays_within_stated_bounds() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_delta.py"), "--quick", "--json", "--no-record"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert "merge peak RSS" in res.stdout
    assert r["delta_bytes"] <= 1.10 * r["b_x_8"] + 4096
    assert r["rss_growth"] <= r["largest_shard"], r
    assert r["merge_s"] > 0 and r["copy_s"] > 0

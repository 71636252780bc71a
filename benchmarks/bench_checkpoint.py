"""Checkpoint size on disk: sparse-state ID3 against dense-state ID3, ZeRO-3, 2 ranks, B = 0.1 %.

    python benchmarks/bench_checkpoint.py            # the ~100M LLaMA-style model (97.5M), one step each
    python benchmarks/bench_checkpoint.py --quick    # ~10M parameters
    python benchmarks/bench_checkpoint.py --json     # also print the rows as one JSON line

Why: a sparse-state checkpoint holds no DeepSpeed state, only each rank's ID3 shard (mask, fp32 master and
moments of its chosen entries) and the LR schedule, so it should grow with B, not with the model; a dense
one holds DeepSpeed's fp32 masters and moments of every weight. Each variant is one launch/train.py run of
`--steps` steps with save_steps=1 on bench_memory's model and config (the same overrides as its variants),
and the size is every file under the last checkpoint folder. The budget B is 0.1 % of the whole model, so
after one step of a 1-step run all of it is chosen (the shards hold B entries, as at the end of a run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_memory import VARIANTS, write_config, write_model  # noqa: E402
from benchmarks.results import record_results  # noqa: E402
from id3_ds.runtime.launching import launch_command  # noqa: E402

CASES = ["id3 (dense state)", "id3 (sparse state)"]  # bench_memory's variants; dense first (the reference)


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder` (what copying the checkpoint moves)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def last_checkpoint(run: Path) -> Path:
    """The newest checkpoint-NNNNNNNN folder of a run."""
    found = sorted(run.glob("checkpoint-*"))
    if not found:
        raise SystemExit(f"no checkpoint was written under {run}")
    return found[-1]


def run_case(config: Path, variant: str, steps: int, out: Path) -> dict:
    """One 2-rank launch/train.py run of `variant` saving every step; the last checkpoint's size and budget."""
    overrides = [*VARIANTS[variant], f"train.steps={steps}", "train.save_steps=1", f"train.output_dir={out}"]
    cmd = launch_command(2, ROOT / "launch" / "train.py", "--config", str(config), *overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant}: the run failed:\n{proc.stdout[-4000:]}")
    ckpt = last_checkpoint(out)
    start = next(json.loads(line) for line in (out / "log.jsonl").open() if '"start"' in line)
    return {"variant": variant, "steps": steps, "budget": start["budget"], "bytes": folder_bytes(ckpt)}


def measure(size: str, steps: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="id3-ckpt-") as d:
        tmp = Path(d)
        write_model(size, tmp / "model")
        config = write_config(tmp / "model", tmp)
        for variant in CASES:
            rows.append(run_case(config, variant, steps, tmp / variant.replace(" ", "_")))
    dense = rows[0]["bytes"]
    for r in rows:
        r["dense_over_this"] = dense / r["bytes"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| variant | B (entries) | checkpoint bytes | dense / this |", "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['budget']:,} | {r['bytes']:,} | {r['dense_over_this']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~10M parameters")
    ap.add_argument("--steps", type=int, default=1, help="steps per run (save_steps=1; default 1)")
    ap.add_argument("--no-record", action="store_true", help="do not record this run in benchmarks/RESULTS.md")
    ap.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    args = ap.parse_args()
    size = "10M" if args.quick else "100M"
    rows = measure(size, args.steps)
    text = (
        f"{table(rows)}\n\n{size} LLaMA-style model (fp32), ZeRO-3, 2 ranks, {args.steps} step(s) with save_steps=1, "
        "budget 0.1 % of the model; bytes of every file in the last checkpoint folder (both ranks' shards)."
    )
    print(text)
    if args.json:
        print(json.dumps(rows))
    if not args.no_record:
        flags = (" --quick" if args.quick else "") + (f" --steps {args.steps}" if args.steps != 1 else "")
        details = f"fp32, {size} model, ZeRO-3, 2 ranks, budget 0.1 %"
        record_results("Checkpoint size", details, f"python benchmarks/bench_checkpoint.py{flags}", text)


if __name__ == "__main__":
    main()

"""ID3's costs at real scale (LLaMA-7B/13B/70B on 8/64/512 GPUs, ZeRO-3), checked against a measured small run.

    python benchmarks/bench_projection.py                 # the projection + validation on a tiny 2-rank run
    python benchmarks/bench_projection.py --quick         # the projection only (arithmetic: instant)
    python benchmarks/bench_projection.py --steps 2000    # another T (default: 3 epochs of Alpaca at 128)

Why: nobody here can run a 70B model, but every ID3 cost follows from a formula the code obeys exactly
(benchmarks/projection.py). The validation proves that on a real run: a tiny LLaMA trained by launch/train.py
with ZeRO-3 on 2 ranks, whose checkpoint shards give the mask bytes, whose exported delta gives the
delta size, and whose ID3 all-gathers are counted in the processes themselves (this script wraps
launch/train.py and counts every call of the all-gather in id3_ds.integration.collectives).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import projection as pj  # noqa: E402
from benchmarks.bench_step_overhead import SIZES  # noqa: E402
from benchmarks.results import record_results  # noqa: E402
from id3_ds.runtime.launching import launch_command  # noqa: E402

VALIDATE_STEPS = 4


class CountingDist:
    """torch.distributed with all_gather counted: bytes received per call (the tensors gathered into)."""

    def __init__(self, real) -> None:
        self._real = real
        self.received: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def all_gather(self, tensor_list, tensor, *args, **kwargs):
        self.received.append(sum(t.numel() * t.element_size() for t in tensor_list))
        return self._real.all_gather(tensor_list, tensor, *args, **kwargs)


def train_wrapper(out: str, train_args: list[str]) -> None:
    """Run launch/train.py in this process with ID3's all-gather counted; write the counts per rank."""
    from id3_ds.integration import collectives

    counting = CountingDist(collectives.dist)
    collectives.dist = counting
    sys.argv = [str(ROOT / "launch" / "train.py"), *train_args]
    runpy.run_path(sys.argv[0], run_name="__main__")
    Path(out, f"allgather-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(counting.received))


def tiny_run(tmp: Path, steps: int = VALIDATE_STEPS, world: int = 2) -> dict:
    """Train the builtin tiny LLaMA with ZeRO-3 on `world` ranks and measure what the calculator predicts."""
    import torch

    from id3_ds.checkpoint import checkpoint_dir
    from id3_ds.checkpoint.mask_file import load_mask
    from id3_ds.files.safetensors_io import load_tensors

    run = tmp / "run"
    overrides = [
        "--config",
        str(ROOT / "configs" / "tiny_cpu.json"),
        "deepspeed.zero_optimization.stage=3",
        f"train.steps={steps}",
        f"train.save_steps={steps}",
        f"train.output_dir={run}",
        "train.progress_bar=false",
        "train.export_delta=true",
    ]
    cmd = launch_command(world, __file__, "--train-wrapper", str(tmp), "--", *overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"tiny ZeRO-3 run failed:\n{proc.stdout[-4000:]}")
    ckpt = checkpoint_dir(run, steps)
    mask_bytes, meta = [], {}
    for r in range(world):
        state, meta = load_mask(ckpt / "id3" / f"shard-{r:05d}-of-{world:05d}.safetensors")
        mask_bytes.append(
            sum(
                t.numel() * t.element_size()
                for pm in state.params.values()
                for t in (pm.indices, pm.chosen_at, pm.base)
            )
        )
    delta = run / "delta"
    payload, fixup_bytes, fixups, tensors, largest = 0, 0, 0, 0, 0
    cfg = json.loads((delta / "delta_config.json").read_text())
    for e in cfg["params"].values():
        tensors += 1
        fixups += e.get("fixes", 0)
        largest = max(largest, int(torch.Size(e["shape"]).numel()))
    stored, _ = load_tensors(delta / "delta.safetensors", "delta file")
    for key, t in stored.items():
        if key.endswith(".gaps"):  # one 2-byte code per entry; escape codes (gaps >= 65535) are overhead
            payload += 2 * int((t.to(torch.int64) != 65535).sum())
        elif key.endswith((".indices", ".values")):
            payload += t.numel() * t.element_size()
        else:
            fixup_bytes += t.numel() * t.element_size()
    return {
        "world": world,
        "budget": int(meta["budget"]),
        "steps": int(meta["steps"]),
        "mask_bytes": mask_bytes,
        "allgather": [json.loads((tmp / f"allgather-rank{r}.json").read_text()) for r in range(world)],
        "delta_entries": int(cfg["total_entries"]),
        "delta_payload": payload,
        "delta_fixup_bytes": fixup_bytes,
        "delta_fixups": fixups,
        "delta_tensors": tensors,
        "delta_largest": largest,
        "delta_dir_bytes": sum((delta / f).stat().st_size for f in ("delta.safetensors", "delta_config.json")),
    }


def compare(m: dict) -> list[tuple[str, str, str, bool]]:
    """(quantity, predicted, measured, agrees) for every figure the calculator makes, on the measured run."""
    b, t, w = m["budget"], m["steps"], m["world"]
    rows = [("budget B / steps T / ranks", "", f"{b:,} / {t} / {w}", True)]
    total = sum(m["mask_bytes"])
    rows.append(
        ("mask bytes, all ranks (16 B)", f"{pj.mask_bytes_total(b):,}", f"{total:,}", total == pj.mask_bytes_total(b))
    )
    exp = pj.mask_bytes_per_rank(b, w)
    for r, got in enumerate(m["mask_bytes"]):  # an expectation: which rank owns a winner depends on the data
        rows.append((f"mask bytes, rank {r} (16 B x B / world)", f"{exp:,.0f}", f"{got:,} ({got / exp:.2f}x)", True))
    low, high = pj.allgather_bytes_run(b, t, w), pj.allgather_bytes_run_worst(b, t, w)
    for r, got in enumerate(m["allgather"]):  # round A every step; round B only when winners crowd one rank
        rows.append((f"all-gather calls, rank {r}", f"{t}..{2 * t}", f"{len(got)}", t <= len(got) <= 2 * t))
        rows.append(
            (f"all-gather bytes per run, rank {r}", f"{low:,}..{high:,}", f"{sum(got):,}", low <= sum(got) <= high)
        )
    rows.append(("delta entries", f"{b:,}", f"{m['delta_entries']:,}", m["delta_entries"] == b))
    payload = pj.delta_payload_bytes(b, m["delta_largest"])
    rows.append(
        ("delta index + value bytes (B x 6)", f"{payload:,}", f"{m['delta_payload']:,}", m["delta_payload"] == payload)
    )
    fix = 8 * m["delta_fixups"]
    rows.append(
        ("delta fix-up bytes (8 per fix-up)", f"{fix:,}", f"{m['delta_fixup_bytes']:,}", m["delta_fixup_bytes"] == fix)
    )
    bound = pj.delta_bytes_bound(b, m["delta_tensors"], m["delta_largest"], m["delta_fixups"])
    size = m["delta_dir_bytes"]
    rows.append(("delta directory bytes (<= bound)", f"<= {bound:,}", f"{size:,}", payload + fix < size <= bound))
    return rows


def validation_table(rows: list[tuple[str, str, str, bool]]) -> str:
    lines = ["| quantity | predicted | measured | agrees |", "| --- | --- | --- | --- |"]
    lines += [f"| {q} | {p} | {m} | {'yes' if ok else 'NO'} |" for q, p, m, ok in rows]
    return "\n".join(lines)


def bench_model(size: str = "100M") -> pj.ModelSpec:
    """The benchmarks' LLaMA-style model (bench_step_overhead.SIZES, as bench_memory trains it)."""
    h, n, inter, vocab = SIZES[size]
    return pj.llama_exact(f"bench {size}", n, h, inter, vocab)


def state_text() -> str:
    """The model-state projection: LLaMA at scale in bf16, and the benchmark model as bench_memory runs it."""
    small = [pj.state_row(bench_model(), 2, 0.001, "fp32", steps=3)]  # bench_memory runs 3 steps
    return (
        "Model state per rank at ZeRO-3 (benchmarks/projection.py: full and dense ID3 (d + 16) B x N / world, "
        "dense ID3 + 16 B x B / world of mask; sparse ID3 d x N / world + 28 B x B / world, plus the step's "
        "transient, part of the peak: with the gradient streamed (grad_accum 1) one parameter's at a time, the "
        "largest tensor L's gradient d x L, its share d x L / world (and a padded copy when L is not a multiple "
        "of world), the scoring scratch (32 MiB) and the kept values 4 B x B / world + 16 B x 5k; with "
        "grad_accum > 1 also the fp32 accumulation buffer 4 B x N / world; LoRA d x N / world + (d + 16) B x "
        "adapter / world; d = 2 in bf16, 4 in fp32; k = ceil(B / T) with T as above). Activations, "
        "communication buffers and the runtime are not model state and are not counted.\n\n"
        + pj.state_table(pj.state_grid())
        + "\n\nThe same formulas for the benchmark model (fp32, as `benchmarks/bench_memory.py` trains it on 2 "
        "CPU ranks, 3 steps): to compare with its measured peak above the pre-model baseline, which also holds "
        "activations and DeepSpeed's buffers.\n\n" + pj.state_table(small)
    )


def record(text: str, cmd: str) -> None:
    record_results("Projection to real scale", "ZeRO-3, all entries selectable", cmd, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the projection table only, no validation run")
    ap.add_argument("--validate", action="store_true", help="run the validation also with --quick")
    ap.add_argument("--no-record", action="store_true", help="do not record this run in benchmarks/RESULTS.md")
    ap.add_argument("--json", action="store_true", help="also print the validation measurements as one JSON line")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps T (default: 3 epochs of Alpaca at 128)")
    ap.add_argument("--train-wrapper", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.train_wrapper:
        train_wrapper(args.train_wrapper, [a for a in rest if a != "--"])
        return
    steps = args.steps or pj.alpaca_steps()
    text = (
        f"T = {steps} optimizer steps (3 epochs of Alpaca's {pj.ALPACA_EXAMPLES:,} examples at global batch 128 "
        f"is {pj.alpaca_steps()}); parameters: "
        + ", ".join(f"{m.name} {m.params / 1e9:.2f}e9 in {m.tensors} tensors" for m in pj.MODELS)
        + ". mask/rank is at the end of training (16 B x B / world); all-gather is what each rank receives "
        "at the first steps, when winners are spread over the ranks; and if one rank held them all (round B, "
        "+ world x k x 16 B); delta is the upper bound B x 6 + headers "
        "(uint16 gap codes + fp32 values, format v3), without fix-ups.\n\n"
        + pj.table(pj.default_grid(steps))
        + "\n\n"
        + state_text()
    )
    measured = None
    if args.validate or not args.quick:
        with tempfile.TemporaryDirectory(prefix="id3-proj-") as tmp:
            measured = tiny_run(Path(tmp))
        rows = compare(measured)
        verdict = "all agree" if all(ok for *_, ok in rows) else "MISMATCH"
        text += (
            f"\n\nValidation: builtin tiny LLaMA, launch/train.py, ZeRO-3, 2 ranks, {VALIDATE_STEPS} steps, "
            f"budget 1 % ({verdict}):\n\n{validation_table(rows)}"
        )
    print(text)
    if args.json and measured is not None:
        print(json.dumps({"measured": measured, "agree": all(ok for *_, ok in compare(measured))}))
    if not args.no_record:
        flags = (" --quick" if args.quick else "") + (" --validate" if args.validate and args.quick else "")
        flags += f" --steps {args.steps}" if args.steps else ""
        record(text, f"python benchmarks/bench_projection.py{flags}")


if __name__ == "__main__":
    main()

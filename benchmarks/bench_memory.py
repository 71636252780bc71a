"""Per-rank peak memory by method at ZeRO-3 on 2 ranks: sparse- and dense-state ID3, full, LoRA r=16.

    python benchmarks/bench_memory.py            # the ~100M LLaMA-style model (97.5M), grad_accum 1 and 4
    python benchmarks/bench_memory.py --quick    # ~10M parameters, grad_accum 1: four launches
    python benchmarks/bench_memory.py --json     # also print the rows as one JSON line
    python benchmarks/bench_memory.py --from-json LOG   # tabulate (and record) an earlier --json run's rows
    python benchmarks/bench_memory.py --accum 1 --variants 'full,full (torch AdamW),full (8-bit AdamW),id3 dense
        (torch AdamW),id3 dense (8-bit AdamW)'   # torch AdamW against 8-bit AdamW (train.optimizer), own section

Why: the claim to check is what a method costs a rank, measured on what a user runs. Each variant is a
list of launch/train.py overrides on one shared config (VARIANTS), so a new mode is one more entry; each
(variant, grad_accum) runs in its own torchrun launch of 2 ranks, since peak RSS is per process. Every
rank records its RSS once torch, DeepSpeed, transformers and PEFT are imported (the pre-model baseline),
then runs launch/train.py in-process and records its peak (VmHWM); the table reports the peak above that
baseline, next to the model state benchmarks/projection.py predicts for the same model (fp32 here: the
CPU ranks train in fp32). The measured figure also holds activations, DeepSpeed's buffers and allocator
slack, which the prediction leaves out. To say where the peak is set, each rank also marks RSS and VmHWM at
the phase boundaries train.py crosses (phase_hooks: once the engine is built, after the last step, at the
end), resetting VmHWM at each, so the table splits the lifetime peak into build, steps and final save.

The budget is 0.1 % of the model over the steps run. DeepSpeed's reduce bucket is set to 10^7 entries for
every variant (its default, 5 x 10^8, allocates a 2 GB fp32 buffer per rank whatever the method, which
would hide the differences measured here); sparse state lowers it to 10^6 itself (ds_config: it reduces
nothing through DeepSpeed). glibc's mmap threshold is fixed at 1 MiB in every worker, so
freed big blocks go back to the OS at once and RSS reflects what tensors hold.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import projection as pj  # noqa: E402
from benchmarks.bench_step_overhead import SIZES, build_model  # noqa: E402
from benchmarks.memstat import proc_status, reset_peak  # noqa: E402
from benchmarks.results import record_results  # noqa: E402
from id3_ds.runtime.launching import launch_command  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every linear layer
# name -> launch/train.py overrides ('full' first: the others are reported against it)
VARIANTS: dict[str, list[str]] = {
    "full": ["method=full"],
    "id3 (sparse state)": ["method=id3", "id3.state=sparse"],
    "id3 (dense state)": ["method=id3"],
    "lora r=16": ["method=lora", "lora.rank=16", "lora.alpha=32", f"lora.target_modules={json.dumps(LINEAR)}"],
}
# not in the default run (name them in --variants): one method under torch AdamW and under 8-bit AdamW
OPTIMIZER_VARIANTS: dict[str, list[str]] = {
    "full (torch AdamW)": ["method=full", "train.optimizer=torch_adamw"],
    "full (8-bit AdamW)": ["method=full", "train.optimizer=adamw_8bit"],
    "id3 dense (torch AdamW)": ["method=id3", "train.optimizer=torch_adamw"],
    "id3 dense (8-bit AdamW)": ["method=id3", "train.optimizer=adamw_8bit"],
}
ALL_VARIANTS = {**VARIANTS, **OPTIMIZER_VARIANTS}
# bytes per trained entry of both Adam moments: fp32, or bitsandbytes' uint8 codes + an fp32 absmax per 256
MOMENT_BYTES = {"fp32": 8.0, "8bit": 2 + 2 * 4 / 256}
BUDGET = 0.001
MICRO_BATCH = 2
# a rank's phase marks (bytes; phase_hooks): RSS and peak once the engine is built, the peak of the steps alone,
# RSS before the final checkpoint save, the save's (and exit's) peak, RSS at the end
PHASES = ("built_rss", "built_peak", "steps_peak", "pre_save_rss", "save_peak", "end_rss")


def fix_mmap_threshold() -> None:
    """Blocks >= 1 MiB are mmapped and unmapped on free (no dynamic threshold, no retained heap)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def predicted_state(variant: str, size: str, accum: int, steps: int, world: int = 2) -> float:
    """The model state benchmarks/projection.py predicts per rank for this variant (fp32), in bytes; sparse
    state depends on grad_accum (the fp32 accumulation buffer) and on k = ceil(B / steps)."""
    h, n, inter, vocab = SIZES[size]
    spec = pj.llama_exact(size, n, h, inter, vocab)
    d, budget = pj.DTYPE_BYTES["fp32"], pj.budget_entries(spec.params, BUDGET)
    overrides = ALL_VARIANTS[variant]
    if "train.optimizer=adamw_8bit" in overrides:  # full or dense ID3: every weight's moments in 8 bits
        saved = (MOMENT_BYTES["fp32"] - MOMENT_BYTES["8bit"]) * spec.params / world
        return predicted_state(variant.replace("8-bit AdamW", "torch AdamW"), size, accum, steps, world) - saved
    if "method=full" in overrides:
        return pj.state_full(spec.params, world, d).peak
    if "method=lora" in overrides:
        return pj.state_lora(spec.params, pj.lora_params(spec), world, d).peak
    if "id3.state=sparse" in overrides:
        k = pj.per_step(budget, steps)
        return pj.state_sparse_id3(spec.params, budget, world, d, spec.largest_tensor, accum, k).peak
    return pj.state_dense_id3(spec.params, budget, world, d).peak


def write_model(size: str, folder: Path) -> None:
    """The benchmark model (random weights, fp32) with the builtin tiny LLaMA's tokenizer, as an HF folder."""
    from transformers import AutoTokenizer

    from id3_ds.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama"))
    model = build_model(size)
    if len(tok) > model.config.vocab_size:
        raise SystemExit(f"the tokenizer's {len(tok)} tokens exceed the {size} model's vocabulary")
    model.config.update({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def write_config(model_dir: Path, folder: Path) -> Path:
    """The one training config every variant overrides: ZeRO-3, fp32, 0.1 % budget, 128-token samples."""
    cfg = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "data": {
            "path": str(ROOT / "id3_ds" / "resources" / "tiny_alpaca.jsonl"),
            "format": "alpaca",
            "max_length": 128,
        },
        "id3": {"budget": BUDGET},
        "train": {
            "lr": 1e-4,
            "micro_batch_size": MICRO_BATCH,
            "save_steps": 0,
            "resume": None,
            "export_delta": False,
            "progress_bar": False,
        },
        "deepspeed": {
            "zero_optimization": {"stage": 3, "reduce_bucket_size": 10_000_000},
            "steps_per_print": 10**9,
        },
    }
    path = folder / "config.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def reset_or_stop() -> None:
    """Reset VmHWM, or stop: without the reset every phase's 'peak' would be the lifetime peak so far."""
    if not reset_peak():
        raise SystemExit("bench_memory: cannot write /proc/self/clear_refs to reset VmHWM (Linux >= 4.0 needed)")


def phase_hooks(marks: dict) -> None:
    """Split the rank's lifetime peak into phases without editing launch/train.py: train.py calls
    checkpoint.resume right after the engine and the update are built (before step 1) and checkpoint.save
    after the last step, so wrapping those two records RSS and VmHWM there and resets VmHWM (so each phase's
    peak is its own). 'build' = model load, zero.Init partitioning, engine and update construction."""
    from id3_ds import checkpoint

    resume, save = checkpoint.resume, checkpoint.save

    def resume_then_mark(*args, **kwargs):
        start = resume(*args, **kwargs)
        marks.update(built_rss=proc_status("VmRSS:"), built_peak=proc_status("VmHWM:"))
        reset_or_stop()
        return start

    def mark_then_save(*args, **kwargs):
        if "steps_peak" not in marks:  # the first save ends the steps (save_steps=0: only the final one)
            marks.update(steps_peak=proc_status("VmHWM:"), pre_save_rss=proc_status("VmRSS:"))
            reset_or_stop()
        return save(*args, **kwargs)

    checkpoint.resume, checkpoint.save = resume_then_mark, mark_then_save


def run_worker(out: str, train_args: list[str]) -> None:
    """One rank: baseline RSS after the imports, launch/train.py in this process, then its peak RSS; the
    phase marks split that lifetime peak into build, steps and the final save (phase_hooks)."""
    fix_mmap_threshold()
    import deepspeed  # noqa: F401  (imported before the baseline: libraries are not what a method costs)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    baseline = proc_status("VmRSS:")
    marks: dict = {}
    phase_hooks(marks)
    sys.argv = [str(ROOT / "launch" / "train.py"), *train_args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    marks.update(save_peak=proc_status("VmHWM:"), end_rss=proc_status("VmRSS:"))
    # VmHWM was reset at each mark: the lifetime peak is the largest phase peak
    lifetime = max(marks.get("built_peak", 0), marks.get("steps_peak", 0), marks["save_peak"])
    rank = os.environ.get("RANK", "0")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"baseline": baseline, "peak": lifetime, **marks}))


def launch(config: Path, variant: str, accum: int, steps: int, tmp: Path) -> list[dict]:
    """One torchrun launch of 2 ranks for (variant, grad_accum); returns each rank's numbers."""
    overrides = [*ALL_VARIANTS[variant], f"train.grad_accum={accum}", f"train.steps={steps}"]
    return launch_workers(config, overrides, tmp, f"{variant}, grad_accum {accum}")


def launch_workers(config: Path, overrides: list[str], tmp: Path, what: str) -> list[dict]:
    """launch/train.py on 2 ranks under this file's --worker (also bench_quantized's); each rank's numbers."""
    out = Path(tempfile.mkdtemp(prefix="rank-", dir=tmp))
    args = ["--config", str(config), *overrides, f"train.output_dir={out / 'run'}"]
    cmd = launch_command(2, __file__, "--worker", str(out), "--", *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what}: the launch failed:\n{proc.stdout[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    shutil.rmtree(out, ignore_errors=True)
    return ranks


def measure(size: str, steps: int, accums: list[int], variants: list[str]) -> list[dict]:
    """Every (grad_accum, variant) once, variants alternating within each grad_accum."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="id3-mem-") as d:
        tmp = Path(d)
        write_model(size, tmp / "model")
        config = write_config(tmp / "model", tmp)
        for accum in accums:
            full: dict[int, int] = {}  # rank -> full fine-tuning's peak above baseline ('full' runs first)
            for variant in variants:
                ranks = launch(config, variant, accum, steps, tmp)
                for r, got in enumerate(ranks):
                    above = got["peak"] - got["baseline"]
                    if variant == "full":
                        full[r] = above
                    rows.append(
                        {
                            "variant": variant,
                            "size": size,
                            "grad_accum": accum,
                            "rank": r,
                            "steps": steps,
                            "baseline": got["baseline"],
                            "peak": got["peak"],
                            "above_baseline": above,
                            "vs_full": above / full[r] if r in full else None,
                            "predicted_state": predicted_state(variant, size, accum, steps),
                            **{key: got.get(key) for key in PHASES},
                        }
                    )
    return rows


SPARSE, DENSE, LORA = "id3 (sparse state)", "id3 (dense state)", "lora r=16"
GOALS = {LORA: 1.15, DENSE: 0.5}  # issue 14: sparse-state ID3's peak at most this multiple of the other's


def goal_lines(rows: list[dict]) -> list[str]:
    """Sparse-state ID3's peak above baseline against LoRA r=16 and dense ID3, per grad_accum and rank."""
    above = {(r["variant"], r["grad_accum"], r["rank"]): r["above_baseline"] for r in rows}
    lines = []
    for (variant, accum, rank), mine in above.items():
        if variant != SPARSE:
            continue
        parts = [
            f"{mine / above[(other, accum, rank)]:.2f} x {other} (goal <= {goal})"
            for other, goal in GOALS.items()
            if (other, accum, rank) in above
        ]
        if parts:
            lines.append(f"- grad_accum {accum}, rank {rank}: sparse-state ID3 = " + "; ".join(parts))
    return lines


def phase_lines(rows: list[dict]) -> list[str]:
    """The same ratios for the peak during the training steps alone (VmHWM reset once the engine was built)."""
    above = {
        (r["variant"], r["grad_accum"], r["rank"]): r["steps_peak"] - r["baseline"] for r in rows if r.get("steps_peak")
    }
    lines = []
    for (variant, accum, rank), mine in above.items():
        others = [(o, above.get((o, accum, rank))) for o in GOALS]
        if variant == SPARSE and all(v for _, v in others):
            parts = [f"{mine / v:.2f} x {o}" for o, v in others]
            lines.append(f"- steps only, grad_accum {accum}, rank {rank}: sparse-state ID3 = " + "; ".join(parts))
    return lines


def optimizer_lines(rows: list[dict]) -> list[str]:
    """8-bit AdamW against torch AdamW for the same method, per grad_accum and rank: peak and steps peak above
    the baseline, and the measured saving next to the predicted one (6 bytes per trained weight / world)."""
    by = {(r["variant"], r["grad_accum"], r["rank"]): r for r in rows}
    lines, mib = [], 2**20
    for (variant, accum, rank), mine in by.items():
        other = by.get((variant.replace("8-bit AdamW", "torch AdamW"), accum, rank))
        if "8-bit AdamW" not in variant or other is None:
            continue
        peak, ref = mine["above_baseline"], other["above_baseline"]
        steps = ""
        if mine.get("steps_peak") and other.get("steps_peak"):
            ratio = (mine["steps_peak"] - mine["baseline"]) / (other["steps_peak"] - other["baseline"])
            steps = f"; steps peak {ratio:.2f} x"
        saved = (other["predicted_state"] - mine["predicted_state"]) / mib
        lines.append(
            f"- {variant.removesuffix(' (8-bit AdamW)')}, grad_accum {accum}, rank {rank}: 8-bit AdamW peak "
            f"{peak / mib:.0f} MiB = {peak / ref:.2f} x torch AdamW's {ref / mib:.0f} MiB, {(ref - peak) / mib:.0f} "
            f"MiB less (predicted {saved:.0f}){steps}"
        )
    return lines


def table(rows: list[dict]) -> str:
    mib = 2**20

    def above(r: dict, key: str) -> str:  # a phase figure above the baseline; '-' in logs from before the phases
        return "-" if r.get(key) is None else f"{(r[key] - r['baseline']) / mib:.0f}"

    lines = [
        "| variant | grad_accum | rank | peak RSS | pre-model baseline | peak above baseline | vs full "
        "| predicted model state | after build: RSS / peak | steps peak | save peak | RSS at end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        vs = "" if r["vs_full"] is None else f"{r['vs_full']:.3f}"
        lines.append(
            f"| {r['variant']} | {r['grad_accum']} | {r['rank']} | {r['peak'] / mib:.0f} MiB "
            f"| {r['baseline'] / mib:.0f} MiB | {r['above_baseline'] / mib:.0f} MiB | {vs} "
            f"| {r['predicted_state'] / mib:.0f} MiB | {above(r, 'built_rss')} / {above(r, 'built_peak')} "
            f"| {above(r, 'steps_peak')} | {above(r, 'save_peak')} | {above(r, 'end_rss')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~10M parameters, grad_accum 1, 2 steps")
    ap.add_argument("--no-record", action="store_true", help="do not record this run in benchmarks/RESULTS.md")
    ap.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    ap.add_argument("--accum", default=None, help="grad_accum values, comma separated (default 1,4; quick 1)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="variants to run, comma separated (full first)")
    ap.add_argument("--from-json", default=None, help="tabulate (and record) the last line of an earlier --json log")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        run_worker(args.worker, [a for a in rest if a != "--"])
        return
    size, steps = ("10M", 2) if args.quick else ("100M", 3)
    accums = [int(a) for a in (args.accum or ("1" if args.quick else "1,4")).split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown or variants[0] != "full":
        raise SystemExit(f"--variants: {unknown or variants} ; choose from {list(ALL_VARIANTS)}, 'full' first")
    if args.from_json:  # an earlier --json run's rows, tabulated again (predictions from today's formulas)
        rows = json.loads(Path(args.from_json).read_text().strip().splitlines()[-1])
        steps = rows[0]["steps"]
        size = rows[0].get("size") or ("10M" if steps == 2 else "100M")  # older logs: --quick runs 2 steps
        accums = sorted({r["grad_accum"] for r in rows})
        for r in rows:
            r["predicted_state"] = predicted_state(r["variant"], size, r["grad_accum"], steps)
    else:
        rows = measure(size, steps, accums, variants)
    goals = goal_lines(rows) + phase_lines(rows) + optimizer_lines(rows)
    text = (
        f"{table(rows)}\n\n"
        + ("\n".join(goals) + "\n\n" if goals else "")
        + f"{size} LLaMA-style model, ZeRO-3, 2 ranks, {steps} steps of micro-batch {MICRO_BATCH} "
        f"x 128 tokens, budget {BUDGET * 100:g} % (ID3), LoRA r=16 on {', '.join(LINEAR)}. "
        "'peak above baseline' is a rank's VmHWM less its RSS once the libraries were imported; 'predicted model "
        "state' is benchmarks/projection.py's formula for the same model in fp32 (weights, fp32 masters, Adam "
        "moments, gradient partitions, mask; for sparse state also the step's transient: the streamed gradient "
        "of the largest tensor, scoring scratch, and at grad_accum > 1 the fp32 accumulation buffer): the "
        "measured figure also holds activations, DeepSpeed's buffers and allocator slack. The last four columns "
        "split the lifetime peak by phase, each in MiB above the baseline: 'after build' is RSS and VmHWM once "
        "the model is loaded and partitioned and the engine and update are built (before step 1); 'steps peak' "
        "is VmHWM over the training steps alone (reset after the build); 'save peak' that of the final "
        "checkpoint save and exit; 'RSS at end' after train.py returned. 'steps only' lines: the ratios of the "
        "steps peak."
    )
    print(text)
    if args.json:
        print(json.dumps(rows))
    if not args.no_record:
        flags = " --quick" if args.quick else ""
        flags += f" --accum {args.accum}" if args.accum else ""
        details = f"fp32, {size} model, ZeRO-3, 2 ranks, {steps} steps, budget {BUDGET * 100:g} %"
        title = "Memory by method"  # a run of the optimizer variants gets its own section: the main table stays
        ran = list(dict.fromkeys(r["variant"] for r in rows))  # also right for --from-json
        if set(ran) & set(OPTIMIZER_VARIANTS):
            flags += f" --variants '{','.join(ran)}'"
            title = "Memory by optimizer: torch AdamW vs 8-bit AdamW"
        record_results(title, details, f"python benchmarks/bench_memory.py{flags}", text)


if __name__ == "__main__":
    main()

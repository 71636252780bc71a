"""Peak memory of an ID3 run against dense fine-tuning (`method: full`) of the same model and config.

    python benchmarks/bench_memory.py            # ~100M-parameter LLaMA-style model, ZeRO-2 and ZeRO-3, 2 CPU ranks
    python benchmarks/bench_memory.py --quick    # ~10M parameters, about a minute and a half
    python benchmarks/bench_memory.py --json     # also print the per-rank numbers as one JSON line

Why: ID3 must cost no memory beyond its mask (16 bytes per chosen entry) and a bounded scoring buffer;
DeepSpeed's own state (weights, gradients, Adam moments) is the same with and without it. Peak RSS is
per process, so each (stage, method) pair runs in its own torchrun launch of 2 ranks; every rank reports
its VmHWM at the end, its RSS once the engine is built, and, for ID3, its mask bytes, the RSS growth
inside `before_step()` (the transient buffers) and the bytes its all-gathers received. Each pair runs
twice in full mode (alternating full / ID3) and the higher peak of each rank counts.

The budget B is reached within the run (T = the number of steps run), so the end state carries the
whole mask. glibc's mmap threshold is fixed at 1 MiB in every worker, so freed big blocks go back to
the OS at once and RSS reflects what tensors hold, not what the allocator happened to keep.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import projection as pj  # noqa: E402
from benchmarks._launch import end_worker, torchrun_command  # noqa: E402
from benchmarks.bench_step_overhead import batch, deepspeed_llama  # noqa: E402
from benchmarks.memstat import proc_status, reset_peak  # noqa: E402
from benchmarks.results import record_results  # noqa: E402


def fix_mmap_threshold() -> None:
    """Blocks >= 1 MiB are mmapped and unmapped on free (no dynamic threshold, no retained heap)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except OSError:
        pass


class GatherCounter:
    """Counts the bytes torch.distributed.all_gather receives while `active` (only inside ID3's step)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.active = False
        self.bytes = 0
        self.calls = 0
        self._orig = dist.all_gather

        def counted(tensor_list, tensor, *args, **kwargs):
            if self.active:
                self.bytes += sum(t.numel() * t.element_size() for t in tensor_list)
                self.calls += 1
            return self._orig(tensor_list, tensor, *args, **kwargs)

        dist.all_gather = counted


def run_worker(size: str, steps: int, stage: int, method: str, budget: float, out: str) -> None:
    fix_mmap_threshold()
    import deepspeed
    import torch.distributed as dist

    from id3_ds import ID3Config
    from id3_ds.integration.hook import DeepSpeedID3

    counter = GatherCounter()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rss_imports = proc_status("VmRSS:")
    engine, model = deepspeed_llama(size, stage)
    hook = DeepSpeedID3(engine, ID3Config(budget=budget), steps=steps, weight_decay=0.0) if method == "id3" else None
    rss_engine = proc_status("VmRSS:")
    vocab = model.config.vocab_size
    transient = 0
    for i in range(steps):
        loss = engine(**batch(vocab, i, rank)).loss
        engine.backward(loss)
        if hook is not None:
            peak_before = proc_status("VmHWM:")
            can_reset = reset_peak()
            rss = proc_status("VmRSS:")
            counter.active = True
            hook.before_step()
            counter.active = False
            if can_reset:
                transient = max(transient, proc_status("VmHWM:") - rss)
                # restore a peak at least as high as before the reset: the run's peak must stay honest
                peak_before = max(peak_before, proc_status("VmHWM:"))
            peak_hwm = peak_before
        engine.step()
        if hook is not None:
            peak_hwm = max(peak_hwm, proc_status("VmHWM:"))
    result = {
        "rank": rank,
        "world": world,
        "stage": stage,
        "method": method,
        "steps": steps,
        "params": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
        "rss_imports": rss_imports,
        "rss_engine": rss_engine,
        "peak_rss": proc_status("VmHWM:"),
    }
    if hook is not None:
        id3 = hook.id3
        result["peak_rss"] = max(result["peak_rss"], peak_hwm)
        held = sum(len(h.mask) for h in id3.held)
        result.update(
            budget=id3.budget,
            k_first=id3.schedule.per_step(0),
            chosen_local=held,
            mask_bytes=sum(
                t.numel() * t.element_size()
                for h in id3.held
                for t in (h.mask.positions, h.mask.chosen_at, h.mask.base)
            ),
            transient_rss=transient,
            allgather_bytes=counter.bytes,
            allgather_calls=counter.calls,
        )
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    end_worker()  # every process group released, gloo's threads joined: a clean normal exit


def launch(size: str, steps: int, stage: int, method: str, budget: float) -> list[dict]:
    """One torchrun launch of 2 ranks; returns each rank's numbers."""
    with tempfile.TemporaryDirectory(prefix="id3-mem-") as d:
        flags = [f"--size={size}", f"--steps={steps}", f"--stage={stage}", f"--method={method}", f"--budget={budget}"]
        cmd = torchrun_command(2, __file__, "--worker", *flags, f"--out={d}")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"ZeRO-{stage} {method} worker failed:\n{proc.stdout[-4000:]}")
        return [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(2)]


def peak_over(runs: list[list[dict]], rank: int) -> tuple[dict, int]:
    """The repeat with the highest peak for `rank` (what an OOM would meet), and the spread of the peaks."""
    mine = [run[rank] for run in runs]
    peaks = [r["peak_rss"] for r in mine]
    return max(mine, key=lambda r: r["peak_rss"]), max(peaks) - min(peaks)


def rows_for(stage: int, full_runs: list[list[dict]], id3_runs: list[list[dict]]) -> list[dict]:
    rows = []
    for rank in range(len(full_runs[0])):
        f, f_spread = peak_over(full_runs, rank)
        s, s_spread = peak_over(id3_runs, rank)
        train_full = f["peak_rss"] - f["rss_imports"]
        train_id3 = s["peak_rss"] - s["rss_imports"]
        rows.append(
            {
                "stage": stage,
                "rank": rank,
                "repeats": len(full_runs),
                "params": f["params"],
                "full_peak": f["peak_rss"],
                "id3_peak": s["peak_rss"],
                "spread": max(f_spread, s_spread),
                "ratio": s["peak_rss"] / f["peak_rss"],
                "ratio_above_imports": train_id3 / train_full,
                "ratio_less_mask": (s["peak_rss"] - s["mask_bytes"]) / f["peak_rss"],
                "mask_bytes": s["mask_bytes"],
                "chosen_local": s["chosen_local"],
                "budget": s["budget"],
                "transient_rss": s["transient_rss"],
                "allgather_bytes": s["allgather_bytes"],
                "allgather_calls": s["allgather_calls"],
                "k_first": s["k_first"],
                "steps": s["steps"],
                "world": s["world"],
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    mib = 2**20
    lines = [
        "| stage | rank | params | full peak RSS | ID3 peak RSS | spread over repeats | ratio id3/full "
        "| ratio above imports | ratio less mask | mask bytes (entries) | before_step() RSS growth "
        "| all-gather bytes (calls) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| ZeRO-{r['stage']} | {r['rank']} | {r['params'] / 1e6:.1f}M | {r['full_peak'] / mib:.0f} MiB "
            f"| {r['id3_peak'] / mib:.0f} MiB | {r['spread'] / mib:.0f} MiB ({r['repeats']}) "
            f"| {r['ratio']:.4f} | {r['ratio_above_imports']:.4f} "
            f"| {r['ratio_less_mask']:.4f} | {r['mask_bytes']:,} ({r['chosen_local']:,}) "
            f"| {r['transient_rss'] / mib:.1f} MiB | {r['allgather_bytes']:,} ({r['allgather_calls']}) |"
        )
    return "\n".join(lines)


def record(text: str, args: argparse.Namespace, size: str, steps: int) -> None:
    flags = " --quick" if args.quick else ""
    flags += f" --budget {args.budget}" if args.budget != 0.01 else ""
    details = (
        f"fp32, {size} model, 2 ranks, {steps} steps, budget {args.budget * 100:g} % reached at the last step, "
        "AdamW, micro-batch 2x128 tokens"
    )
    record_results("Memory: ID3 vs full fine-tuning", details, f"python benchmarks/bench_memory.py{flags}", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~10M parameters, 3 steps: under 2 minutes")
    ap.add_argument("--no-record", action="store_true", help="do not record this run in benchmarks/RESULTS.md")
    ap.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    ap.add_argument("--budget", type=float, default=0.01, help="ID3 budget as a fraction (default 1 %%)")
    ap.add_argument("--stages", default="2,3", help="ZeRO stages to run, comma separated")
    ap.add_argument("--repeats", type=int, default=None, help="launches per (stage, method); default 2, quick 1")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--method", default="id3", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = args.size or ("10M" if args.quick else "100M")
    steps = args.steps or (3 if args.quick else 6)
    if args.worker:
        run_worker(size, steps, args.stage, args.method, args.budget, args.out)
        return
    repeats = args.repeats or (1 if args.quick else 2)
    rows = []
    for stage in (int(s) for s in args.stages.split(",")):
        full, id3 = [], []
        for _ in range(repeats):  # alternate, so drift on a shared machine hits both methods alike
            full.append(launch(size, steps, stage, "full", args.budget))
            id3.append(launch(size, steps, stage, "id3", args.budget))
        rows += rows_for(stage, full, id3)
    r0 = rows[0]
    text = (
        f"{table(rows)}\n\nB = {r0['budget']:,} entries over T = {r0['steps']} steps (k = {r0['k_first']:,} per step "
        "at first): mask state 16 B x entries held by the rank; all-gather = round A world x ceil(2k/world) "
        "x 16 B per step plus round B only when one rank holds most winners (id3_ds.integration.collectives). "
        "'ratio above imports' divides peak RSS less the RSS "
        "after imports (what training adds); 'ratio less mask' removes ID3's B-proportional mask state first. "
        "Peaks are the highest over the repeats; 'spread' is the largest max - min of one rank's peak over them "
        "(the noise level). before_step() RSS growth is the most RSS grew inside one ID3 step: the scoring "
        f"buffers ({pj.scoring_buffer_bytes() / 2**20:.0f} MiB), the O(k) candidate lists and all-gather, "
        "and the O(chosen) copy of a slice's mask while it grows (T is tiny here, so k = B / T is large)."
    )
    print(text)
    if args.json:
        print(json.dumps(rows))
    if not args.no_record:
        record(text, args, size, steps)


if __name__ == "__main__":
    main()

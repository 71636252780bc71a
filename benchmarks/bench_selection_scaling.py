"""What one ID3 selection step costs against the number of selectable entries a rank holds (10^6 ... 10^9).

    python benchmarks/bench_selection_scaling.py            # 10^6, 10^7, 10^8, 10^9 entries (8 GB of RAM)
    python benchmarks/bench_selection_scaling.py --quick    # 10^6, 10^7, 10^8 entries, well under a minute

Why: selection scores every unchosen entry a rank holds once per optimizer step, so its cost must grow
linearly (or better) with the rank's share of the model, and its memory must not grow at all beyond the
mask. This runs the real `ID3.select()` (score + local top-k per slice, merge, mask growth) on synthetic
fp32 gradients and weights, cut into slices of at most 2^24 entries like the per-rank pieces of a 7B
model's matrices. grad and value are allocated once at the largest size; smaller sizes are prefix views.

The selector is put mid-run (step T/2, half the budget chosen, random positions), the budget is 0.1 %
over T = 1000 steps, so k = n / 10^6 entries are chosen per step. Reported per size: median seconds of a
select() call, ns per entry (flat = linear), the phases, peak RSS growth during select() (the transient
scoring buffers: constant, not proportional to n), and measured mask bytes per chosen entry. A second
table turns those bytes into bytes per selectable entry at budgets 0.01 / 0.1 / 1 % against a bitmap.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.memstat import proc_status, reset_peak  # noqa: E402
from benchmarks.results import record_results  # noqa: E402
from id3_ds.algorithm.config import ID3Config  # noqa: E402
from id3_ds.algorithm.id3 import ID3  # noqa: E402
from id3_ds.algorithm.mask import SliceMask  # noqa: E402
from id3_ds.algorithm.slices import ParamSlice  # noqa: E402

SLICE = 1 << 24  # entries per slice: a 4096 x 4096 matrix, or a ZeRO-3 rank's share of a bigger one
BUDGET = 0.001
STEPS = 1000


class ViewAccess:
    """A slice that is a range of the shared synthetic buffers (the SliceAccess protocol)."""

    def __init__(self, grad: torch.Tensor, value: torch.Tensor) -> None:
        self._grad, self._value = grad, value

    def grad(self) -> torch.Tensor:
        return self._grad

    def value(self) -> torch.Tensor:
        return self._value


def release_freed_memory() -> bool:
    """Make glibc return every freed block of >= 1 MiB to the OS at once (fixed mmap threshold).

    By default glibc raises its mmap threshold after the first big free and then keeps up to ~32 MiB of
    freed heap, so RSS growth would include memory no tensor holds. With this, peak RSS growth during
    select() is the bytes its tensors actually hold at once.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 20))
    except OSError:
        return False


def mid_run_selector(grad: torch.Tensor, value: torch.Tensor, n: int, gen: torch.Generator, steps: int) -> ID3:
    """An ID3 over the first n entries, at step T/2 with about half of B already chosen at random."""
    slices = []
    for i, a in enumerate(range(0, n, SLICE)):
        b = min(a + SLICE, n)
        slices.append((ParamSlice(f"w{i}", (b - a,), a, 0, b - a), ViewAccess(grad[a:b], value[a:b])))
    id3 = ID3(slices, ID3Config(budget=BUDGET), steps, selectable=n)
    id3.step = steps // 2
    id3.chosen = id3.schedule.target_after(id3.step - 1)
    for h in id3.held:
        want = round(id3.chosen * h.info.numel / n)
        pos = torch.unique(torch.randint(0, h.info.numel, (want,), generator=gen))
        h.mask = SliceMask(pos, torch.zeros(pos.numel(), dtype=torch.int32), h.access.value()[pos].clone())
    return id3


def read_pass(grad: torch.Tensor, value: torch.Tensor, n: int, reps: int = 3) -> float:
    """Best seconds of one plain read of the first n entries of grad and value: the memory floor.

    Selection must read both once per step, so selection / read pass isolates the algorithm's scaling
    from the machine's (memory bandwidth, TLB, page placement, other jobs on the cores).
    """
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for a in range(0, n, SLICE):
            grad[a : min(a + SLICE, n)].amax()
            value[a : min(a + SLICE, n)].amax()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(grad: torch.Tensor, value: torch.Tensor, n: int, reps: int, steps: int = STEPS) -> dict:
    gen = torch.Generator().manual_seed(n)
    id3 = mid_run_selector(grad, value, n, gen, steps)
    k = id3.schedule.per_step(id3.step)
    at = (id3.step, id3.chosen)
    id3.select()  # warm-up: first touch of the slices, allocator growth
    id3.timer.enabled = True
    times, peaks = [], []
    for _ in range(reps):
        id3.step, id3.chosen = at  # every repetition is the same step: same k (the mask keeps growing a little)
        can_reset = reset_peak()
        rss = proc_status("VmRSS:")
        t0 = time.perf_counter()
        id3.select()
        times.append(time.perf_counter() - t0)
        if can_reset:
            peaks.append(proc_status("VmHWM:") - rss)
    chosen = sum(len(h.mask) for h in id3.held)
    mask_bytes = sum(
        t.numel() * t.element_size() for h in id3.held for t in (h.mask.positions, h.mask.chosen_at, h.mask.base)
    )
    sec = statistics.median(times)
    floor = read_pass(grad, value, n)
    return {
        "n": n,
        "steps": steps,
        "slices": len(id3.held),
        "k": k,
        "reps": reps,
        "seconds": sec,
        "ns_per_entry": sec / n * 1e9,
        "best_ns_per_entry": min(times) / n * 1e9,
        "read_ns_per_entry": floor / n * 1e9,
        "vs_read": min(times) / floor,
        "phases_ms": {p: s / reps * 1e3 for p, s in id3.timer.seconds.items()},
        "peak_rss_growth": max(peaks) if peaks else None,
        "chosen": chosen,
        "mask_bytes_per_chosen": mask_bytes / chosen,
    }


def loglog_slope(rows: list[dict]) -> float:
    """Least-squares exponent a of best time ~ n^a over the sizes from 10^7 up (fixed costs dominate below).

    The best of the repetitions, not the median: on a shared machine other jobs only ever add time.
    """
    pts = [(math.log(r["n"]), math.log(r["best_ns_per_entry"] * r["n"])) for r in rows if r["n"] >= 10**7]
    if len(pts) < 2:
        return float("nan")
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def scaling_table(rows: list[dict]) -> str:
    lines = [
        "| selectable entries/rank | slices | k/step | reps | select() (ms) | ns/entry | best ns/entry "
        "| read pass ns/entry | best / read pass | score+topk | merge | grow | peak RSS growth | mask B/chosen entry |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        p = r["phases_ms"]
        peak = "n/a" if r["peak_rss_growth"] is None else f"{r['peak_rss_growth'] / 2**20:.1f} MiB"
        lines.append(
            f"| 10^{round(math.log10(r['n']))} | {r['slices']} | {r['k']:,} | {r['reps']} | {r['seconds'] * 1e3:.1f} "
            f"| {r['ns_per_entry']:.2f} | {r['best_ns_per_entry']:.2f} | {r['read_ns_per_entry']:.2f} "
            f"| {r['vs_read']:.2f} "
            f"| {p.get('score_topk', 0):.1f} ms | {p.get('merge', 0):.2f} ms "
            f"| {p.get('grow', 0):.2f} ms | {peak} | {r['mask_bytes_per_chosen']:.1f} |"
        )
    return "\n".join(lines)


def k_table(rows: list[dict]) -> str:
    """Cost against k at a fixed size: each chunk's prefilter keeps up to k blocks of BLOCK entries."""
    lines = ["| entries | T | k/step | select() best (ms) | best ns/entry |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| 10^{round(math.log10(r['n']))} | {r['steps']} | {r['k']:,} "
            f"| {r['best_ns_per_entry'] * r['n'] / 1e6:.1f} | {r['best_ns_per_entry']:.2f} |"
        )
    return "\n".join(lines)


def mask_table(bytes_per_chosen: float) -> str:
    """Mask state per selectable entry at typical budgets, against a 1-bit-per-entry bitmap."""
    lines = [
        "| budget | mask bytes per chosen entry | mask bytes per selectable entry | vs a bitmap (0.125 B/entry) |",
        "| --- | --- | --- | --- |",
    ]
    for frac in (0.0001, 0.001, 0.01):
        per = bytes_per_chosen * frac
        lines.append(f"| {frac * 100:g} % | {bytes_per_chosen:.1f} | {per:.4f} | {per / 0.125:.3f} x |")
    return "\n".join(lines)


def record(text: str, quick: bool, load: tuple[float, float]) -> None:
    """Append a section; the load averages (start, end) tell a reader whether other jobs shared the cores."""
    threads = f" --threads {torch.get_num_threads()}" if torch.get_num_threads() != 1 else ""
    details = (
        f"{torch.get_num_threads()} torch threads, fp32, budget {BUDGET * 100:g} % over {STEPS} steps, selector at "
        f"step {STEPS // 2}, slices of 2^24 entries, 1-minute load average {load[0]:.1f} at start, {load[1]:.1f} at end"
    )
    flags = f"{' --quick' if quick else ''}{threads}"
    record_results("Selection scaling", details, f"python benchmarks/bench_selection_scaling.py{flags}", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10^6 .. 10^8 entries: well under 2 minutes")
    ap.add_argument("--no-record", action="store_true", help="do not record this run in benchmarks/RESULTS.md")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine a parallel region waits for its slowest thread, "
        "so 2 threads on 2 busy cores measure the other jobs, not the selection)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [10**6, 10**7, 10**8] + ([] if args.quick else [10**9])
    reps = {10**6: 30, 10**7: 15, 10**8: 7, 10**9: 5}
    top = sizes[-1]
    release_freed_memory()
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    grad = torch.empty(top).normal_(std=1e-3)  # allocated once; every size is a prefix view
    value = torch.empty(top).normal_(std=0.02)
    print(
        f"filled 2 x {top:,} fp32 entries ({2 * 4 * top / 1e9:.1f} GB) in {time.perf_counter() - t0:.1f} s", flush=True
    )
    rows = []
    for n in sizes:
        rows.append(measure(grad, value, n, reps[n]))
        print(f"  10^{round(math.log10(n))}: {rows[-1]['best_ns_per_entry']:.2f} ns/entry (best)", flush=True)
    k_n = 10**7 if args.quick else 10**8
    k_rows = [measure(grad, value, k_n, 3, steps) for steps in (1000, 100, 10, 1)]
    slope = loglog_slope(rows)
    ns = [r["best_ns_per_entry"] for r in rows]
    verdict = "linear or better" if slope <= 1.1 else "above linear"
    ratios = [r["vs_read"] for r in rows]
    text = (
        f"{scaling_table(rows)}\n\nFitted exponent (best seconds ~ n^a, sizes >= 10^7): a = {slope:.3f} ({verdict}); "
        f"best ns/entry from {ns[0]:.2f} (10^6) to {ns[-1]:.2f} (10^{round(math.log10(top))}); selection costs "
        f"{min(ratios):.1f}-{max(ratios):.1f} x one plain read of grad and value (the read pass column: the "
        "machine's memory floor at each size; a rise in both at one size is the machine, not the algorithm).\n\n"
        f"Cost against k = B / T at 10^{round(math.log10(k_n))} entries (budget {BUDGET * 100:g} %): a chunk's "
        "block-maximum prefilter keeps about k blocks (512 entries each, shrinking to 16 as k grows) and skips "
        "blocks that cannot beat the k-th best score found so far; once k exceeds ~1/32 of a 4M-entry chunk the "
        "chunk falls back to a full top-k.\n\n"
        f"{k_table(k_rows)}\n\n{mask_table(rows[-1]['mask_bytes_per_chosen'])}"
    )
    print(text)
    if not args.no_record:
        record(text, args.quick, (load_start, os.getloadavg()[0]))


if __name__ == "__main__":
    main()

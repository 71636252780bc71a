"""Pictures of a run, for people who would rather look than read (`id3-ds plot RUN_DIR`).

- `training.png`: training loss (with eval loss), eval accuracy / F1, and the share of the ID3 budget
  chosen so far, against the optimizer step, from RUN_DIR/log.jsonl.
- `budget_by_layer.png`: where the budget went, as two layer x module heatmaps (chosen entries, and the
  fraction of each module's weights chosen), from the latest complete checkpoint's ID3 shards, or from an
  exported delta when there is no checkpoint (or when PATH is a delta).

Only matplotlib's Agg canvas is used (no pyplot: no display needed, no global backend switched under a
caller's feet), and every PNG goes through `atomic_file`, so a killed run never leaves half an image.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from id3_ds.errors import ID3Error
from id3_ds.files.atomic import atomic_file

DPI = 100
PANEL_IN = (5.0, 3.6)  # one training panel, inches
TRAINING_PNG = "training.png"
BUDGET_PNG = "budget_by_layer.png"
OUTSIDE = "outside layers"  # the heatmap row of embeddings, final norm and head
INSTALL = 'plotting needs matplotlib: pip install "id3-ds[plot]"'
SCORES = {"eval_accuracy": "accuracy", "eval_f1": "F1"}  # classification eval metrics, and their names
_CKPT_NAME = re.compile(r"^checkpoint-\d{8}$")


@dataclass
class RunLog:
    """The records of log.jsonl by kind. A resumed run logs some steps twice: the later record wins."""

    train: list[dict] = field(default_factory=list)  # records with a training loss, by step
    evals: list[dict] = field(default_factory=list)  # records with eval_* metrics, by step
    start: dict = field(default_factory=dict)  # the last "start" event (method, budget, ...)
    unreadable: int = 0  # lines that are not JSON objects (e.g. the last line of a killed run)


@dataclass
class BudgetTable:
    """Chosen entries and sizes per (layer, module) cell; None where the model has no such module."""

    rows: list[str]
    cols: list[str]
    entries: list[list[int | None]]
    numel: list[list[int | None]]

    @property
    def total(self) -> int:
        return sum(e for row in self.entries for e in row if e)


@dataclass
class MaskSource:
    """Where a heatmap's numbers come from: a title, name -> (chosen entries, numel) in model order, and
    what a tensor absent from `params` means there (a checkpoint lists every tensor, a delta only touched ones)."""

    title: str
    params: dict[str, tuple[int, int]]
    absent: str


@dataclass
class Plots:
    """What `plot_run` wrote, and one line per part it could not draw (and why)."""

    files: list[Path]
    notes: list[str]


def read_log(path: str | os.PathLike) -> RunLog:
    """Parse a run's log.jsonl into training records, eval records and the start event."""
    log = RunLog()
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            log.unreadable += 1
            continue
        if rec.get("event") == "start":
            log.start = rec
        elif "event" in rec:
            continue
        elif _num(rec.get("loss")):
            train[rec["step"]] = rec
        elif any(k.startswith("eval_") for k in rec):
            evals[rec["step"]] = rec
    log.train = [train[s] for s in sorted(train)]
    log.evals = [evals[s] for s in sorted(evals)]
    return log


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def budget_table(params: dict[str, tuple[int, int]]) -> BudgetTable:
    """Sum (chosen entries, numel) per layer and module label; `params` in model order, name -> (entries, numel)."""
    from id3_ds.delta.summary import label_order, layer_of, module_labels

    labels = module_labels(list(params))
    cols = label_order(list(labels.values()))
    layers = {layer_of(n) for n in params}
    rows = sorted((r for r in layers if r != "other"), key=lambda r: int(r.split()[1]))
    rows += [OUTSIDE] if "other" in layers else []
    entries: list[list[int | None]] = [[None] * len(cols) for _ in rows]
    numel: list[list[int | None]] = [[None] * len(cols) for _ in rows]
    for name, (e, n) in params.items():
        layer = layer_of(name)
        r, c = rows.index(OUTSIDE if layer == "other" else layer), cols.index(labels[name])
        entries[r][c] = (entries[r][c] or 0) + e
        numel[r][c] = (numel[r][c] or 0) + n
    return BudgetTable(rows, cols, entries, numel)


def heatmap_size(table: BudgetTable) -> tuple[float, float]:
    """Figure size in inches of the two-panel heatmap: wide enough for the column labels, tall enough for rows."""
    width = 2 * max(4.0, 0.55 * len(table.cols) + 2.4)
    height = max(4.0, 0.42 * len(table.rows) + 2.6)
    return width, height


def plot_run(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Plots:
    """Draw what PATH (a run's output dir, a checkpoint-* dir, or a delta dir) holds into `out` (default:
    RUN_DIR/plots, or DELTA-plots beside a delta). Parts that are missing become notes; nothing drawable
    at all is an error."""
    path = Path(path)
    if not path.is_dir():
        raise ID3Error(f"{path} is not a directory: pass a run's output dir (train.output_dir) or a checkpoint-* dir")
    figure = _figure_class()  # before any reading: a missing matplotlib is the first thing to hear about
    log_file, log, mask_src, default_out, notes = _locate(path)
    out = Path(out) if out is not None else default_out
    files: list[Path] = []
    if log is not None:
        if log.unreadable:
            notes.append(f"{log_file}: skipped {log.unreadable} unreadable line(s)")
        if log.train or log.evals:
            files.append(_plot_training(figure, log, out / TRAINING_PNG, notes))
        else:
            notes.append(f"{log_file} has no training or eval records yet: no training curves")
    if mask_src is not None:
        table = budget_table(mask_src.params)
        if table.total:
            files.append(_plot_budget(figure, table, mask_src, out / BUDGET_PNG))
        else:
            notes.append(f"{mask_src.title} has no chosen entries: no budget heatmap")
    if not files:
        raise ID3Error(f"nothing to plot in {path}: " + "; ".join(notes))
    return Plots(files, notes)


def _locate(path: Path) -> tuple[Path | None, RunLog | None, MaskSource | None, Path, list[str]]:
    """(log.jsonl and its records, where the chosen entries are, default output dir, notes) for a run, a
    checkpoint or a delta."""
    from id3_ds.checkpoint import latest_checkpoint
    from id3_ds.delta.format import CONFIG_FILE

    notes: list[str] = []
    if (path / CONFIG_FILE).is_file():  # an exported delta: no training log
        notes.append(f"{path} is a delta: no training log to plot (run `id3-ds plot` on the run's output dir)")
        return None, None, _delta_source(path), path.parent / f"{path.name}-plots", notes
    is_ckpt = bool(_CKPT_NAME.match(path.name)) or (path / "id3").is_dir()
    run = path.parent if is_ckpt else path
    log_file = run / "log.jsonl"
    if not log_file.is_file():
        notes.append(f"{run} has no log.jsonl: no training curves (is it a run's train.output_dir?)")
        log_file = None
    log = read_log(log_file) if log_file else None
    method = log.start.get("method") if log else None
    ckpt = path if is_ckpt else latest_checkpoint(run)
    if ckpt is not None:
        source = _checkpoint_source(ckpt, method, notes)
    elif (run / "delta" / CONFIG_FILE).is_file():
        source = _delta_source(run / "delta")
    else:
        notes.append(f"{run} has no complete checkpoint nor delta yet: no budget heatmap")
        source = None
    return log_file, log, source, run / "plots", notes


def _checkpoint_source(ckpt: Path, method: str | None, notes: list[str]) -> MaskSource | None:
    from id3_ds.checkpoint import read_id3_state

    if not any((ckpt / "id3").glob("shard-*.safetensors")):
        why = f"method {method}" if method else "not an ID3 run"
        notes.append(f"{ckpt.name} has no ID3 mask ({why}: every weight trains): no budget heatmap")
        return None
    state, _ = read_id3_state(ckpt)
    params = {n: (p.indices.numel(), p.numel) for n, p in state.params.items()}
    return MaskSource(ckpt.name, params, "no such module there")


def _delta_source(delta: Path) -> MaskSource:
    from id3_ds.delta.summary import summarize

    params = {n: (p["entries"], p["numel"]) for n, p in summarize(delta)["params"].items()}
    return MaskSource(f"delta directory {delta.name}/", params, "not in the delta (nothing chosen, or no such module)")


def _figure_class() -> Any:
    """matplotlib's Figure on the Agg canvas, or one install line when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ID3Error(INSTALL) from None

    def make(width: float, height: float) -> Any:
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        return fig

    return make


def _save(fig: Any, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if _num(r.get(key))]
    return [s for s, _ in pts], [v for _, v in pts]


def _plot_training(figure: Any, log: RunLog, path: Path, notes: list[str]) -> Path:
    """One row of panels: loss (train and eval), eval accuracy/F1 when logged, budget used when masked."""
    scores = [k for k in SCORES if _series(log.evals, k)[0]]
    budget = [r for r in log.train if _num(r.get("chosen")) and _num(r.get("budget")) and r["budget"] > 0]
    panels = ["loss"] + (["scores"] if scores else []) + (["budget"] if budget else [])
    if not budget:
        why = f"method {log.start['method']}" if log.start.get("method") else "no chosen/budget records"
        notes.append(f"no ID3 budget curve ({why})")
    fig = figure(PANEL_IN[0] * len(panels), PANEL_IN[1])
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if panel == "loss":
            ax.set_title("training and eval loss")
            ax.set_ylabel("cross-entropy loss")
            ax.plot(*_series(log.train, "loss"), marker="o", ms=3, label="training (mean since last log)")
            ax.plot(*_series(log.evals, "eval_loss"), marker="s", ms=4, label="eval")
            ax.legend(fontsize="small")
        elif panel == "scores":
            ax.set_title("eval " + " and ".join(SCORES[k] for k in scores))
            for k in scores:
                ax.plot(*_series(log.evals, k), marker="s", ms=4, label=SCORES[k])
            ax.set_ylim(0, 1.02)
            ax.set_ylabel("score (1 = perfect)")
            ax.legend(fontsize="small")
        else:
            total = budget[-1]["budget"]
            ax.set_title(f"ID3 budget used (B = {total:,} entries)")
            ax.plot([r["step"] for r in budget], [100 * r["chosen"] / r["budget"] for r in budget], marker="o", ms=3)
            ax.set_ylim(0, 105)
            ax.set_ylabel("chosen entries, % of B")
    steps = log.start.get("steps")
    for ax in axes:
        if _num(steps):
            ax.set_xlim(0, steps * 1.02)  # the last point's marker whole
    return _save(fig, path)


def _compact(n: int) -> str:
    """1234 -> '1.2k': short enough for a heatmap cell."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _plot_budget(figure: Any, table: BudgetTable, source: MaskSource, path: Path) -> Path:
    """Two heatmaps, rows = layers, columns = module kinds: chosen entries, and % of the module's weights."""
    import numpy as np
    from matplotlib.colors import LogNorm

    entries = np.ma.masked_invalid(np.array([[np.nan if e is None else e for e in r] for r in table.entries], float))
    numel = np.array([[np.nan if n is None else n for n in r] for r in table.numel], float)
    frac = np.ma.masked_invalid(100 * entries.filled(np.nan) / numel)
    fig = figure(*heatmap_size(table))
    fig.suptitle(f"Where the budget went: {table.total:,} chosen entries ({source.title})")
    annotate = len(table.rows) * len(table.cols) <= 300
    if annotate:
        fig.get_layout_engine().set(h_pad=0.1)
        fig.supxlabel(f"cell text: the value; 0 = module present, nothing chosen; – = {source.absent}", fontsize=9)
    for ax, data, name, unit, fmt in zip(
        fig.subplots(1, 2),
        (entries, frac),
        ("chosen entries", "% of the module's weights chosen"),
        ("entries", "% of weights"),
        (lambda v: _compact(int(v)), lambda v: f"{v:.2g}"),
    ):
        positive = data[data > 0]
        norm = LogNorm(positive.min(), positive.max()) if positive.count() and positive.max() > positive.min() else None
        im = ax.imshow(np.ma.masked_less_equal(data, 0), cmap=_cmap(), norm=norm, aspect="auto")
        fig.colorbar(im, ax=ax, label=f"{unit} (log scale)" if norm else unit, shrink=0.9)
        ax.set_title(name)
        ax.set_xticks(range(len(table.cols)), table.cols, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(table.rows)), table.rows)
        ax.set_xticks(np.arange(len(table.cols) + 1) - 0.5, minor=True)  # thin lines between cells
        ax.set_yticks(np.arange(len(table.rows) + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="0.85", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
        if annotate:
            _annotate(ax, data.filled(np.nan), im, fmt)
    return _save(fig, path)


def _annotate(ax: Any, values: Any, im: Any, fmt: Any) -> None:
    """Write each cell's value in it, white on the dark end of the colour map so it stays legible."""
    import numpy as np

    for (r, c), v in np.ndenumerate(values):
        if np.isnan(v):
            ax.text(c, r, "–", ha="center", va="center", fontsize=8, color="0.6")
        elif v <= 0:
            ax.text(c, r, "0", ha="center", va="center", fontsize=8, color="0.3")
        else:
            dark = im.norm(v) > 0.6
            ax.text(c, r, fmt(v), ha="center", va="center", fontsize=8, color="white" if dark else "black")


def _cmap() -> Any:
    from matplotlib import colormaps

    return colormaps["YlOrRd"].with_extremes(bad="white")  # zero and absent cells stay white: the text tells

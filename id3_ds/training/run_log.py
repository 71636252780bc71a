"""Rank-0 training records: a progress bar, a log line every log_steps, JSONL, TensorBoard on request; the
run's resolved config beside them, and the last line that says where the results are and what to run next.

Every log.jsonl record carries `time` (ISO 8601, UTC) and `elapsed_s` (seconds since this process started
the run: main() imports this module first thing), so a slow phase or a stall can be read off afterwards.
"""

from __future__ import annotations

import json
import shlex
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from id3_ds.files.atomic import write_json_atomic

_RUN_STARTED = time.monotonic()


class RunLogger:
    def __init__(
        self,
        output_dir: str,
        is_main: bool,
        total: int,
        start: int,
        progress: bool,
        tensorboard: bool,
        started: float | None = None,
    ):
        """`started`: the run's start on time.monotonic()'s clock (default: when this module was imported)."""
        self.is_main = is_main
        self.started = _RUN_STARTED if started is None else started
        self.bar = None
        self.tb = None
        if not is_main:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(output_dir) / "log.jsonl", "a")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="id3", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("train.tensorboard: the tensorboard package is not installed; pip install tensorboard")
            else:
                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.jsonl.write(json.dumps(self.stamped(record)) + "\n")
        self.jsonl.flush()
        line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def stamped(self, record: dict[str, Any]) -> dict[str, Any]:
        """`record` with the wall-clock time and the seconds since the run started (JSONL only: the console
        line and TensorBoard have their own clocks)."""
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {**record, "time": now, "elapsed_s": round(time.monotonic() - self.started, 3)}

    def close(self) -> None:
        if self.is_main:
            if self.bar is not None:
                self.bar.close()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def save_resolved_config(cfg, is_main: bool) -> Path | None:
    """Rank 0 writes the config as this run uses it (file + overrides + defaults) to train.output_dir/config.json.

    What ran is then on disk next to its results, whatever the command line was; the file is itself a valid
    `--config`. Written atomically, so a crash never leaves half a file.
    """
    if not is_main:
        return None
    path = Path(cfg.train.output_dir) / "config.json"
    write_json_atomic(path, cfg.to_dict())
    return path


def final_line(
    output_dir: str,
    checkpoint: str | None,
    base: str,
    delta: str | None = None,
    sparse: bool = True,
    final_model: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """The run's last line: the final eval metrics, where its results are and the next command to run.

    `delta`: the exported delta, if the run exported one; `sparse`: whether `id3-ds export-delta` applies
    (masked methods; `full` and `lora` keep dense weights, classification + LoRA refuses a delta);
    `final_model`: the from_pretrained directory `train.save_final_model` wrote; `metrics`: the last eval
    record's `eval_*` values (the figure a user ran the job for, without scrolling back through the log).
    """
    q = shlex.quote
    where = "done: "
    if metrics:
        where += " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()) + "; "
    where += f"results in {output_dir}"
    if checkpoint:
        where += f", last checkpoint {checkpoint}"
    if final_model:
        where += f", final model {final_model}"
    if delta:
        merged = fresh_dir(Path(output_dir) / "merged")
        return f"{where}; sparse delta in {delta}; next: id3-ds merge {q(base)} {q(delta)} --out {q(merged)}"
    if sparse and checkpoint:
        out = str(Path(output_dir) / "delta")
        return f"{where}; next: id3-ds export-delta {q(output_dir)} --base {q(base)} --out {q(out)}"
    return where


def fresh_dir(path: Path) -> str:
    """`path`, or `path-2`, `path-3`, ... : the first that does not exist, so a suggested `--out` never names a
    folder an earlier command already wrote (merge refuses to overwrite one)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return str(candidate)


def print_final_line(cfg, is_main: bool) -> None:
    """Rank 0 prints `final_line` for this finished run, reading what it wrote from cfg and the disk."""
    if not is_main:
        return
    from id3_ds.checkpoint import latest_checkpoint

    out = Path(cfg.train.output_dir)
    sparse = cfg.plan.has_delta  # whether `id3-ds export-delta` applies
    ckpt = latest_checkpoint(out)
    delta = out / "delta" if cfg.train.export_delta and sparse and (out / "delta").is_dir() else None
    final_model = out / "final_model" if cfg.train.save_final_model and (out / "final_model").is_dir() else None
    print(
        final_line(
            str(out),
            str(ckpt) if ckpt else None,
            cfg.model.name_or_path,
            str(delta) if delta else None,
            sparse,
            str(final_model) if final_model else None,
            last_eval(out),
        ),
        flush=True,
    )


def last_eval(output_dir: Path) -> dict[str, Any] | None:
    """The `eval_*` values of the last eval record in output_dir/log.jsonl (None: the run had no eval)."""
    path = Path(output_dir) / "log.jsonl"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the records before it still count
            continue
        metrics = {k: v for k, v in record.items() if k.startswith("eval_")} if isinstance(record, dict) else {}
        if metrics:
            found = metrics
    return found

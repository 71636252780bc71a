"""Rank-0 training records: a progress bar, a log line every log_steps, JSONL, TensorBoard on request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(self, output_dir: str, is_main: bool, total: int, start: int, progress: bool, tensorboard: bool):
        self.is_main = is_main
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
        self.jsonl.write(json.dumps(record) + "\n")
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

    def close(self) -> None:
        if self.is_main:
            if self.bar is not None:
                self.bar.close()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()

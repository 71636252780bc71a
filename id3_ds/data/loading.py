"""Load records with their line numbers, tokenize with a loss mask, and pad batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from id3_ds.data.formats import segments
from id3_ds.errors import ID3Error

IGNORE = -100


def load_records(path: str | Path) -> list[tuple[str, Any]]:
    """(where, record) pairs from a .json array, a .jsonl file, or a directory of them (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise ID3Error(f"data directory {path} holds no .json or .jsonl file")
        return [r for f in files for r in load_records(f)]
    if not path.is_file():
        raise ID3Error(f"data file {path} does not exist; set data.path to a JSON/JSONL file or directory")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ID3Error(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise ID3Error(f"{path}: a .json data file must hold a list of records")
        return [(f"{path}[{i}]", r) for i, r in enumerate(items)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ID3Error(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return out


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize_records(records: list[tuple[str, Any]], fmt: str, tokenizer: Any, max_length: int) -> list[Example]:
    """Token ids and labels (-100 outside responses), BOS first and EOS after the last response."""
    out = []
    for where, rec in records:
        ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        labels: list[int] = [IGNORE] * len(ids)
        for text, loss in segments(rec, fmt, tokenizer, where):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if loss else [IGNORE] * len(piece)
        if fmt != "messages" and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            continue  # the response was truncated away: nothing to learn
        out.append(Example(ids, labels))
    if not out:
        raise ID3Error("no usable training example: every record was empty or truncated away (raise data.max_length)")
    return out


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}

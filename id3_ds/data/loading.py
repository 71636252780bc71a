"""Load records with their line numbers, tokenize with a loss mask (or a class label), pack, and pad batches."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from id3_ds.data.formats import classification_fields, segments
from id3_ds.data.prompt import start_ids, text_ids
from id3_ds.data.sources import is_source, resolve_data
from id3_ds.errors import ID3Error

IGNORE = -100
BAD_RECORD_MODES = ("error", "skip")


@dataclass
class RecordPolicy:
    """data.bad_records: "error" stops at the first malformed or empty record, naming its file and line;
    "skip" drops such records and counts them. Over-long records are truncated to max_length either way,
    and one whose response is truncated away entirely is dropped (counted): length is a setting, not a fault.
    """

    mode: str = "error"
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0

    def reject(self, reason: str, message: str) -> None:
        if self.mode == "error":
            raise ID3Error(message if reason != "empty" else f"{message}; fix it or set data.bad_records=skip")
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def drop(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self, kept: int) -> str:
        parts = [f"{kept} examples"] + [f"{n} {why} skipped" for why, n in sorted(self.skipped.items())]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        return "data: " + ", ".join(parts)


def load_records(path: str | Path, policy: RecordPolicy | None = None) -> list[tuple[str, Any]]:
    """(where, record) pairs from a .json array, a .jsonl file, or a directory of them (sorted)."""
    policy = policy or RecordPolicy()
    if is_source(str(path)):  # a named source: its JSONL file in the cache (built on first use)
        path = resolve_data(str(path))
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise ID3Error(f"data directory {path} holds no .json or .jsonl file")
        return [r for f in files for r in load_records(f, policy)]
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
    # JSONL lines end at \n only: str.splitlines would also break at U+2028/U+0085 inside a JSON string
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            policy.reject("malformed", f"{path}:{lineno}: invalid JSON ({e.msg})")
    return out


@dataclass
class Example:
    """LM: labels per token (IGNORE where no loss). Classification: labels empty, label the class id."""

    input_ids: list[int]
    labels: list[int]
    label: int | None = None


def label_names(
    records: list[tuple[str, Any]], given: list[str] | None = None, policy: RecordPolicy | None = None
) -> list[str]:
    """The class names, in id order: `given` (data.labels) as is, else the sorted distinct labels.

    With a skipping policy, malformed records are left out here (tokenize_records counts them).
    """
    found = set()
    for where, rec in records:
        try:
            found.add(classification_fields(rec, where)[1])
        except ID3Error:
            if policy is None or policy.mode == "error":
                raise
    if given:
        return list(given)
    if len(found) < 2:
        raise ID3Error(f"classification data needs at least 2 distinct labels, found {sorted(found)}")
    return sorted(found, key=lambda x: (len(x), x) if x.lstrip("-").isdigit() else (0, x))


def tokenize_records(
    records: list[tuple[str, Any]],
    fmt: str,
    tokenizer: Any,
    max_length: int,
    labels: list[str] | None = None,
    policy: RecordPolicy | None = None,
) -> list[Example]:
    """Token ids and labels (-100 outside responses), one start token first (see data/prompt.py) and EOS after
    the last response (alpaca, text; a chat template writes its own end of turn).

    classification: the tokenizer's own special tokens ([CLS] ... [SEP] for BERT), and the record's label
    as an id into `labels` (required; see `label_names`).
    """
    policy = policy or RecordPolicy()
    if fmt == "classification":
        return _tokenize_classification(records, tokenizer, max_length, labels, policy)
    out = []
    for where, rec in records:
        try:
            pieces = segments(rec, fmt, tokenizer, where)
        except ID3Error as e:
            policy.reject("malformed", str(e))
            continue
        if not any(text.strip() for text, loss in pieces if loss):
            policy.reject("empty", f"{where}: the response is empty, nothing to learn")
            continue
        ids: list[int] = start_ids(tokenizer, pieces[0][0])  # BOS, unless the chat template wrote it
        labels: list[int] = [IGNORE] * len(ids)
        for text, loss in pieces:
            piece = text_ids(tokenizer, text)
            ids += piece
            labels += piece if loss else [IGNORE] * len(piece)
        if fmt != "messages" and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        if len(ids) > max_length:
            policy.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            policy.drop("truncated away")  # the response lies beyond max_length: nothing to learn
            continue
        out.append(Example(ids, labels))
    if not out:
        raise ID3Error("no usable training example: every record was empty or truncated away (raise data.max_length)")
    return out


def _tokenize_classification(
    records: list[tuple[str, Any]], tokenizer: Any, max_length: int, labels: list[str] | None, policy: RecordPolicy
) -> list[Example]:
    if not labels:
        raise ID3Error("classification data needs its label names (data.labels, or found in the training data)")
    ids_of = {name: i for i, name in enumerate(labels)}
    out = []
    for where, rec in records:
        try:
            text, label = classification_fields(rec, where)
            if label not in ids_of:
                raise ID3Error(f"{where}: label {label!r} is not one of {labels}; fix the record or set data.labels")
        except ID3Error as e:
            policy.reject("malformed", str(e))
            continue
        if not text.strip():
            policy.reject("empty", f"{where}: the text is empty")
            continue
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > max_length:
            policy.truncated += 1
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"] if len(ids) > max_length else ids
        out.append(Example(ids, [], ids_of[label]))
    if not out:
        raise ID3Error("no usable classification example: the data file is empty")
    return out


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate LM examples into rows of max_length tokens (the last row may be shorter).

    Loss masks travel with their tokens. Packed rows attend across example boundaries (no block-diagonal
    mask), as plain packing does in LLaMA-Factory and axolotl; it trades a little cross-talk for no padding.
    """
    ids: list[int] = []
    labels: list[int] = []
    out = []
    for e in examples:
        ids += e.input_ids
        labels += e.labels
        while len(ids) >= max_length:
            out.append(Example(ids[:max_length], labels[:max_length]))
            ids, labels = ids[max_length:], labels[max_length:]
    if any(label != IGNORE for label in labels[1:]):
        out.append(Example(ids, labels))
    return out


class TokenizedDataset(torch.utils.data.Dataset):
    """Examples from a list, or rows of a (memory-mapped) HF `datasets.Dataset` from the token cache."""

    def __init__(self, examples) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        e = self.examples[i]
        if isinstance(e, dict):
            label = e.get("label")
            return Example(list(e["input_ids"]), list(e["labels"]), None if label is None or label < 0 else label)
        return e

    @property
    def classification(self) -> bool:
        return len(self) > 0 and self[0].label is not None


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask, plus token labels (LM) or one class id per row."""
    n = max(len(e.input_ids) for e in batch)
    if batch[0].label is not None:
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, : len(e.input_ids)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e.label for e in batch])}
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}

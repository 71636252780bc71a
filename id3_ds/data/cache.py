"""Tokenise once, share across ranks: an HF `datasets` cache keyed by everything that shapes the tokens.

Rank 0 reads, validates and tokenises the data and saves it with `datasets` (Arrow, memory-mapped) under
`$ID3_DS_CACHE/data/<key>`; the other ranks wait, then open the same files, so N ranks cost one
tokenisation and one copy in page cache. The key hashes the data files' bytes, the format and its
settings, and the tokenizer's files, so an edit to any of them builds a new entry. A bad record on rank 0
is raised on every rank with the same message (no rank is left waiting at a barrier).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from id3_ds.data.loading import (
    Example,
    RecordPolicy,
    TokenizedDataset,
    label_names,
    load_records,
    pack,
    tokenize_records,
)
from id3_ds.data.sources import is_source, resolve_data
from id3_ds.errors import ID3Error
from id3_ds.files.atomic import staged_dir

CACHE_VERSION = "2"  # 2: no second start token where the chat template writes it


@dataclass(frozen=True)
class DataSpec:
    """What determines a tokenised dataset, apart from the tokenizer."""

    path: str
    format: str
    max_length: int
    packing: bool = False
    labels: tuple[str, ...] | None = None  # classification: fixed label names, else found in the data
    bad_records: str = "error"  # see RecordPolicy


def _data_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl"))
    return [p] if p.is_file() else []


def cache_key(spec: DataSpec, tokenizer_dir: str, chat_template: str | None) -> str:
    h = hashlib.sha256(
        json.dumps([CACHE_VERSION, spec.format, spec.max_length, spec.packing, spec.labels, spec.bad_records]).encode()
    )
    for f in _data_files(spec.path):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    for f in sorted(Path(tokenizer_dir).iterdir()):
        if f.is_file() and (
            "token" in f.name or "vocab" in f.name or f.name in ("merges.txt", "special_tokens_map.json")
        ):
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    h.update((chat_template or "").encode())
    return h.hexdigest()[:24]


def build_examples(spec: DataSpec, tokenizer: Any) -> tuple[list[Example], list[str] | None]:
    """Read, validate and tokenise (no cache): the examples, and the label names for classification."""
    policy = RecordPolicy(spec.bad_records)
    records = load_records(spec.path, policy)
    names = None
    if spec.format == "classification":
        names = label_names(records, list(spec.labels) if spec.labels else None, policy)
    examples = tokenize_records(records, spec.format, tokenizer, spec.max_length, names, policy)
    print(f"{spec.path}: {policy.summary(len(examples))}", flush=True)
    if spec.packing:
        if spec.format == "classification":
            raise ID3Error("data.packing does not apply to classification data; set data.packing=false")
        examples = pack(examples, spec.max_length)
    return examples, names


def _save(examples: list[Example], names: list[str] | None, target: Path) -> None:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    table = {
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels for e in examples],
        "label": [-1 if e.label is None else e.label for e in examples],
    }
    with staged_dir(target, exists="keep") as tmp:  # a concurrent job building the same key writes the same
        Dataset.from_dict(table).save_to_disk(str(tmp))
        (tmp / "id3_ds_meta.json").write_text(json.dumps({"labels": names, "examples": len(examples)}))


def _open(target: Path) -> tuple[TokenizedDataset, list[str] | None]:
    from datasets import load_from_disk

    meta = json.loads((target / "id3_ds_meta.json").read_text())
    return TokenizedDataset(load_from_disk(str(target))), meta["labels"]


def cached_dataset(
    spec: DataSpec, tokenizer: Any, tokenizer_dir: str, cache_root: str | Path, is_main: bool = True
) -> tuple[TokenizedDataset, list[str] | None]:
    """The tokenised dataset and label names, built by rank 0 on a cache miss and shared by every rank."""
    spec = _resolve_source(spec, is_main)
    target = Path(cache_root) / "data" / cache_key(spec, tokenizer_dir, getattr(tokenizer, "chat_template", None))
    error = None
    if is_main and not (target / "id3_ds_meta.json").is_file():
        try:
            examples, names = build_examples(spec, tokenizer)
            _save(examples, names, target)
        except ID3Error as e:
            error = str(e)
    _raise_everywhere(error)
    return _open(target)


def _resolve_source(spec: DataSpec, is_main: bool) -> DataSpec:
    """A named source (`package:...`) as its JSONL file: rank 0 builds it, then every rank uses it, so the
    cache key hashes the real file's bytes on every rank."""
    if not is_source(spec.path):
        return spec
    error = None
    if is_main:
        try:
            resolve_data(spec.path)
        except ID3Error as e:
            error = str(e)
    _raise_everywhere(error)
    return replace(spec, path=str(resolve_data(spec.path)))


def _raise_everywhere(error: str | None) -> None:
    """Rank 0's error (or None) raised on every rank, so no rank is left waiting at a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ID3Error(error)

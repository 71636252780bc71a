"""Training data: read JSON/JSONL records, render them by format, tokenize with a loss mask, batch."""

from id3_ds.data.cache import DataSpec, build_examples, cached_dataset
from id3_ds.data.formats import FORMATS
from id3_ds.data.loading import (
    IGNORE,
    Example,
    TokenizedDataset,
    collate,
    label_names,
    load_records,
    pack,
    tokenize_records,
)

__all__ = [
    "FORMATS",
    "IGNORE",
    "DataSpec",
    "Example",
    "TokenizedDataset",
    "build_examples",
    "cached_dataset",
    "collate",
    "label_names",
    "load_records",
    "pack",
    "tokenize_records",
]

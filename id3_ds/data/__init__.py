"""Training data: read JSON/JSONL records, render them by format, tokenize with a loss mask, batch."""

from id3_ds.data.loading import TokenizedDataset, collate, load_records, tokenize_records

__all__ = ["TokenizedDataset", "collate", "load_records", "tokenize_records"]

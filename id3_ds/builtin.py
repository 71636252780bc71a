"""The embedded default: a tiny LLaMA-style model and its tokenizer, built on the spot, no download.

`model.name_or_path: "builtin:tiny-llama"` resolves to a directory under $ID3_DS_CACHE (default
~/.cache/id3-ds) holding an ordinary Hugging Face model (config, safetensors weights, tokenizer), so
every later tool (export-delta, merge, from_pretrained) treats it like any downloaded model. The build is
deterministic; each process builds into its own temp directory and renames it into place, so ranks
racing on a fresh machine all end up with the same files.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from id3_ds.errors import ID3Error

BUILTIN_MODELS = ("tiny-llama",)
TINY_VERSION = "v2"


def cache_dir() -> Path:
    return Path(os.environ.get("ID3_DS_CACHE", Path.home() / ".cache" / "id3-ds"))


def builtin_data(name: str = "tiny_alpaca.jsonl") -> Path:
    return Path(str(resources.files("id3_ds.resources") / name))


def resolve_model(name_or_path: str) -> str:
    """A local model directory: builtin names are materialised, paths are checked."""
    if name_or_path.startswith("builtin:"):
        name = name_or_path.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            raise ID3Error(f"unknown builtin model '{name}'; available: {', '.join(BUILTIN_MODELS)}")
        return str(materialise_tiny_llama(cache_dir() / f"{name}-{TINY_VERSION}"))
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ID3Error(
            f"model.name_or_path '{name_or_path}' is not a local Hugging Face model directory (no config.json); "
            "download the model first, or use builtin:tiny-llama"
        )
    return str(path)


def materialise_tiny_llama(target: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    from id3_ds.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

    corpus = builtin_data().read_text().splitlines() + [ALPACA_WITH_INPUT, ALPACA_NO_INPUT] * 50
    bpe.train_from_iterator(corpus, trainer)
    from tokenizers import decoders

    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first: its files are identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target

"""The embedded default: a tiny LLaMA-style model and its tokenizer, built on the spot, no download.

`model.name_or_path: "builtin:tiny-llama"` resolves to a directory under $ID3_DS_CACHE (default
~/.cache/id3-ds) holding an ordinary Hugging Face model (config, safetensors weights, tokenizer), so
every later tool (export-delta, merge, from_pretrained) treats it like any downloaded model. The build is
deterministic; each process builds into its own temp directory and renames it into place, so ranks
racing on a fresh machine all end up with the same files.
"""

from __future__ import annotations

from pathlib import Path

from id3_ds.files.atomic import staged_dir
from id3_ds.resources import builtin_data, cache_dir

TINY_VERSION = "v2"


def tiny_llama() -> Path:
    """The embedded default model's directory, built on first use."""
    return materialise_tiny_llama(cache_dir() / f"tiny-llama-{TINY_VERSION}")


def materialise_tiny_llama(target: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    with staged_dir(target, exists="keep") as tmp:  # ranks racing on a fresh machine build identical files
        _build_tiny_llama(tmp)
    return target


def _build_tiny_llama(tmp: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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

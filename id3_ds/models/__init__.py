"""Which model a run trains and how it is loaded: the resolver, the embedded tiny model, loading and LoRA."""

from id3_ds.models.load import load_model, load_tokenizer, wrap_lora
from id3_ds.models.resolve import is_named, resolve_model

__all__ = ["is_named", "load_model", "load_tokenizer", "resolve_model", "wrap_lora"]

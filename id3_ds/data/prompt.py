"""The one rule for how a prompt becomes token ids, shared by training (data.format) and `launch/generate.py`.

A sequence starts with exactly one start token. Many chat templates write it themselves (SmolLM2's begins
with `<|im_start|>`, its BOS; Llama-3's and Gemma's write `{{ bos_token }}`), others do not (the Alpaca
template, plain text). So the tokenizer's BOS is put in front of a text only when the text does not
already begin with it, and the text itself is tokenized without special tokens. Training and generation
both call `chat_prompt_ids` / `start_ids`, so the prompt a model is tuned on is the prompt it is asked
with, token for token.
"""

from __future__ import annotations

from typing import Any


def start_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids to put before `text` at the start of a sequence: the tokenizer's BOS, unless `text` already
    begins with it (a chat template that writes it) or the tokenizer has none."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if bos_id is None or (bos and text.startswith(bos)):
        return []
    return [bos_id]


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """`text` as ids, no special tokens added (the ones the text spells out are still read as such)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """The chat template's rendering of `messages` followed by the opening of the assistant's turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """The token ids a model is prompted with for its answer to `messages` (training's ids up to the
    assistant's answer are exactly these)."""
    text = chat_prompt(tokenizer, messages)
    return start_ids(tokenizer, text) + text_ids(tokenizer, text)

"""Record formats: each turns one record into (prompt, response) pieces; loss falls on responses only.

alpaca:         {"instruction", "input" (optional), "output"}  the Stanford Alpaca prompt template
messages:       {"messages": [{"role", "content"}, ...]}       the tokenizer's chat template
text:           {"text"}                                       plain causal LM, loss on every token
classification: {"text", "label"}                              a sequence-classification head; label str or int
"""

from __future__ import annotations

from typing import Any

from id3_ds.data.prompt import chat_prompt
from id3_ds.errors import ID3Error

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _str_field(rec: dict, key: str, where: str, required: bool = True) -> str:
    v = rec.get(key, None if required else "")
    if not isinstance(v, str):
        raise ID3Error(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    return v


FORMATS = ("alpaca", "messages", "text", "classification")


def classification_fields(record: Any, where: str) -> tuple[str, str]:
    """(text, label as a string) of a classification record; labels may be written as strings or ints."""
    if not isinstance(record, dict):
        raise ID3Error(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    text = _str_field(record, "text", where)
    label = record.get("label")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ID3Error(f"{where}: field 'label' must be a string or an integer, got {label!r}")
    return text, str(label)


def segments(record: Any, fmt: str, tokenizer: Any, where: str) -> list[tuple[str, bool]]:
    """Text pieces in order, each flagged True where the loss applies."""
    if not isinstance(record, dict):
        raise ID3Error(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        instruction = _str_field(record, "instruction", where)
        inp = _str_field(record, "input", where, required=False)
        output = _str_field(record, "output", where)
        template = ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT
        return [(template.format(instruction=instruction, input=inp), False), (output, True)]
    if fmt == "text":
        return [(_str_field(record, "text", where), True)]
    if fmt == "messages":
        return _message_segments(record, tokenizer, where)
    if fmt == "classification":
        raise ID3Error("data.format 'classification' has no loss segments: use tokenize_records")
    raise ID3Error(f"unknown data.format '{fmt}'")


def _message_segments(record: dict, tokenizer: Any, where: str) -> list[tuple[str, bool]]:
    msgs = record.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ID3Error(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for m in msgs:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ID3Error(f"{where}: every message needs string 'role' and 'content'")
    if not getattr(tokenizer, "chat_template", None):
        raise ID3Error("data.format 'messages' needs a tokenizer with a chat template; use 'alpaca' or 'text'")
    # Render growing prefixes: the text an assistant turn adds to the rendering is its response.
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            prompt = chat_prompt(tokenizer, msgs[:i])
            out.append((prompt[len(done) :], False))
            full = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
            out.append((full[len(prompt) :], True))
            done = full
    if not any(loss for _, loss in out):
        raise ID3Error(f"{where}: no assistant message, so nothing to learn from")
    return out

"""What the model will see: processed examples with the loss-masked spans marked, before a long run."""

from __future__ import annotations

from typing import Any

from id3_ds.data.cache import DataSpec
from id3_ds.data.loading import IGNORE, Example, RecordPolicy, label_names, load_records, pack, tokenize_records

OPEN, CLOSE = "[[", "]]"  # around the tokens the loss is computed on


def render_example(example: Example, tokenizer: Any) -> str:
    """The decoded tokens, each run that carries loss wrapped in [[ ]] (a classifier's example: just the text;
    its label is in the header `describe` writes)."""
    if example.label is not None:
        return tokenizer.decode(example.input_ids)
    out, run, run_loss = [], [], None
    for tok, lab in zip(example.input_ids, example.labels):
        loss = lab != IGNORE
        if run and loss != run_loss:
            out.append(_run(tokenizer, run, run_loss))
            run = []
        run.append(tok)
        run_loss = loss
    if run:
        out.append(_run(tokenizer, run, run_loss))
    return "".join(out)


def _run(tokenizer: Any, ids: list[int], loss: bool) -> str:
    text = tokenizer.decode(ids)
    return f"{OPEN}{text}{CLOSE}" if loss else text


def preview(spec: DataSpec, tokenizer: Any, n: int = 3) -> str:
    """The first n processed examples of a data set, numbered, with token counts (no cache involved)."""
    policy = RecordPolicy(spec.bad_records)
    records = load_records(spec.path, policy)
    given = list(spec.labels) if spec.labels else None
    names = label_names(records, given, policy) if spec.format == "classification" else None
    examples = tokenize_records(records, spec.format, tokenizer, spec.max_length, names, policy)
    if spec.packing:
        examples = pack(examples, spec.max_length)
    head = [f"{policy.summary(len(examples))} from {spec.path} (format {spec.format}, max_length {spec.max_length})"]
    if names:
        head.append(f"labels: {', '.join(f'{i}={x}' for i, x in enumerate(names))}")
    else:
        head.append(f"loss is computed on the tokens inside {OPEN} {CLOSE}")
    for i, e in enumerate(examples[:n]):
        head.append(f"--- example {i}: {describe(e, names)} ---")
        head.append(render_example(e, tokenizer))
    return "\n".join(head)


def describe(example: Example, labels: list[str] | None = None) -> str:
    """'9 tokens, 4 with loss' for LM data; '9 tokens; label: positive (id 1)' for a classifier, whose loss
    is on the label, not on tokens."""
    if example.label is not None:
        name = labels[example.label] if labels else str(example.label)
        return f"{len(example.input_ids)} tokens; label: {name} (id {example.label})"
    trained = sum(lab != IGNORE for lab in example.labels)
    return f"{len(example.input_ids)} tokens, {trained} with loss"

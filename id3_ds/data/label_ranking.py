"""Classification by a causal LM: accuracy of the label the model ranks highest after the prompt.

A generative run (data.format alpaca or messages) whose responses are class names (data.labels) is scored
the way the paper's generation tasks are: for each eval record, every label is put in the response slot,
rendered and tokenized exactly as training renders a response (so the same tokens carry the loss), and
the model's summed log-likelihood of those response tokens ranks the labels; accuracy = argmax == gold.
Eval loss alone cannot say whether the model picks the right class, and free generation would need a
parser for whatever it writes.

Ranks split the records (strided) and run the same number of forward passes, as `evaluate` does: under
ZeRO-3 a forward pass is a collective.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from id3_ds.data.evaluate import _batches
from id3_ds.data.loading import IGNORE, Example, RecordPolicy, collate, tokenize_records
from id3_ds.errors import ID3Error

RANKED_FORMATS = ("alpaca", "messages")


@dataclass
class RankingSet:
    """One tokenized candidate per label for each kept record, and the index of its gold label."""

    labels: list[str]
    candidates: list[list[Example]]
    gold: list[int]
    dropped: int = 0  # records whose response is no label, or whose candidates max_length cut away

    def __len__(self) -> int:
        return len(self.gold)


def response_of(record: Any, fmt: str) -> str:
    """The record's (last) response: alpaca's output, or the last assistant message's content."""
    if fmt == "alpaca":
        return str(record.get("output", ""))
    messages = [m for m in record.get("messages", []) if isinstance(m, dict) and m.get("role") == "assistant"]
    return str(messages[-1].get("content", "")) if messages else ""


def with_response(record: Any, fmt: str, response: str) -> dict:
    """A copy of `record` whose (last) response is `response`; everything before it is untouched."""
    out = copy.deepcopy(record)
    if fmt == "alpaca":
        out["output"] = response
        return out
    last = max(i for i, m in enumerate(out["messages"]) if m.get("role") == "assistant")
    out["messages"] = out["messages"][: last + 1]  # nothing after the ranked answer is scored
    out["messages"][last]["content"] = response
    return out


def ranking_set(
    records: list[tuple[str, Any]], fmt: str, tokenizer: Any, max_length: int, labels: list[str]
) -> RankingSet:
    """Tokenize every label as each record's response; records that cannot be ranked are dropped (counted)."""
    if fmt not in RANKED_FORMATS:
        raise ID3Error(f"label ranking needs data.format alpaca or messages, not '{fmt}'")
    if len(labels) < 2:
        raise ID3Error(f"label ranking needs at least 2 labels in data.labels, got {labels}")
    out = RankingSet(list(labels), [], [])
    for where, rec in records:
        gold = response_of(rec, fmt).strip() if isinstance(rec, dict) else ""
        if gold not in labels:
            out.dropped += 1  # an answer that is not a class name cannot be scored as one
            continue
        variants = [(where, with_response(rec, fmt, label)) for label in labels]
        policy = RecordPolicy("skip")
        try:
            examples = tokenize_records(variants, fmt, tokenizer, max_length, policy=policy)
        except ID3Error:
            examples = []
        if len(examples) != len(labels) or policy.truncated:
            out.dropped += 1  # a truncated candidate would be scored on fewer tokens than the others
            continue
        out.candidates.append(examples)
        out.gold.append(labels.index(gold))
    if not out.gold:
        raise ID3Error(f"no eval record has one of data.labels {labels} as its response; check data.labels")
    return out


def response_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the summed log-probability of the tokens whose label is not IGNORE (next-token shift)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    scored = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1)


@torch.no_grad()
def rank_labels(
    forward: Callable[..., Any],
    data: RankingSet,
    pad_id: int,
    batch_size: int,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world: int = 1,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """eval_label_accuracy over the whole set (every rank's share summed), and how many records it covers."""
    k = len(data.labels)
    sums = torch.zeros(2 + k, dtype=torch.float64)  # correct, records, predictions per label
    for rows in _batches(len(data), rank, world, batch_size):
        batch = collate([e for i, _ in rows for e in data.candidates[i]], pad_id)
        labels = batch.pop("labels")
        out = forward(**{key: v.to(device) for key, v in batch.items()})
        scores = response_log_likelihood(out.logits.cpu(), labels).view(len(rows), k)
        pred = scores.argmax(-1)
        real = torch.tensor([r for _, r in rows])
        gold = torch.tensor([data.gold[i] for i, _ in rows])
        sums[0] += float(((pred == gold) & real).sum())
        sums[1] += float(real.sum())
        for c in range(k):
            sums[2 + c] += float(((pred == c) & real).sum())
    if all_reduce is not None:
        all_reduce(sums)
    count = max(float(sums[1]), 1.0)
    metrics = {"eval_label_accuracy": float(sums[0]) / count, "eval_label_examples": int(sums[1])}
    for c, name in enumerate(data.labels):
        metrics[f"eval_predicted_{name}"] = float(sums[2 + c]) / count  # a collapsed model shows here
    return metrics

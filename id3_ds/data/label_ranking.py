"""Classification by a causal LM: accuracy of the label the model ranks highest after the prompt.

A generative run (data.format alpaca or messages) whose responses are class names (data.labels) is scored
the way the paper's generation tasks are: for each eval record, every label is put in the response slot,
rendered and tokenized exactly as training renders a response (so the same tokens carry the loss), and
the model's summed log-likelihood of those response tokens ranks the labels; accuracy = argmax == gold.
Eval loss alone cannot say whether the model picks the right class, and free generation would need a
parser for whatever it writes.

Cost: a record's candidates share their prompt, so the prompt runs once and each label's few response
tokens run on its KV cache (2.2x fewer FLOPs than a full pass per candidate on SmolLM2 reviews); the gold
candidates' scores are also the eval loss, so a ranked run needs no `evaluate` pass besides (3.7x in all).

Ranks split the records (strided) and run the same number of forward passes, as `evaluate` does: under
ZeRO-3 a forward pass is a collective.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from id3_ds.data.evaluate import eval_batches
from id3_ds.data.loading import IGNORE, Example, RecordPolicy, tokenize_records
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


def prompt_length(candidates: list[Example]) -> int:
    """Tokens before the first scored one, which every candidate of a record shares (they differ only after)."""
    starts = {next((j for j, lab in enumerate(c.labels) if lab != IGNORE), len(c.labels)) for c in candidates}
    start = starts.pop()
    if starts or start == 0 or any(c.input_ids[:start] != candidates[0].input_ids[:start] for c in candidates):
        raise ID3Error("label ranking: a record's candidates do not share one prompt; report this as a bug")
    return start


def candidate_scores(
    forward: Callable[..., Any], records: list[list[Example]], pad_id: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """[records, labels]: each candidate's summed response log-likelihood, and how many tokens it sums.

    The prompt, shared by a record's candidates, runs once (left-padded, so every row's next-token logits sit
    in the last column); each candidate then runs only its response tokens on a copy of that KV cache. Two
    forward passes per batch whatever its shape: under ZeRO-3 every rank must run as many as the others."""
    k = len(records[0])
    starts = [prompt_length(c) for c in records]
    n = max(starts)
    ids = torch.full((len(records), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(records), n), dtype=torch.long)
    for r, (cands, s) in enumerate(zip(records, starts, strict=True)):
        ids[r, n - s :] = torch.tensor(cands[0].input_ids[:s])
        mask[r, n - s :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = forward(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        logits_to_keep=1,
    )
    first = out.logits[:, -1].float().cpu().repeat_interleave(k, 0)
    cache_arg = "cache" if hasattr(out, "cache") else "past_key_values"  # its name before transformers 5.2x
    cache = getattr(out, cache_arg)
    cache.batch_repeat_interleave(k)  # one copy of each prompt per candidate
    tails = [(e.input_ids[s:], e.labels[s:]) for cands, s in zip(records, starts, strict=True) for e in cands]
    m = max(len(t) for t, _ in tails)
    cont = torch.full((len(tails), m), pad_id, dtype=torch.long)
    target = torch.full((len(tails), m), IGNORE, dtype=torch.long)
    cont_mask = torch.zeros((len(tails), m), dtype=torch.long)
    for i, (t, lab) in enumerate(tails):
        cont[i, : len(t)], target[i, : len(t)], cont_mask[i, : len(t)] = torch.tensor(t), torch.tensor(lab), 1
    full_mask = torch.cat([mask.repeat_interleave(k, 0), cont_mask], dim=1)
    out = forward(
        input_ids=cont.to(device),
        attention_mask=full_mask.to(device),
        position_ids=(full_mask.cumsum(-1) - 1)[:, n:].clamp(min=0).to(device),
        **{cache_arg: cache},
        use_cache=True,
    )
    # token j of a response is predicted by the position before it: the prompt's last one for j = 0
    logits = torch.cat([first.unsqueeze(1), out.logits.float().cpu()], dim=1)
    labels = torch.cat([torch.full((len(tails), 1), IGNORE, dtype=torch.long), target], dim=1)
    scores = response_log_likelihood(logits, labels)
    return scores.view(-1, k), (target != IGNORE).sum(-1).view(-1, k)


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
    """eval_label_accuracy over the whole set (every rank's share summed), and how many records it covers.

    Also eval_loss (and eval_tokens): the mean token loss of the gold responses, what `evaluate` reports for
    the same records, from the same forward passes."""
    k = len(data.labels)
    sums = torch.zeros(4 + k, dtype=torch.float64)  # correct, records, gold loss sum, gold tokens, per label
    lengths = [prompt_length(c) for c in data.candidates]
    for rows in eval_batches(lengths, rank, world, batch_size):
        scores, counts = candidate_scores(forward, [data.candidates[i] for i, _ in rows], pad_id, device)
        pred = scores.argmax(-1)
        real = torch.tensor([r for _, r in rows])
        gold = torch.tensor([data.gold[i] for i, _ in rows])
        sums[0] += float(((pred == gold) & real).sum())
        sums[1] += float(real.sum())
        sums[2] -= float((scores.gather(1, gold[:, None]).squeeze(1) * real).sum())
        sums[3] += float((counts.gather(1, gold[:, None]).squeeze(1) * real).sum())
        for c in range(k):
            sums[4 + c] += float(((pred == c) & real).sum())
    if all_reduce is not None:
        all_reduce(sums)
    count = max(float(sums[1]), 1.0)
    metrics = {
        "eval_label_accuracy": float(sums[0]) / count,
        "eval_label_examples": int(sums[1]),
        "eval_loss": float(sums[2]) / max(float(sums[3]), 1.0),
        "eval_tokens": int(sums[3]),
    }
    for c, name in enumerate(data.labels):
        metrics[f"eval_predicted_{name}"] = float(sums[4 + c]) / count  # a collapsed model shows here
    return metrics

"""Label ranking (id3_ds/data/label_ranking.py): a causal LM's accuracy as the label it finds most likely
after the prompt, checked against sequence-by-sequence log-likelihoods of a tiny LLaMA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from id3_ds.data import IGNORE, collate, tokenize_records
from id3_ds.data.label_ranking import (
    candidate_scores,
    rank_labels,
    ranking_set,
    response_log_likelihood,
    response_of,
)
from id3_ds.errors import ID3Error

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def tok(base_dir):
    t = AutoTokenizer.from_pretrained(base_dir)
    t.chat_template = CHAT
    return t


@pytest.fixture(scope="module")
def model(base_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def _alpaca(i: int, label: str) -> tuple[str, dict]:
    return f"a:{i}", {"instruction": "Sentiment?", "input": f"review number {i} " * (1 + i % 3), "output": label}


def _chat(i: int, label: str) -> tuple[str, dict]:
    msgs = [
        {"role": "user", "content": f"review {i}, good or bad " * (1 + i % 2)},
        {"role": "assistant", "content": label},
    ]
    return f"m:{i}", {"messages": msgs}


def test_log_likelihood_sums_only_the_scored_next_tokens() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]]))
    labels = torch.tensor([[IGNORE, IGNORE, 0, 1]])  # token 2 (=0) predicted at position 1, token 3 (=1) at 2
    got = response_log_likelihood(logits, labels)
    assert torch.allclose(got, torch.log(torch.tensor([0.9 * 0.8])))


@pytest.mark.parametrize("fmt, make", [("alpaca", _alpaca), ("messages", _chat)])
def test_each_label_is_scored_on_its_own_response_tokens_after_the_same_prompt(tok, fmt, make) -> None:
    records = [make(i, LABELS[i % 2]) for i in range(4)]
    data = ranking_set(records, fmt, tok, 256, LABELS)
    assert data.gold == [0, 1, 0, 1] and data.dropped == 0
    for (where, rec), cands in zip(records, data.candidates, strict=True):
        (trained,) = tokenize_records([(where, rec)], fmt, tok, 256)
        gold = cands[LABELS.index(response_of(rec, fmt))]
        assert (gold.input_ids, gold.labels) == (trained.input_ids, trained.labels)  # scored as it is trained
        prompts = {tuple(i for i, lab in zip(c.input_ids, c.labels) if lab == IGNORE) for c in cands}
        assert len(prompts) == 1  # every label follows the same prompt
        for label, c in zip(LABELS, cands, strict=True):
            scored = tok.decode([i for i, lab in zip(c.input_ids, c.labels) if lab != IGNORE])
            assert label in scored


def test_records_that_cannot_be_ranked_are_dropped_and_counted(tok) -> None:
    records = [
        _alpaca(0, "positive"),
        _alpaca(1, "maybe"),
        ("long", {**_alpaca(2, "negative")[1], "input": "x " * 300}),
    ]
    data = ranking_set(records, "alpaca", tok, 200, LABELS)
    assert (len(data), data.dropped) == (1, 2)  # not a label; the answer cut away by max_length
    with pytest.raises(ID3Error, match="no eval record has one of data.labels"):
        ranking_set(records[1:2], "alpaca", tok, 64, LABELS)
    with pytest.raises(ID3Error, match="needs data.format alpaca or messages"):
        ranking_set(records, "text", tok, 64, LABELS)


@pytest.mark.parametrize("fmt, make", [("alpaca", _alpaca), ("messages", _chat)])
def test_accuracy_is_the_argmax_of_each_candidates_own_log_likelihood(tok, model, fmt, make) -> None:
    records = [make(i, LABELS[(i * 7 // 3) % 2]) for i in range(7)]
    data = ranking_set(records, fmt, tok, 256, LABELS)
    correct, every = 0, []
    with torch.no_grad():
        for cands, gold in zip(data.candidates, data.gold, strict=True):
            scores = []
            for c in cands:  # one unpadded sequence at a time: HF's mean token loss times the scored tokens
                labels = torch.tensor([c.labels])
                out = model(input_ids=torch.tensor([c.input_ids]), labels=labels)
                scores.append(-float(out.loss) * int((labels[:, 1:] != IGNORE).sum()))
            correct += max(range(len(LABELS)), key=scores.__getitem__) == gold
            every += scores
        batch = collate([c for cands in data.candidates for c in cands], tok.eos_token_id)  # right-padded
        labels = batch.pop("labels")
        batched = response_log_likelihood(model(**batch).logits, labels)
    assert torch.allclose(batched, torch.tensor(every), atol=1e-4)  # padding and the shift change nothing
    with torch.no_grad():  # prompts of different lengths, left-padded, then each response on the prompt's cache
        cached, counts = candidate_scores(model, data.candidates, tok.eos_token_id)
    assert torch.allclose(cached.flatten(), torch.tensor(every), atol=1e-4)
    got = rank_labels(model, data, tok.eos_token_id, batch_size=3)  # padded batches, a short last one
    assert got["eval_label_examples"] == 7
    gold_tokens = [int((torch.tensor(c[g].labels[1:]) != IGNORE).sum()) for c, g in zip(data.candidates, data.gold)]
    assert counts.gather(1, torch.tensor(data.gold)[:, None]).flatten().tolist() == gold_tokens
    gold_loss = -sum(every[2 * i + g] for i, g in enumerate(data.gold)) / sum(gold_tokens)
    assert got["eval_loss"] == pytest.approx(gold_loss, rel=1e-5)  # HF's token-mean loss over the gold responses
    assert got["eval_label_accuracy"] == pytest.approx(correct / 7)
    assert got["eval_predicted_negative"] + got["eval_predicted_positive"] == pytest.approx(1.0)


def test_ranks_split_the_records_and_run_the_same_number_of_forward_passes(tok, model) -> None:
    data = ranking_set([_alpaca(i, LABELS[i % 2]) for i in range(5)], "alpaca", tok, 256, LABELS)
    calls, counts = [], []
    for rank in (0, 1):
        n = 0

        def forward(**batch):
            nonlocal n
            n += 1
            return model(**batch)

        counts.append(rank_labels(forward, data, tok.eos_token_id, 2, rank=rank, world=2)["eval_label_examples"])
        calls.append(n)
    assert counts == [3, 2] and calls[0] == calls[1]  # a ZeRO-3 forward is a collective: equal counts


@pytest.mark.slow
@pytest.mark.distributed
def test_a_generative_run_with_labels_logs_the_label_accuracy_of_its_whole_eval_set(tmp_path, env) -> None:
    """2 ranks under ZeRO-3 with an odd number of eval records: equal forward passes (no hang), and the
    logged accuracy covers every record once."""
    import json

    from tests.launcher import ok, train

    files = {}
    for name, n in (("train", 16), ("eval", 7)):  # train: one global batch (4 x 2 accum x 2 ranks)
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(_alpaca(i, LABELS[i % 2])[1]) + "\n" for i in range(n)))
    out = tmp_path / "run"
    overrides = [
        f"data.path={files['train']}",
        f"data.eval_path={files['eval']}",
        'data.labels=["negative", "positive"]',
        "deepspeed.zero_optimization.stage=3",
        "train.steps=2",
        "train.eval_steps=1",
        "train.export_delta=false",
        f"train.output_dir={out}",
    ]
    ok(train(overrides, nproc=2, env=env))
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "eval_label_accuracy" in line]
    assert [e["step"] for e in evals] == [1, 2]
    for e in evals:
        assert e["eval_label_examples"] == 7
        assert e["eval_label_accuracy"] * 7 == pytest.approx(round(e["eval_label_accuracy"] * 7))
        assert e["eval_predicted_negative"] + e["eval_predicted_positive"] == pytest.approx(1.0)

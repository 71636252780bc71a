"""The baselines and ID3 over LoRA under DeepSpeed ZeRO-3 with 2 CPU ranks: the same masks as their
definitions (fish: as the plain-torch Fisher; random: the key hash), exact budgets, classification with
evaluation during training."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from id3_ds import ID3Config
from id3_ds.algorithm.id3 import layout
from id3_ds.checkpoint import checkpoint_dir, read_id3_state
from id3_ds.data import collate, load_records, tokenize_records
from id3_ds.methods import hash_scores
from id3_ds.training.batches import micro_batch_indices
from tests.launcher import TINY_CONFIG, ok, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BUDGET, STEPS, ACCUM, MICRO, FISH_N, SEED = 400, 3, 2, 2, 2, 42
COMMON = [
    f"id3.budget={BUDGET}",
    f"train.steps={STEPS}",
    f"train.grad_accum={ACCUM}",
    f"train.micro_batch_size={MICRO}",
    f"id3.fish_batches={FISH_N}",
    "train.log_steps=1",
    "train.export_delta=false",
    "model.dtype=fp32",
    "deepspeed.zero_optimization.stage=3",
]


def _keys(state, slices) -> list[int]:
    base = {s.name: s.key_base for s in slices}
    return sorted(base[n] + int(i) for n, pm in state.params.items() for i in pm.indices)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    order = torch.argsort(-scores.double(), stable=True)  # stable: ties to the smaller key
    return sorted(order[:k].tolist())


@pytest.mark.parametrize("method", ["fish", "random"])
def test_static_method_under_zero3_picks_its_definition(method, tmp_path, env, base_dir) -> None:
    ok(train([*COMMON, f"method={method}", f"train.output_dir={tmp_path}"], env=env))
    state, meta = read_id3_state(checkpoint_dir(tmp_path, STEPS))
    assert len(state) == BUDGET and meta["chosen"] == BUDGET
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    named = list(model.named_parameters())
    slices, total, _ = layout([(n, tuple(p.shape)) for n, p in named], ID3Config(budget=BUDGET))
    if method == "random":
        want = _top(hash_scores(torch.arange(total), SEED), BUDGET)
    else:  # the Fisher of the same sample batches the run used: the reduced (rank-averaged) gradient, squared
        tok = AutoTokenizer.from_pretrained(base_dir)
        data = tokenize_records(load_records("id3_ds/resources/tiny_alpaca.jsonl"), "alpaca", tok, 128)
        fisher = torch.zeros(total)
        for s in range(FISH_N):
            model.zero_grad()
            for micro in range(ACCUM):
                for rank in range(2):
                    idx = micro_batch_indices(len(data), SEED, s, micro, rank, 2, MICRO, ACCUM)
                    (model(**collate([data[i] for i in idx], tok.pad_token_id)).loss / (ACCUM * 2)).backward()
            fisher += torch.cat([p.grad.reshape(-1) for _, p in named]) ** 2
        want = _top(fisher, BUDGET)
    got = _keys(state, slices)
    if method == "random":
        assert got == want
    else:  # reduction order differs from the one-process sum: allow a near-tie or two to flip
        assert len(set(got) & set(want)) >= BUDGET - 2


def test_id3_over_lora_classification_with_eval_under_zero3(tmp_path, env) -> None:
    pytest.importorskip("peft")
    args = [
        *COMMON,
        "method=id3",
        "lora.rank=4",
        'id3.fully_trainable=["*score.modules_to_save*"]',
        "data.format=classification",
        "data.path=id3_ds/resources/sentiment_train.jsonl",
        "data.eval_path=id3_ds/resources/sentiment_eval.jsonl",
        "data.max_length=48",
        "train.eval_steps=2",
        f"train.output_dir={tmp_path}",
    ]
    ok(train(args, env=env))
    state, meta = read_id3_state(checkpoint_dir(tmp_path, STEPS))
    assert len(state) == BUDGET and meta["chosen"] == BUDGET - 64 * 2  # the score head is charged to B
    assert all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in state.params), list(state.params)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 3] and all(r["eval_examples"] == 200 for r in evals)
    assert all(0 <= r["eval_f1"] <= 1 for r in evals)


def test_dense_method_trains_checkpoints_without_a_mask_and_resumes(tmp_path, env, base_dir) -> None:
    """LoRA, the dense path of the update (DenseUpdate) that method full shares: every trainable entry counted
    whole across the 2 ZeRO-3 ranks, no mask in the checkpoint, and a resume continues the run. Full's own
    checks (every model entry trains, no mask) ride on test_decay's runs."""
    pytest.importorskip("peft")
    from id3_ds.config import load_config
    from id3_ds.models import wrap_lora

    lo = load_config(TINY_CONFIG, ["lora.rank=4"]).lora
    lora = wrap_lora(
        AutoModelForCausalLM.from_pretrained(base_dir), lo.rank, lo.alpha, lo.dropout, lo.target_modules, False
    )
    args = [*COMMON, "method=lora", "lora.rank=4", "train.save_steps=1", f"train.output_dir={tmp_path}"]
    ok(train([*args, "train.steps=2"], env=env))
    ckpt = checkpoint_dir(tmp_path, 2)
    info = json.loads((ckpt / "COMPLETE").read_text())
    assert info["id3"]["budget_entries"] is None and info["train"]["steps"] is None and not (ckpt / "id3").exists()
    ok(train([*args, "train.steps=3", "train.resume_mismatch=allow"], env=env))  # continues from step 2 (of 3 now)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("event") == "start"]
    assert [r["step"] for r in starts] == [0, 2]
    assert starts[0]["budget"] == sum(p.numel() for p in lora.parameters() if p.requires_grad)  # not one rank's
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert not any("chosen" in r for r in records)

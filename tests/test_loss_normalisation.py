"""The step's gradient is sum(item losses) / (loss items of the whole step), whatever the split of the global
batch into micro-batches, accumulation steps and ranks (id3_ds.training.loss, as launch/train.py uses it)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from id3_ds.data import IGNORE, Example, collate
from id3_ds.training.loss import StepLoss, loss_items, step_loss
from tests.launcher import ok, train, weights

PAD = 0


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).float()


def _examples() -> list[Example]:
    """Prompt (no loss) + response; responses from 2 to 60 tokens, so padded micro-batches differ a lot."""
    g = torch.Generator().manual_seed(1)
    out = []
    for response in (2, 3, 2, 4, 60, 45, 50, 38):
        ids = torch.randint(1, 64, (5 + response,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * 5 + ids[5:]))
    return out


def _reference_grads(model: LlamaForCausalLM, examples: list[Example]) -> list[torch.Tensor]:
    """The definition: the sum of every label token's loss over the whole step, divided by their number."""
    model.zero_grad()
    batch = collate(examples, PAD)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    (losses / (target != IGNORE).sum()).backward()
    return [p.grad.clone() for p in model.parameters()]


def _split_grads(
    model: LlamaForCausalLM, examples: list[Example], micro: int, accum: int, world: int, normalise: bool = True
) -> list[torch.Tensor]:
    """What DeepSpeed computes: per rank, sum over micro-batches of loss/accum; then the mean over ranks."""
    per_rank = [
        [collate(examples[(m * world + r) * micro : (m * world + r + 1) * micro], PAD) for m in range(accum)]
        for r in range(world)
    ]  # micro-step major, then rank, as id3_ds.training.batches orders a global batch
    total = sum(loss_items(b["labels"]) for batches in per_rank for b in batches)
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for batches in per_rank:
        norm = step_loss(batches, world, all_reduce=lambda t: t.fill_(total))  # the all-reduce: a sum over ranks
        model.zero_grad()
        for m, batch in enumerate(batches):
            mean = model(**batch).loss
            ((norm.scale(m, mean) if normalise else mean) / accum).backward()
        for g, p in zip(grads, model.parameters()):
            g += p.grad / world
    return grads


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize(("micro", "accum", "world"), [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 4, 2), (4, 1, 2)])
def test_any_split_of_the_step_gives_the_token_mean_gradient(micro, accum, world) -> None:
    model, examples = _model(), _examples()
    want = _reference_grads(model, examples)
    assert _max_diff(_split_grads(model, examples, micro, accum, world), want) <= 1e-6


def test_the_data_tells_the_per_micro_batch_mean_apart() -> None:
    """Guards the test above: with these lengths, averaging per-micro-batch means gives another gradient."""
    model, examples = _model(), _examples()
    want = _reference_grads(model, examples)
    assert _max_diff(_split_grads(model, examples, 4, 2, 1, normalise=False), want) > 1e-3


def test_loss_items_counts_shifted_label_tokens_or_rows() -> None:
    lm = torch.tensor([[5, IGNORE, 7, 8], [IGNORE, IGNORE, 9, IGNORE]])
    assert loss_items(lm) == 3  # position 0 predicts nothing after HF's shift
    assert loss_items(torch.tensor([1, 0, 1])) == 3  # classification: one item per example
    norm = StepLoss(items=(3, 1), total=8, world=2)  # grad_accum 2, 2 ranks: weights n_m * 2 * 2 / 8
    assert float(norm.scale(0, torch.tensor(1.0))) == 1.5 and float(norm.scale(1, torch.tensor(1.0))) == 0.5


@pytest.mark.distributed
@pytest.mark.slow
def test_one_rank_and_two_ranks_with_the_same_global_batch_end_with_the_same_weights(tmp_path, env) -> None:
    """micro 4 x accum 2 on 1 rank and micro 2 x accum 2 on 2 ranks see the same 8 examples per step (the
    batch order is micro-step major, then rank), split differently: weights and logged losses agree."""
    common = [
        "train.steps=4",
        "train.grad_accum=2",
        "train.log_steps=1",
        "train.save_steps=0",
        "train.save_final_model=true",
        "train.export_delta=false",
        "id3.budget=600",
        "model.dtype=fp32",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    ok(train([*common, "train.micro_batch_size=4", f"train.output_dir={one}"], nproc=1, env=env))
    ok(train([*common, "train.micro_batch_size=2", f"train.output_dir={two}"], nproc=2, env=env))
    a, b = weights(one / "final_model"), weights(two / "final_model")
    worst = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert worst <= 1e-5, f"final weights differ by up to {worst:.3g}"

    def losses(d) -> list[float]:
        return [r["loss"] for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "loss" in r]

    assert len(losses(one)) == 4
    assert losses(one) == pytest.approx(losses(two), abs=1e-5)

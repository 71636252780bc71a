"""Weight decay goes where users expect (nanoGPT, the HF Trainer): never on biases or norm scales, whatever
the model family calls its norms (BERT's `LayerNorm`, GPT-2's `ln_f`), for ID3 and for the dense methods."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

from id3_ds.algorithm.decay import decay_groups, decays
from id3_ds.algorithm.id3 import from_module
from id3_ds.algorithm.slices import tied_aliases
from id3_ds.checkpoint import checkpoint_dir
from id3_ds.config import config_from_dict
from tests.launcher import ok, train, weights

WD = 0.1
RAW = {"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"path": "x.jsonl"}, "train": {"steps": 1}}


def _bert() -> torch.nn.Module:
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return BertModel(config)


def _gpt2() -> torch.nn.Module:
    return GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0))


def _expected(model: torch.nn.Module) -> dict[str, float]:
    return {n: WD if p.dim() >= 2 else 0.0 for n, p in model.named_parameters()}


@pytest.mark.parametrize("build", [_bert, _gpt2], ids=["bert-LayerNorm", "gpt2-ln_f"])
def test_id3_decays_matrices_only_with_the_run_config_defaults(build) -> None:
    model = build()
    id3 = from_module(model, config_from_dict({**RAW, "id3": {"budget": 10}}).id3, steps=5)
    rates = id3.decay_rates(WD)
    got = {h.info.name: rates[i] for i, h in enumerate(id3.held)}
    assert got == _expected(model)
    norms = [n for n in got if "layernorm" in n.lower() or ".ln_" in n or n.startswith("ln_")]
    assert norms and all(got[n] == 0.0 for n in norms)  # LayerNorm.weight / ln_f.weight: the bug this guards


@pytest.mark.parametrize("build", [_bert, _gpt2], ids=["bert-LayerNorm", "gpt2-ln_f"])
def test_dense_param_groups_follow_the_same_rule(build) -> None:
    model = build()
    groups = decay_groups(model.named_parameters(), WD, config_from_dict(RAW).id3.no_decay)
    rate = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert {n: rate[id(p)] for n, p in model.named_parameters()} == _expected(model)
    torch.optim.AdamW(groups, lr=1e-3)  # a valid optimizer argument as it is


def test_user_patterns_add_to_the_rule_case_insensitively() -> None:
    cfg = config_from_dict({**RAW, "id3": {"budget": 10, "no_decay": ["*EMBEDDINGS*"]}}).id3
    id3 = from_module(_bert(), cfg, steps=5)
    rates = id3.decay_rates(WD)
    got = {h.info.name: rates[i] for i, h in enumerate(id3.held)}
    assert got["embeddings.word_embeddings.weight"] == 0.0
    assert got["encoder.layer.0.attention.self.query.weight"] == WD
    assert not decays("x.bias", (4, 4), ["*BIAS"]) and decays("x.weight", (4, 4), ["*bias"])
    assert not decays("ln.weight", (4,)) and decays("w", (4, 4))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [["deepspeed.zero_optimization.stage=3"], ["deepspeed.zero_optimization.stage=2", "train.optimizer=torch_adamw"]],
    ids=["zero3-deepspeed-adamw", "zero2-client-adamw"],
)
def test_dense_method_under_deepspeed_decays_no_norm_or_bias(variant, tmp_path, env) -> None:
    """One step of method full with and without decay: the norm scales move identically (no decay on them,
    ZeRO-3 partitions included), the matrices do not. Method full also trains every entry of the model and
    checkpoints without a mask (its resume is the dense path test_methods_deepspeed checks with lora)."""
    finals = {}
    for wd in (0.0, 0.5):
        out = tmp_path / f"wd{wd}"
        args = ["method=full", "train.steps=1", f"train.weight_decay={wd}", "train.save_final_model=true"]
        args += ["train.export_delta=false", "train.save_steps=0", f"train.output_dir={out}", *variant]
        ok(train(args, nproc=1, env=env))
        finals[wd] = weights(out / "final_model")
    info = json.loads((checkpoint_dir(out, 1) / "COMPLETE").read_text())  # the last step is always saved
    assert info["id3"]["budget_entries"] is None and not (checkpoint_dir(out, 1) / "id3").exists()
    starts = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"start"' in line]
    assert [r["budget"] for r in starts] == [sum(t.numel() for t in finals[0.5].values())]  # every entry trains
    one_d = [n for n, t in finals[0.0].items() if t.dim() < 2]
    two_d = [n for n, t in finals[0.0].items() if t.dim() >= 2]
    assert any("norm" in n for n in one_d) and two_d
    for name in one_d:
        assert torch.equal(finals[0.0][name], finals[0.5][name]), f"{name} was decayed"
    assert all(not torch.equal(finals[0.0][n], finals[0.5][n]) for n in two_d)


class _Tied(torch.nn.Module):
    """An embedding tied to the output head, as SmolLM2's lm_head.weight is model.embed_tokens.weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed.weight


def test_no_decay_names_a_tied_weight_by_any_of_its_names() -> None:
    """`no_decay=["lm_head.*"]` exempts the shared tensor although it is listed as `embed.weight`, for ID3's
    masked decay and for the dense groups; a pattern naming neither name leaves it decaying."""
    model = _Tied()
    config = config_from_dict({**RAW, "id3": {"budget": 10, "no_decay": ["lm_head.*"]}}).id3
    id3 = from_module(model, config, steps=5)
    rates = id3.decay_rates(WD)
    assert {h.info.name: rates[i] for i, h in enumerate(id3.held)} == {
        "embed.weight": 0.0, "proj.weight": WD, "proj.bias": 0.0,
    }  # fmt: skip
    groups = decay_groups(model.named_parameters(), WD, config.no_decay, aliases=tied_aliases(model))
    rate = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == 3  # the tied tensor once
    assert (rate[id(model.embed.weight)], rate[id(model.proj.weight)]) == (0.0, WD)
    groups = decay_groups(model.named_parameters(), WD, ["*proj*"], aliases=tied_aliases(model))
    rate = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert (rate[id(model.embed.weight)], rate[id(model.proj.weight)]) == (WD, 0.0)

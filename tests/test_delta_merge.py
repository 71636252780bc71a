"""Train -> export -> merge round trips, shard layout, atomic output, apply/remove on a loaded model."""

from __future__ import annotations

import copy
import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from id3_ds.cli import app
from id3_ds.delta import apply_delta, export_delta, load_delta, merge, remove_delta
from id3_ds.errors import ID3Error
from id3_ds.files.safetensors_io import read_header
from tests.test_delta_common import LLAMA, tokens

merge_mod = importlib.import_module("id3_ds.delta.merge")  # the package re-exports the function `merge`


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _ulp_bf16(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place (same-sign values)."""
    ia, ib = a.view(torch.int16).to(torch.int32), b.view(torch.int16).to(torch.int32)
    return int((ia - ib).abs().max()) if a.numel() else 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_case):
    c = shared_case(world=3)  # three ZeRO-3 style rank shards, unioned by export
    out = tmp_path_factory.mktemp("exp") / "delta"
    export_delta(c.run, c.base, out)  # an output dir: the latest complete checkpoint is taken
    return c, out


def test_fp32_merge_is_bit_identical_and_logits_match(exported, tmp_path) -> None:
    c, delta = exported
    merge(c.base, delta, tmp_path / "m")
    merged = _load(tmp_path / "m")
    trained = c.model.state_dict()
    for name, p in merged.state_dict().items():
        assert torch.equal(p, trained[name]), name
    x = tokens(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(merged(x).logits, c.model(x).logits)
    cfg = json.loads((delta / "delta_config.json").read_text())
    assert cfg["total_entries"] == 600 and cfg["params"]["model.norm.weight"]["storage"] == "dense"


def test_bf16_merge_within_one_ulp_of_trained(exported, tmp_path) -> None:
    c, delta = exported
    merge(c.base, delta, tmp_path / "m", dtype="bf16")
    merged = _load(tmp_path / "m")
    assert merged.dtype == torch.bfloat16
    trained = c.model.state_dict()
    for name, p in merged.state_dict().items():
        assert _ulp_bf16(p, trained[name].to(torch.bfloat16)) <= 1, name
    x = tokens(1, seed=5)[0]
    with torch.no_grad():
        ref = copy.deepcopy(c.model).to(torch.bfloat16)(x).logits.float()  # never cast the shared model
        assert torch.allclose(merged(x).logits.float(), ref, atol=1e-2)


def test_multi_shard_layout_side_files_and_index_are_kept(exported, tmp_path) -> None:
    c, delta = exported
    merge(c.base, delta, tmp_path / "m", dtype="fp16")
    base_files = sorted(p.name for p in c.base.iterdir())
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == base_files
    shards = [n for n in base_files if n.startswith("model-")]
    assert len(shards) == 4
    for fn in shards:
        assert set(read_header(tmp_path / "m" / fn).tensors) == set(read_header(c.base / fn).tensors)
    bi = json.loads((c.base / "model.safetensors.index.json").read_text())
    mi = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert mi["weight_map"] == bi["weight_map"]
    assert mi["metadata"]["total_size"] == bi["metadata"]["total_size"] // 2
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"
    assert (tmp_path / "m" / "tokenizer_config.json").read_text() == (c.base / "tokenizer_config.json").read_text()


def test_world_size_does_not_change_the_delta(exported, shared_case, tmp_path) -> None:
    c1 = shared_case(world=1)
    export_delta(c1.ckpt, c1.base, tmp_path / "d1")
    a, b = load_delta(tmp_path / "d1"), load_delta(exported[1])
    assert set(a.params) == set(b.params)
    for name in a.params:
        ia, va = a.params[name].flat()
        ib, vb = b.params[name].flat()
        assert (ia is None and ib is None) or torch.equal(ia, ib)
        assert torch.equal(va, vb)


def test_merge_refuses_base_dir_and_existing_out(exported, tmp_path) -> None:
    c, delta = exported
    with pytest.raises(ID3Error, match="overlaps the input"):
        merge(c.base, delta, c.base, overwrite=True)
    with pytest.raises(ID3Error, match="overlaps the input"):
        merge(c.base, delta, c.base / "sub")
    (tmp_path / "m").mkdir()
    with pytest.raises(ID3Error, match="already exists"):
        merge(c.base, delta, tmp_path / "m")
    merge(c.base, delta, tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "config.json").is_file()


def test_interrupted_merge_leaves_nothing(exported, tmp_path, monkeypatch) -> None:
    c, delta = exported
    calls = []
    real = merge_mod._merge_shard

    def dies_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(merge_mod, "_merge_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        merge(c.base, delta, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_wrong_base_is_refused_before_writing_and_force_overrides(exported, tmp_path) -> None:
    c, delta = exported
    other = tmp_path / "other"
    shutil.copytree(c.base, other)
    from tests.test_delta_common import tiny_llama

    tiny_llama(seed=1).save_pretrained(other, max_shard_size="100KB")
    with pytest.raises(ID3Error, match="differs from the one the delta was exported against"):
        merge(other, delta, tmp_path / "m")
    assert not (tmp_path / "m").exists() and [p.name for p in tmp_path.iterdir()] == ["other"]
    merge(other, delta, tmp_path / "m", force=True)
    with pytest.raises(ID3Error, match="trained from another base"):
        export_delta(c.ckpt, other, tmp_path / "d")


def test_apply_and_remove_on_a_loaded_model(exported) -> None:
    c, delta = exported
    model = _load(c.base)
    base = {n: t.clone() for n, t in model.state_dict().items()}
    apply_delta(model, delta)
    trained = c.model.state_dict()
    for name, p in model.state_dict().items():
        assert torch.equal(p, trained[name]), name
    with pytest.raises(ID3Error, match="differs from the one"):
        apply_delta(model, delta)  # applying twice: the model no longer is the base
    remove_delta(model, delta)
    for name, p in model.state_dict().items():
        assert torch.equal(p, base[name]), name  # bit for bit: the overwritten values are written back


def test_apply_refuses_a_foreign_model_without_changing_it(exported) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(**{**LLAMA, "hidden_size": 32, "num_attention_heads": 2}))
    before = {n: t.clone() for n, t in other.state_dict().items()}
    with pytest.raises(ID3Error, match="shape"):
        apply_delta(other, exported[1])
    assert all(torch.equal(t, before[n]) for n, t in other.state_dict().items())


def test_cli_export_merge_inspect_and_one_line_errors(exported, tmp_path) -> None:
    c, _ = exported
    r = CliRunner()
    res = r.invoke(app, ["export-delta", str(c.ckpt), "--base", str(c.base), "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["merge", str(c.base), str(tmp_path / "d"), "--out", str(tmp_path / "m"), "--dtype", "bf16"])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["inspect", str(tmp_path / "d"), "--json"])
    s = json.loads(res.output)
    assert s["total_entries"] == 600 and s["layers"]["other"]["entries"] > 0 and len(s["base"]["fingerprint"]) == 64
    assert "layer 0" in r.invoke(app, ["inspect", str(tmp_path / "d")]).output
    res = r.invoke(app, ["merge", str(c.base), str(tmp_path / "nope"), "--out", str(tmp_path / "m2")])
    assert res.exit_code == 2 and res.output.startswith("error: ") and res.output.count("\n") == 1
    help_text = r.invoke(app, ["--help"]).output
    assert all(cmd in help_text for cmd in ("export-delta", "merge", "inspect", "Examples"))


def test_cli_base_may_be_given_as_in_a_config(exported, tmp_path, monkeypatch) -> None:
    """`builtin:`/`package:` resolve to the model directory, as model.name_or_path does; a missing package is
    one line naming the pip install."""
    from id3_ds.cli import _base_dir
    from id3_ds.models import resolve_model

    monkeypatch.setenv("ID3_DS_CACHE", str(tmp_path / "cache"))
    assert _base_dir("builtin:tiny-llama") == Path(resolve_model("builtin:tiny-llama"))
    c, _ = exported
    assert _base_dir(str(c.base)) == Path(c.base)
    res = CliRunner().invoke(app, ["merge", "package:no_such_model_pkg", str(c.ckpt), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "pip install no-such-model-pkg" in res.output

"""PEFT both ways: `export-delta --format peft` writes a SHiRA adapter that PeftModel loads and merges to the
logits of `id3-ds merge`; `import-peft` turns a SHiRA adapter into a delta that inspect, merge and
apply_delta use."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from id3_ds.cli import app
from id3_ds.delta import apply_delta, export_delta, load_delta, merge
from tests.test_delta_common import make_case, tiny_llama, tokens

peft = pytest.importorskip("peft")


def _causal(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens(1, seed=7)[0]).logits


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peft")
    c = make_case(tmp, budget=2000, steps=10)
    export_delta(c.run, c.base, tmp / "delta")
    merge(c.base, tmp / "delta", tmp / "merged")
    return c, tmp


def test_export_peft_loads_and_merges_like_id3_merge(case) -> None:
    from peft import PeftModel

    c, tmp = case
    out = tmp / "shira"
    r = CliRunner().invoke(
        app,
        [
            "export-delta",
            str(c.run),
            "--base",
            str(c.base),
            "--out",
            str(out),
            "--format",
            "peft",
            "--peft-embeddings",
            "copy",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "PEFT SHiRA adapter" in r.output and "modules_to_save" in r.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SHIRA" and cfg["target_modules"] and "model.norm" in cfg["modules_to_save"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and 'library_name: "peft"' in card
    want = _logits(_causal(tmp / "merged"))
    model = PeftModel.from_pretrained(_causal(c.base), out).eval()
    torch.testing.assert_close(_logits(model), want, atol=1e-5, rtol=0)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged), want, atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(_causal(c.base)), want, atol=1e-3)  # the delta does change the model
    # every SHiRA layer holds r·(in+out) values, as PEFT requires; the padding is zero
    sd = load_file(out / "adapter_model.safetensors")
    delta = load_delta(tmp / "delta")
    for mod in cfg["target_modules"]:
        w, ij = sd[f"base_model.model.{mod}.shira_weight"], sd[f"base_model.model.{mod}.shira_indices"]
        p = delta.params[f"{mod}.weight"]
        assert w.numel() == cfg["r"] * sum(p.shape) and ij.dtype == torch.int32
        assert int((w != 0).sum()) <= p.entries


def test_export_peft_refuses_embeddings_with_the_targets_setting(case) -> None:
    c, tmp = case
    out = tmp / "refused"
    r = CliRunner().invoke(
        app, ["export-delta", str(c.run), "--base", str(c.base), "--out", str(out), "--format", "peft"]
    )
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "embed_tokens" in r.output and "id3.targets" in r.output and "--peft-embeddings copy" in r.output
    assert not out.exists()


@pytest.fixture(scope="module")
def shira(tmp_path_factory, case):
    """A SHiRA adapter trained (here: random values, init_weights=False) by PEFT itself, plus a changed norm."""
    from peft import ShiraConfig, get_peft_model

    c, _ = case
    tmp = tmp_path_factory.mktemp("shira")
    torch.manual_seed(3)
    cfg = ShiraConfig(
        r=2,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_weights=False,
        modules_to_save=["model.norm"],
        random_seed=1,
    )
    model = get_peft_model(_causal(c.base), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "shira_weight" in n:
                p.mul_(0.01)
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp / "adapter")
    want = _logits(model.merge_and_unload())
    return c, tmp, want


def test_import_peft_gives_a_delta_that_merges_and_applies_like_peft(shira) -> None:
    c, tmp, want = shira
    r = CliRunner().invoke(
        app, ["import-peft", str(tmp / "adapter"), "--base", str(c.base), "--out", str(tmp / "delta")]
    )
    assert r.exit_code == 0, r.output
    d = load_delta(tmp / "delta")
    assert "model.layers.0.self_attn.q_proj.weight" in d.params and d.params["model.norm.weight"].dense
    assert d.params["model.layers.0.self_attn.q_proj.weight"].entries == 2 * (64 + 64)
    s = CliRunner().invoke(app, ["inspect", str(tmp / "delta"), "--json"])
    assert s.exit_code == 0 and json.loads(s.output)["total_entries"] == d.total_entries
    merge(c.base, tmp / "delta", tmp / "merged")
    torch.testing.assert_close(_logits(_causal(tmp / "merged")), want, atol=1e-5, rtol=0)
    model = _causal(c.base)
    apply_delta(model, tmp / "delta")
    torch.testing.assert_close(_logits(model), want, atol=1e-5, rtol=0)


def test_import_peft_refuses_a_lora_adapter(shira) -> None:
    from peft import LoraConfig, get_peft_model

    c, tmp, _ = shira
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp / "lora")
    r = CliRunner().invoke(app, ["import-peft", str(tmp / "lora"), "--base", str(c.base), "--out", str(tmp / "x")])
    assert r.exit_code == 2 and "LORA adapter, not SHiRA" in r.output and not (tmp / "x").exists()


def test_round_trip_through_peft_is_within_one_ulp(case) -> None:
    from id3_ds.delta.peft import export_peft, import_peft

    c, tmp = case
    export_peft(tmp / "delta", c.base, tmp / "rt_shira", embeddings="copy")
    import_peft(tmp / "rt_shira", c.base, tmp / "rt_delta")
    merge(c.base, tmp / "rt_delta", tmp / "rt_merged")
    a, b = (
        load_file(tmp / "merged" / "model.safetensors")
        if (tmp / "merged" / "model.safetensors").exists()
        else (None, None)
    )
    got, want = _causal(tmp / "rt_merged").state_dict(), _causal(tmp / "merged").state_dict()
    # bit for bit but at the fix-up entries (SHiRA holds one fp32 value per entry, fl32(d + fix)): one rounding
    fixes = sum(p.fixes for p in load_delta(tmp / "delta").params.values())
    off = sum(int((got[k] != want[k]).sum()) for k in want)
    assert 0 < fixes and off <= fixes
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-6


def test_export_peft_refuses_a_tied_embedding_even_with_copy(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from id3_ds.delta.base import BaseModel
    from id3_ds.delta.format import ParamDelta, write_delta
    from id3_ds.delta.peft import export_peft
    from id3_ds.errors import ID3Error
    from tests.test_delta_common import LLAMA

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=True)).save_pretrained(tmp_path / "base")
    base = BaseModel.open(tmp_path / "base")
    name = "model.embed_tokens.weight"
    p = ParamDelta(tuple(base.get(name).info.shape), "F32", torch.tensor([0.5, -0.5]), torch.tensor([3, 70]))
    fp = {name: {"shape": list(p.shape), "dtype": "F32", "sha256": base.read(name)[1]}}
    write_delta(tmp_path / "d", {name: p}, base={"name_or_path": "tied"}, id3={}, fingerprint_tensors=fp)
    with pytest.raises(ID3Error, match="ties to its output head") as e:
        export_peft(tmp_path / "d", tmp_path / "base", tmp_path / "out", embeddings="copy")
    assert "id3.targets" in str(e.value) and not (tmp_path / "out").exists()

"""The sparse delta of an ID3-over-LoRA run: A's init plus sparse A/B entries and the LoRA settings, folded
by `merge` / `apply_delta` as W + (alpha/r)·B·A; the merged model computes the trained PEFT model's function.

The plain-torch tests build the checkpoint by hand (the trainer's own `_save_lora` writes the LoRA file);
the distributed test runs the trainer under ZeRO-3 on 2 ranks and merges the delta it exported."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from id3_ds.checkpoint import LORA_FILE, checkpoint_dir, read_id3_state
from id3_ds.cli import app
from id3_ds.delta import apply_delta, export_delta, load_delta, merge, remove_delta
from id3_ds.delta.base import BaseModel
from id3_ds.delta.format import CONFIG_FILE
from id3_ds.delta.lora import fold_lora, split_lora_name
from id3_ds.errors import ID3Error
from tests.launcher import ok, train, weights
from tests.test_delta_common import LLAMA, rewrite, tiny_llama, tokens
from tests.test_delta_common import train as train_id3

peft = pytest.importorskip("peft")

RANK, ALPHA, BUDGET, STEPS = 4, 8.0, 400, 8
Q0 = "model.layers.0.self_attn.q_proj.weight"
A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"


def _logits(model, seed: int = 5) -> torch.Tensor:
    x = tokens(1, seed)[0]
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny Llama base on disk, ID3 over its LoRA in plain torch, the checkpoint and its delta."""
    from id3_ds.checkpoint.saving import _save_lora
    from id3_ds.models import wrap_lora
    from tests.test_delta_common import write_checkpoint

    tmp = tmp_path_factory.mktemp("lora-delta")
    model = tiny_llama()
    model.save_pretrained(tmp / "base", max_shard_size="100KB")
    torch.manual_seed(1)
    lora = wrap_lora(model, RANK, ALPHA, 0.0, None, classification=False)
    init = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    id3 = train_id3(lora, BUDGET, STEPS)
    ckpt = write_checkpoint(tmp / "run", id3)
    _save_lora(lora, ckpt, rank=0)
    export_delta(ckpt, tmp / "base", tmp / "delta")
    return tmp, lora, init, ckpt


def _adapter(lora) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lora.named_parameters() if split_lora_name(n)}


def _check_delta_against_run(delta, state, budget: int, init=None) -> None:
    """Only B-budget entries: B's chosen ones exactly, A's chosen ones, A's init; modules without B omitted."""
    assert not delta.params and delta.lora is not None and delta.lora.rank == RANK and delta.lora.alpha == ALPHA
    kept = 0
    for name, pm in state.params.items():
        weight, which = split_lora_name(name)
        m = delta.lora.modules.get(weight)
        b_chosen = state.params.get(name.replace("lora_A", "lora_B"), pm).indices.numel()
        if m is None:
            assert which == "A" or pm.indices.numel() == 0
            assert which == "B" or b_chosen == 0
            continue
        p = m.a if which == "A" else m.b
        stored = torch.arange(p.numel) if p.dense else p.indices.long()  # dense: every entry chosen
        assert torch.equal(stored, pm.indices), name
        kept += pm.indices.numel()
        if which == "A" and init is not None:
            assert torch.equal(m.a_init, init[name])
    assert kept == delta.total_entries and 0 < kept <= budget and len(state) == budget
    assert any(m.a.entries for m in delta.lora.modules.values()) and all(
        m.b.entries for m in delta.lora.modules.values()
    )


def test_export_stores_a_init_and_the_chosen_entries_only(case) -> None:
    tmp, _, init, ckpt = case
    state, _ = read_id3_state(ckpt)
    delta = load_delta(tmp / "delta", BaseModel.open(tmp / "base"))
    _check_delta_against_run(delta, state, BUDGET, init)
    for m in delta.lora.modules.values():
        assert not bool(m.b.values.eq(0).all())
    cfg = json.loads((tmp / "delta" / CONFIG_FILE).read_text())
    assert cfg["lora"]["modules"][Q0] == {"A": A0, "B": B0} and cfg["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert set(cfg["base"]["fingerprint"]["tensors"]) == set(delta.lora.modules) and Q0 in delta.lora.modules


def test_merge_reproduces_the_trained_peft_model(case) -> None:
    from transformers import AutoModelForCausalLM

    tmp, lora, _, _ = case
    out = tmp / "merged"
    r = merge(tmp / "base", tmp / "delta", out, overwrite=True)
    assert r.tensors_patched == len(load_delta(tmp / "delta").lora.modules)
    # the weights equal fold_lora of the trained dense adapter bit for bit: A and B are rebuilt exactly
    want = fold_lora(weights(tmp / "base"), _adapter(lora), ALPHA, RANK)
    got = weights(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    lora.eval()
    torch.testing.assert_close(_logits(merged), _logits(lora), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(tiny_llama()), _logits(lora), atol=1e-3)  # it did train


def test_apply_and_remove_on_a_loaded_base(case) -> None:
    tmp, lora, _, _ = case
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_delta(model, tmp / "delta")
    lora.eval()
    torch.testing.assert_close(_logits(model), _logits(lora), atol=1e-5, rtol=1e-5)
    remove_delta(model, tmp / "delta")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit for bit, although the fold rounds every entry it changes


def test_inspect_shows_the_lora_settings(case) -> None:
    tmp = case[0]
    r = CliRunner()
    s = json.loads(r.invoke(app, ["inspect", str(tmp / "delta"), "--json"]).output)
    assert s["lora"]["rank"] == RANK and s["lora"]["alpha"] == ALPHA and s["lora"]["scale"] == ALPHA / RANK
    assert s["lora"]["init_entries"] == sum(RANK * LLAMA["hidden_size"] for _ in s["lora"]["modules"])
    assert s["params"][B0]["storage"] == "lora B"
    text = r.invoke(app, ["inspect", str(tmp / "delta")]).output
    assert "lora       rank=4 alpha=8.0 (scale 2)" in text


def _broken(case, tmp_path, tensors=None, config=None):
    d = tmp_path / "delta"
    shutil.copytree(case[0] / "delta", d)
    rewrite(d, tensors, config)
    return d


def _one_line_failure(case, d, match: str, tmp_path) -> None:
    base = case[0] / "base"
    with pytest.raises(ID3Error, match=match) as e:
        load_delta(d, BaseModel.open(base))
    assert "\n" not in str(e.value)
    res = CliRunner().invoke(app, ["merge", str(base), str(d), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 2 and res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def _set(path: list, value):
    def edit(c: dict) -> None:
        for k in path[:-1]:
            c = c[k]
        if value is None:
            del c[path[-1]]
        else:
            c[path[-1]] = value

    return edit


def _no_lora_section(c: dict) -> None:
    c["total_entries"] -= sum(e["entries"] for e in c["lora"]["params"].values())
    del c["lora"]


def _breakage(kind: str, w: str, a: str, b: str):
    """(tensors edit, config edit, expected message) for one way to break module w's LoRA part."""
    return {
        "a-shape-vs-base": (None, _set(["lora", "params", a, "shape"], [RANK, 63]), r"B @ A has shape \[\d+, 63\]"),
        "a-init-shape": (lambda t: t.update({f"{a}.init": t[f"{a}.init"][:, :-1].clone()}), None, "init.*wrong shape"),
        "rank": (None, _set(["lora", "rank"], 8), "do not have rank 8"),
        "missing-b": (None, _set(["lora", "modules", w, "B"], None), "lacks its B matrix"),
        "missing-a-init": (lambda t: t.pop(f"{a}.init"), None, f"lacks tensor '{a}.init'"),
        "alpha": (None, _set(["lora", "alpha"], -1), "lora.alpha"),
        "no-lora-config": (None, _no_lora_section, "'lora' section .* is missing"),
        "nan-init": (lambda t: t[f"{a}.init"].view(-1).__setitem__(0, float("nan")), None, "init has NaN"),
        "inf-b": (
            lambda t: t[f"{b}.values" if f"{b}.values" in t else f"{b}.dense"].view(-1).__setitem__(0, float("inf")),
            None,
            "NaN or infinite",
        ),
    }[kind]


@pytest.mark.parametrize(
    "kind",
    [
        "a-shape-vs-base",
        "a-init-shape",
        "rank",
        "missing-b",
        "missing-a-init",
        "alpha",
        "no-lora-config",
        "nan-init",
        "inf-b",
    ],
)
def test_broken_lora_delta_fails_with_one_line(case, tmp_path, kind) -> None:
    w = sorted(load_delta(case[0] / "delta").lora.modules)[0]
    pair = json.loads((case[0] / "delta" / CONFIG_FILE).read_text())["lora"]["modules"][w]
    tensors, config, match = _breakage(kind, w, pair["A"], pair["B"])
    _one_line_failure(case, _broken(case, tmp_path, tensors, config), match, tmp_path)


def test_wrong_base_is_refused_before_writing(case, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = case[0]
    LlamaForCausalLM(LlamaConfig(**{**LLAMA, "hidden_size": 32})).save_pretrained(tmp_path / "small")
    with pytest.raises(ID3Error, match="LoRA B @ A has shape .* another model"):
        merge(tmp_path / "small", tmp / "delta", tmp_path / "m")
    other = tiny_llama(seed=7)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ID3Error, match="differs from the one the delta was exported against"):
        merge(tmp_path / "other", tmp / "delta", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(ID3Error, match="fingerprint"):
        apply_delta(other, tmp / "delta")


def test_checkpoint_without_the_lora_file_is_refused(case, tmp_path) -> None:
    tmp, _, _, ckpt = case
    copy = tmp_path / ckpt.name
    shutil.copytree(ckpt, copy)
    (copy / "id3" / LORA_FILE).unlink()
    with pytest.raises(ID3Error, match=f"no id3/{LORA_FILE}"):
        export_delta(copy, tmp / "base", tmp_path / "d")
    assert not (tmp_path / "d").exists()


# -- the trainer: ZeRO-3, 2 ranks -------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_run_exports_a_lora_delta_that_merges_to_the_trained_model(tmp_path, env, base_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = [
        "lora.rank=4",
        "lora.alpha=8",
        "id3.budget=300",
        "train.steps=4",
        "train.grad_accum=1",
        "train.micro_batch_size=2",
        "train.log_steps=1",
        "train.export_delta=true",
        "train.save_final_model=true",
        "model.dtype=fp32",
        "deepspeed.zero_optimization.stage=3",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    ok(train(args, env=env))
    run = tmp_path / "run"
    state, _ = read_id3_state(checkpoint_dir(run, 4))
    delta = load_delta(run / "delta", BaseModel.open(base_dir))
    _check_delta_against_run(delta, state, 300)
    merge(base_dir, run / "delta", tmp_path / "merged")
    adapter = weights(run / "final_model")
    cfg = json.loads((run / "final_model" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (RANK, ALPHA)
    want = fold_lora(weights(base_dir), adapter, ALPHA, RANK)
    got = weights(tmp_path / "merged")
    assert all(torch.equal(got[k], want[k]) for k in want)  # A init and A/B entries rebuilt exactly
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    trained = peft.PeftModel.from_pretrained(base, run / "final_model").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    x = tok(["Give three tips for staying healthy.", "What is 2 + 2?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, trained(**x).logits, atol=1e-5, rtol=1e-5)


def test_lora_runs_may_export_and_lora_classification_runs_are_refused_in_one_line() -> None:
    from id3_ds.config import config_from_dict

    raw = {"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"path": "x.jsonl"}}
    train_cfg = {"steps": 1, "export_delta": True}
    assert config_from_dict({**raw, "train": train_cfg, "lora": {"rank": 4}}).train.export_delta
    data = {"path": "x.jsonl", "format": "classification"}
    with pytest.raises(ID3Error, match="fresh classification head") as e:
        config_from_dict({**raw, "data": data, "train": train_cfg, "lora": {"rank": 4}})
    assert "\n" not in str(e.value)
    # without LoRA the fresh head is exported whole (tests/test_classification_delta.py)
    assert config_from_dict({**raw, "data": data, "train": train_cfg}).train.export_delta

"""Several deltas of one base: merge and apply_delta combine them by sum, per-entry mean or TIES sign
election, report the entries they share, and refuse deltas of different bases."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from id3_ds.cli import app
from id3_ds.delta import apply_delta, export_delta, load_delta, merge, remove_delta
from tests.test_delta_common import rewrite, two_deltas


def _weights(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _dense(delta_dir) -> dict[str, torch.Tensor]:
    """Each touched tensor's update as a dense fp64 tensor, and where it is set (a second, simple reading)."""
    d = load_delta(delta_dir)
    out = {}
    for name, p in d.params.items():
        full = torch.zeros(p.numel, dtype=torch.float64)
        mask = torch.zeros(p.numel, dtype=torch.bool)
        idx, vals = p.flat()
        idx = torch.arange(p.numel) if idx is None else idx
        full[idx], mask[idx] = vals, True
        out[name] = (full, mask)
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compose")
    c, d1, d2 = two_deltas(tmp)
    neg = tmp / "d2neg"  # d2 with every update negated: every shared entry has a sign conflict with d1
    shutil.copytree(d2, neg)

    def flip(t):
        for k in t:
            if k.endswith((".values", ".dense", ".fix")):
                t[k] = -t[k]

    rewrite(neg, tensors=flip)
    return c, d1, d2, neg


def _expected(base, a, b, rule) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in base.items():
        w64 = w.to(torch.float64).reshape(-1)
        (va, ma), (vb, mb) = a.get(name, (None, None)), b.get(name, (None, None))
        if va is None and vb is None:
            out[name] = w
            continue
        va = va if va is not None else torch.zeros_like(w64)
        vb = vb if vb is not None else torch.zeros_like(w64)
        ma = ma if ma is not None else torch.zeros_like(w64, dtype=torch.bool)
        mb = mb if mb is not None else torch.zeros_like(w64, dtype=torch.bool)
        both = ma & mb
        upd = va + vb  # sum; single-owner entries are the same under every rule
        if rule == "mean":
            upd = torch.where(both, (va + vb) / 2, upd)
        elif rule == "ties":
            s = torch.sign(va + vb)
            agree_a, agree_b = torch.sign(va) == s, torch.sign(vb) == s
            n = agree_a.double() + agree_b.double()
            t = (torch.where(agree_a, va, 0.0) + torch.where(agree_b, vb, 0.0)) / n.clamp(min=1)
            upd = torch.where(both, t, upd)
        out[name] = (w64 + upd).to(w.dtype).reshape(w.shape)
    return out


@pytest.mark.parametrize("rule", ["sum", "mean", "ties"])
def test_merge_combines_two_real_deltas(two, tmp_path, rule) -> None:
    c, d1, d2, neg = two
    second = neg if rule == "ties" else d2  # ties matters where signs disagree
    r = merge(c.base, [d1, second], tmp_path / "m", combine=rule)
    a, b = _dense(d1), _dense(second)
    shared = sum(int((a[n][1] & b[n][1]).sum()) for n in a.keys() & b.keys())
    assert shared > 50 and r.overlap["entries"] == shared and r.overlap["pairs"] == {"0-1": shared}
    assert r.overlap["union"] == r.overlap["inputs_total"] - shared
    want, got = _expected(_weights(c.base), a, b, rule), _weights(tmp_path / "m")
    for name in want:
        assert torch.equal(got[name], want[name]), (rule, name)


def test_apply_several_equals_merge_and_removes_exactly(two, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    c, d1, d2, _ = two
    merge(c.base, [d1, d2], tmp_path / "m", combine="mean")
    model = AutoModelForCausalLM.from_pretrained(c.base, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    combined = apply_delta(model, [d1, d2], combine="mean")
    assert combined.config["overlap"]["entries"] > 0 and "tensor(" not in repr(combined)
    merged = _weights(tmp_path / "m")
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items() if k in merged)
    remove_delta(model, [d1, d2], combine="mean")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cli_reports_overlap_and_refuses_other_bases(two, tmp_path) -> None:
    c, d1, d2, _ = two
    r = CliRunner().invoke(app, ["merge", str(c.base), str(d1), str(d2), "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert "combined 2 deltas by sum" in r.output and "chosen by more than one" in r.output
    from transformers import AutoModelForCausalLM

    moved = tmp_path / "moved_base"  # the same architecture with other weights: another base
    m = AutoModelForCausalLM.from_pretrained(c.base, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)
    m.save_pretrained(moved)
    export_delta(c.run, moved, tmp_path / "d3", force=True)  # fingerprinted against the moved base
    r = CliRunner().invoke(app, ["merge", str(c.base), str(d1), str(tmp_path / "d3"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "different bases" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(
        app, ["merge", str(c.base), str(d1), str(d2), "--out", str(tmp_path / "y"), "--combine", "max"]
    )
    assert r.exit_code == 2 and "not a combine rule" in r.output

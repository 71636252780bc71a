"""Truncatable deltas: `export-delta --entries K|fraction|N%` keeps the K earliest-chosen entries with their
trained values; ID3's mask only grows, so these are the run's mask at an earlier budget."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from id3_ds.checkpoint import read_id3_state
from id3_ds.cli import app
from id3_ds.delta import export_delta, load_delta, merge
from tests.test_delta_common import make_case


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trunc")
    c = make_case(tmp, budget=1000, steps=8, full=())
    export_delta(c.run, c.base, tmp / "full")
    return c, tmp


def _entries(delta) -> dict[tuple[str, int], float]:
    out = {}
    for name, p in load_delta(delta).params.items():
        idx, vals = p.flat()
        idx = torch.arange(p.numel) if idx is None else idx
        out.update({(name, int(i)): float(v) for i, v in zip(idx, vals, strict=True)})
    return out


@pytest.mark.parametrize("arg,kept", [("25%", 250), ("0.5", 500), ("750", 750), ("1.0", 1000)])
def test_cut_keeps_the_earliest_chosen_with_trained_values(case, arg, kept) -> None:
    c, tmp = case
    out = tmp / f"cut_{arg}"
    r = CliRunner().invoke(
        app, ["export-delta", str(c.run), "--base", str(c.base), "--out", str(out), "--entries", arg]
    )
    assert r.exit_code == 0, r.output
    assert f"{kept:,} entries" in r.output
    full, cut = _entries(tmp / "full"), _entries(out)
    assert len(cut) == kept and all(full[k] == v for k, v in cut.items())  # the full run's trained values
    state, _ = read_id3_state(c.ckpt)
    step = {
        (n, int(i)): int(s) for n, pm in state.params.items() for i, s in zip(pm.indices, pm.chosen_at, strict=True)
    }
    kept_steps = [step[k] for k in cut]
    dropped = [step[k] for k in full if k not in cut]
    assert not dropped or max(kept_steps) <= min(dropped)  # nothing chosen later is kept before it
    cfg = load_delta(out).config
    assert cfg["id3"]["export"]["truncated"] == {"kept": kept, "of": 1000, "last_step": max(kept_steps)}
    # 1000 over 8 steps is 125 a step: a quarter ends exactly after step 1 (0-based)
    if arg == "25%":
        assert sorted(set(kept_steps)) == [0, 1]


@pytest.mark.parametrize("arg,msg", [("0", "at least one"), ("1.5", "fraction must be in"), ("lots", "not a number")])
def test_bad_cut_is_one_line(case, arg, msg) -> None:
    c, tmp = case
    r = CliRunner().invoke(
        app, ["export-delta", str(c.run), "--base", str(c.base), "--out", str(tmp / "x"), "--entries", arg]
    )
    assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp / "x").exists()


def test_cutting_a_delta_file_equals_cutting_at_export(case, tmp_path) -> None:
    c, tmp = case
    r = CliRunner().invoke(
        app, ["export-delta", str(c.run), "--base", str(c.base), "--out", str(tmp_path / "steps"), "--keep-steps"]
    )
    assert r.exit_code == 0, r.output
    d = load_delta(tmp_path / "steps")
    assert d.config["version"] == 3 and all(p.steps is not None for p in d.params.values())
    state, _ = read_id3_state(c.ckpt)
    for name, p in d.params.items():  # the recorded steps are the checkpoint's chosen_at
        assert torch.equal(p.steps, state.params[name].chosen_at.to(torch.int32))
    for arg in ("25%", "333"):
        r = CliRunner().invoke(app, ["cut", str(tmp_path / "steps"), "--entries", arg, "--out", str(tmp_path / arg)])
        assert r.exit_code == 0, r.output
        want = tmp_path / f"export_{arg}"
        export_delta(c.run, c.base, want, entries=0.25 if arg == "25%" else 333)
        assert _entries(tmp_path / arg) == _entries(want)
        merge(c.base, tmp_path / arg, tmp_path / f"m_{arg}")
        merge(c.base, want, tmp_path / f"mw_{arg}")
        for f in (tmp_path / f"mw_{arg}").glob("*.safetensors"):
            assert f.read_bytes() == (tmp_path / f"m_{arg}" / f.name).read_bytes()
    r = CliRunner().invoke(app, ["cut", str(tmp / "full"), "--entries", "10%", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--keep-steps" in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--index", "packed"], "not an index form"),
        (["--format", "onnx"], "--format 'onnx'"),
        (["--format", "peft", "--peft-embeddings", "drop"], "--peft-embeddings 'drop'"),
    ],
)
def test_bad_export_options_are_one_line_before_any_work(case, tmp_path, args, msg) -> None:
    c, _ = case
    r = CliRunner().invoke(
        app, ["export-delta", str(c.run), "--base", str(c.base), "--out", str(tmp_path / "x"), *args]
    )
    assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()

"""`id3-ds plot`: the PNGs a user gets from a run directory, and the one-line notes when parts are missing."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from id3_ds.algorithm.mask import MaskState, ParamMask
from id3_ds.checkpoint import checkpoint_dir, mark_complete, write_id3_shard
from id3_ds.cli import app
from id3_ds.delta.summary import label_order, module_labels
from id3_ds.report.plot import BUDGET_PNG, DPI, PANEL_IN, TRAINING_PNG, budget_table, heatmap_size, read_log

pytest.importorskip("matplotlib")

# A two-layer Llama's tensors: name -> (shape, chosen entries)
TENSORS = {
    "model.embed_tokens.weight": ((32, 8), 5),
    **{
        f"model.layers.{i}.{m}.weight": (shape, n)
        for i in range(2)
        for m, shape, n in [
            ("self_attn.q_proj", (8, 8), 3 + i),
            ("self_attn.v_proj", (8, 8), 0),
            ("mlp.down_proj", (8, 16), 7),
            ("input_layernorm", (8,), 1),
        ]
    },
    "model.norm.weight": ((8,), 0),
    "lm_head.weight": ((32, 8), 9),
}


def _mask() -> MaskState:
    params = {}
    for name, (shape, n) in TENSORS.items():
        idx = torch.arange(n, dtype=torch.int64) * 2
        params[name] = ParamMask(shape, idx, torch.zeros(n, dtype=torch.int64), torch.zeros(n), torch.ones(n))
    return MaskState(params)


def _checkpoint(run: Path, step: int = 40, mask: bool = True) -> Path:
    """A complete checkpoint laid out by the checkpoint module's own writers (two ranks' shards)."""
    ckpt = checkpoint_dir(run, step)
    if mask:
        state = _mask()
        halves = [{n: p for j, (n, p) in enumerate(state.params.items()) if j % 2 == r} for r in range(2)]
        for r, params in enumerate(halves):
            write_id3_shard(ckpt, r, 2, MaskState(params), {"step": step, "world_size": 2})
    else:
        ckpt.mkdir(parents=True)
    mark_complete(ckpt, {"step": step})
    return ckpt


def _log(run: Path, method: str = "id3", classification: bool = True) -> None:
    recs: list[dict] = [{"event": "start", "method": method, "step": 0, "steps": 40, "budget": 100}]
    for s in (10, 20, 30, 40):
        r = {"step": s, "loss": 3.0 - s / 20, "lr": 1e-3}
        if method == "id3":
            r.update(chosen=s * 2.5, budget=100)
        recs.append(r)
        ev = {"step": s, "eval_loss": 3.1 - s / 20}
        if classification:
            ev.update(eval_accuracy=0.5 + s / 100, eval_f1=0.4 + s / 100)
        recs.append(ev)
    recs.append({"event": "done", "step": 40})
    run.mkdir(parents=True, exist_ok=True)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature: a valid PNG or a failure."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _plot(*args: str):
    return CliRunner().invoke(app, ["plot", *args])


def test_plot_run_writes_curves_and_heatmap(tmp_path):
    run = tmp_path / "run"
    _log(run)
    _checkpoint(run, 20)
    _checkpoint(run, 40)
    checkpoint_dir(run, 60).mkdir()  # incomplete: ignored

    res = _plot(str(run))

    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [f"wrote {run / 'plots' / TRAINING_PNG}", f"wrote {run / 'plots' / BUDGET_PNG}"]
    # loss, eval accuracy/F1, budget used: three panels side by side
    assert _png_size(run / "plots" / TRAINING_PNG) == (3 * PANEL_IN[0] * DPI, PANEL_IN[1] * DPI)
    table = budget_table({n: (e, 0) for n, (_, e) in TENSORS.items()})
    w, h = heatmap_size(table)
    assert _png_size(run / "plots" / BUDGET_PNG) == (round(w * DPI), round(h * DPI))
    assert not list((run / "plots").glob(".*"))  # no temp file left behind


def test_budget_table_sums_layers_and_modules():
    table = budget_table({n: (e, torch.Size(s).numel()) for n, (s, e) in TENSORS.items()})
    assert table.rows == ["layer 0", "layer 1", "outside layers"]
    assert table.cols == ["embed", "q_proj", "v_proj", "down_proj", "norm", "head"]
    assert table.entries[1] == [None, 4, 0, 7, 1, None]
    assert table.entries[2] == [5, None, None, None, 0, 9]
    assert table.numel[0][table.cols.index("down_proj")] == 128
    assert table.total == sum(e for _, e in TENSORS.values())


def test_module_labels_across_model_families():
    gpt2 = ["h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.bias"]
    assert list(module_labels(gpt2 + ["h.0.ln_1.weight", "wte.weight"]).values()) == [
        "c_attn",
        "attn.c_proj",
        "c_fc",
        "mlp.c_proj",
        "norm",
        "embed",
    ]
    bert = "bert.encoder.layer.0."
    labels = module_labels(
        [bert + "attention.self.query.weight", bert + "attention.output.dense.weight", bert + "output.dense.weight"]
        + [bert + "output.LayerNorm.bias", "classifier.weight"]
    )
    assert list(labels.values()) == ["query", "attention.output.dense", "output.dense", "norm", "head"]
    lora = "base_model.model.model.layers.3.self_attn.v_proj.lora_A.default.weight"
    assert module_labels([lora]) == {lora: "v_proj.lora_A"}
    assert label_order(["head", "down_proj", "norm", "q_proj", "embed", "k_proj"]) == [
        "embed",
        "q_proj",
        "k_proj",
        "down_proj",
        "norm",
        "head",
    ]


def test_read_log_keeps_the_last_record_of_a_step_and_skips_a_torn_line(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [
        {"event": "start", "method": "id3", "step": 0},
        {"step": 10, "loss": 2.0},
        {"event": "start", "method": "id3", "step": 10},  # resumed from step 10
        {"step": 10, "loss": 1.5},
        {"step": 20, "eval_loss": 1.0},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 30, "lo')
    parsed = read_log(log)
    assert [r["loss"] for r in parsed.train] == [1.5]
    assert [r["step"] for r in parsed.evals] == [20]
    assert parsed.start["step"] == 10 and parsed.unreadable == 1


def test_plot_without_log_draws_the_heatmap_and_says_why_no_curves(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run)

    res = _plot(str(run), "--out", str(tmp_path / "pics"))

    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [
        f"note: {run} has no log.jsonl: no training curves (is it a run's train.output_dir?)",
        f"wrote {tmp_path / 'pics' / BUDGET_PNG}",
    ]
    _png_size(tmp_path / "pics" / BUDGET_PNG)


def test_plot_full_fine_tuning_run_has_no_budget_but_curves(tmp_path):
    run = tmp_path / "run"
    _log(run, method="full", classification=False)
    _checkpoint(run, mask=False)

    res = _plot(str(run))

    assert res.exit_code == 0, res.output
    out = res.output.splitlines()
    assert out[0] == "note: checkpoint-00000040 has no ID3 mask (method full: every weight trains): no budget heatmap"
    assert out[1] == "note: no ID3 budget curve (method full)"
    assert out[2:] == [f"wrote {run / 'plots' / TRAINING_PNG}"]
    assert _png_size(run / "plots" / TRAINING_PNG) == (PANEL_IN[0] * DPI, PANEL_IN[1] * DPI)  # loss only


def test_plot_of_a_checkpoint_dir_uses_that_checkpoint_and_the_run_log(tmp_path):
    run = tmp_path / "run"
    _log(run)
    ckpt = _checkpoint(run, 20)

    res = _plot(str(ckpt))

    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (run / "plots").iterdir()) == [BUDGET_PNG, TRAINING_PNG]


def test_plot_of_a_delta_draws_the_heatmap(tmp_path):
    from id3_ds.delta.export import export_delta
    from tests.test_delta_common import make_case

    case = make_case(tmp_path, budget=300, steps=4)
    delta = export_delta(case.ckpt, case.base, tmp_path / "delta")

    res = _plot(str(delta))

    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == f"wrote {tmp_path / 'delta-plots' / BUDGET_PNG}"
    _png_size(tmp_path / "delta-plots" / BUDGET_PNG)


def test_plot_of_an_empty_dir_is_one_error_line(tmp_path):
    res = _plot(str(tmp_path))
    assert res.exit_code == 2
    assert res.output.startswith(f"error: nothing to plot in {tmp_path}: ") and res.output.count("\n") == 1
    assert "no log.jsonl" in res.output and "no complete checkpoint nor delta" in res.output


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    _log(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed

    res = _plot(str(tmp_path))

    assert res.exit_code == 2
    assert res.output == 'error: plotting needs matplotlib: pip install "id3-ds[plot]"\n'

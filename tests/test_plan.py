"""The run plan (id3_ds/plan.py): what each mode runs, decided once from the config, and every cross-mode
refusal as one line, found before anything starts; `id3-ds train` runs the same recipe as launch/train.py."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from id3_ds.cli import app
from id3_ds.config import config_from_dict, load_config
from id3_ds.errors import ID3Error
from id3_ds.plan import RunPlan, plan_of
from id3_ds.recipe.preflight import preflight
from id3_ds.update import CheckpointParts, DeepSpeedID3, DenseUpdate, SparseDeepSpeedID3, Update

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "configs" / "tiny_cpu.json")
RAW = {"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"path": "x.jsonl"}, "train": {"steps": 4}}


def _plan(*overrides: str, tmp_path: Path) -> RunPlan:
    cfg = load_config(TINY_CONFIG, [f"train.output_dir={tmp_path / 'out'}", *overrides])
    preflight(cfg)
    return cfg.plan


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ([], {"masked": True, "sparse_state": False, "quantized_base": False, "engine_optimizer": True}),
        (["method=fish"], {"masked": True, "fisher_pass": True, "has_delta": True}),
        (
            ["method=full", "train.export_delta=false"],
            {"masked": False, "sparse_state": False, "has_delta": False, "lora": False},
        ),
        (["method=lora", "lora.rank=4", "train.export_delta=false"], {"masked": False, "lora": True, "qlora": False}),
        (
            ["id3.state=sparse", "deepspeed.zero_optimization.stage=2"],
            {"sparse_state": True, "zero_stage": 0, "engine_optimizer": False, "client_optimizer": None},
        ),
        (
            ["id3.state=sparse", "model.quantization=nf4", "deepspeed.zero_optimization.stage=2"],
            {"quantized_base": True, "strict_load": False, "qlora": False},
        ),
        (
            ["method=lora", "lora.rank=4", "model.quantization=nf4", "train.export_delta=false"],
            {"qlora": True, "quantized_base": False, "masked": False},
        ),
        (["train.optimizer=adamw_8bit"], {"client_optimizer": "adamw_8bit", "zero_stage": 2}),
        (["id3.state=sparse", "method=full", "train.export_delta=false"], None),  # refused: dense method
    ],
)
def test_the_plan_names_the_mode_once(overrides, expected, tmp_path) -> None:
    if expected is None:
        with pytest.raises(ID3Error):
            _plan(*overrides, tmp_path=tmp_path)
        return
    plan = _plan(*overrides, tmp_path=tmp_path)
    assert {k: getattr(plan, k) for k in expected} == expected
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.masked = not plan.masked  # decided once: nothing downstream changes it


def test_an_id3_state_of_sparse_with_a_dense_method_is_no_sparse_state_plan() -> None:
    """id3.state names the masked update's state: a dense method's plan has none (preflight refuses the pair)."""
    cfg = config_from_dict({**RAW, "method": "full", "id3": {"state": "sparse"}})
    assert not plan_of(cfg).sparse_state and not plan_of(cfg).masked


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"method": "lora"}, "method 'lora' needs lora.rank > 0 (e.g. lora.rank=8)"),
        ({"method": "full", "lora": {"rank": 4}}, "method 'full' trains every weight and ignores LoRA"),
        (
            {"method": "lora", "lora": {"rank": 4}, "train": {"steps": 4, "export_delta": True}},
            "train.export_delta: method 'lora' trains densely, so there is no sparse delta to export",
        ),
        (
            {
                "lora": {"rank": 4},
                "data": {"path": "x.jsonl", "format": "classification"},
                "train": {"steps": 4, "export_delta": True},
            },
            "train.export_delta: this run trains a fresh classification head",
        ),
        ({"id3": {"budget": 0}}, "id3.budget=0: give a count of entries >= 1"),
        ({"id3": {"budget": -3}}, "id3.budget=-3: give a count of entries >= 1"),
    ],
)
def test_what_the_config_alone_contradicts_is_refused_at_load_in_one_line(raw, message) -> None:
    with pytest.raises(ID3Error) as e:
        config_from_dict({**RAW, **raw})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["id3.state=sparse", "method=fish"], "id3.state=sparse does not support method 'fish'"),
        (["id3.state=sparse", "train.optimizer=torch_adamw"], "train.optimizer=torch_adamw does not apply"),
        (["id3.state=sparse", "lora.rank=4"], "id3.state=sparse does not support ID3 over LoRA"),
        (["model.quantization=int8"], "model.quantization=int8 needs id3.state=sparse"),
        (
            ["id3.state=sparse", "model.quantization=nf4", "deepspeed.zero_optimization.stage=3"],
            "model.quantization=nf4 does not work with ZeRO stage 3",
        ),
        (
            ["train.optimizer=adamw_8bit", 'deepspeed.zero_optimization.offload_optimizer={"device": "nvme"}'],
            "train.optimizer=adamw_8bit cannot be swapped to NVMe",
        ),
        (["deepspeed.zero_optimization.round_robin_gradients=true"], "round_robin_gradients=true is not supported"),
        (["deepspeed.fp16.enabled=true"], "fp16 training is not supported"),
    ],
)
def test_what_the_modes_cannot_run_with_is_refused_before_anything_starts(overrides, message, tmp_path) -> None:
    with pytest.raises(ID3Error) as e:
        _plan(*overrides, tmp_path=tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_each_update_says_what_its_checkpoint_holds_and_implements_the_contract() -> None:
    """Saving and resuming read `parts`, never which update runs."""
    assert DenseUpdate.parts == CheckpointParts(engine=True, mask=False, trainer=False)
    assert DeepSpeedID3.parts == CheckpointParts(engine=True, mask=True, trainer=False)
    assert SparseDeepSpeedID3.parts == CheckpointParts(engine=False, mask=True, trainer=True)
    for cls in (DenseUpdate, DeepSpeedID3, SparseDeepSpeedID3):
        missing = [
            m
            for m in ("forward", "backward", "step", "progress", "state_dict", "load_state_dict")
            if not callable(getattr(cls, m, None))
        ]
        assert not missing, (cls.__name__, missing)
    assert Update.__module__ == "id3_ds.update.contract"


def test_no_module_asks_which_update_runs() -> None:
    """The checkpoints and the recipe never look for an update's kind by attribute."""
    for f in [
        *(ROOT / "id3_ds" / "checkpoint").glob("*.py"),
        ROOT / "id3_ds" / "recipe" / "train.py",
        ROOT / "launch" / "train.py",
    ]:
        text = f.read_text()
        assert (
            'getattr(update, "sparse"' not in text and "update.masked" not in text and "isinstance(update" not in text
        ), f


def test_id3_ds_train_refuses_a_bad_config_in_one_line_with_exit_code_2(tmp_path) -> None:
    res = CliRunner().invoke(app, ["train", "--config", TINY_CONFIG, "id3.budget=0", f"train.output_dir={tmp_path}/o"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: id3.budget=0: give a count of entries >= 1") and res.output.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_id3_ds_train_runs_the_recipe_in_one_process(tmp_path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ID3_DS_FORK_RANKS": "0"}
    cmd = [sys.executable, "-m", "id3_ds.cli", "train", "--config", TINY_CONFIG, "train.steps=2"]
    proc = subprocess.run(
        [*cmd, f"train.output_dir={out}", "train.progress_bar=false"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoint-00000002" / "COMPLETE").is_file() and (out / "delta").is_dir()
    assert proc.stdout.strip().splitlines()[-1].startswith(f"done: results in {out}")

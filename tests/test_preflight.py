"""Fail fast for real: what the config and its files can tell is refused before any process group, model
load or folder exists, with one `error:` line, once, whatever the number of ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from id3_ds.config import load_config
from id3_ds.errors import ID3Error
from id3_ds.recipe import preflight as pf
from tests.launcher import ROOT, TINY_CONFIG, TRAIN, train


def _check(tmp_path: Path, *overrides: str) -> list[str]:
    return pf.preflight(load_config(TINY_CONFIG, [f"train.output_dir={tmp_path / 'out'}", *overrides]))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty model cache: a check that materialised builtin:tiny-llama would fill it."""
    monkeypatch.setenv("ID3_DS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_good_config_passes_and_creates_nothing(tmp_path, cache) -> None:
    assert _check(tmp_path, "train.resume=auto") == []
    assert not (tmp_path / "out").exists() and not cache.exists()


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "id3.budget=-5",
            "id3.budget=-5: give a count of entries >= 1 (e.g. id3.budget=100000) or a fraction in (0, 1)",
        ),
        ("id3.budget=0", "id3.budget=0: give a count of entries >= 1"),
        ("deepspeed.zero_optimization.stage=7", "deepspeed.zero_optimization.stage must be 0, 1, 2 or 3, got 7"),
        ("deepspeed.zero_optimization.stage=true", "deepspeed.zero_optimization.stage must be 0, 1, 2 or 3, got True"),
        ("deepspeed.zero_optimization=3", "deepspeed.zero_optimization must be a JSON object, got 3"),
        ("deepspeed.fp16=true", "deepspeed.fp16 must be a JSON object, got True"),
        ("deepspeed.fp16.enabled=true", "fp16 training is not supported"),
        ("deepspeed.train_micro_batch_size_per_gpu=3", "deepspeed.train_micro_batch_size_per_gpu=3 disagrees with"),
        ('deepspeed.optimizer.type="SGD"', "deepspeed.optimizer.type 'SGD' is not supported"),
        ("deepspeed.zero_optimization.round_robin_gradients=true", "deepspeed.zero_optimization.round_robin_gradients"),
        ("model.name_or_path=builtin:huge-llama", "unknown builtin model 'huge-llama' in model.name_or_path"),
        (
            "model.name_or_path=package:no_such_model_pkg",
            "model.name_or_path 'package:no_such_model_pkg' needs the Python",
        ),
        ("train.resume=no/such/checkpoint-00000020", f"train.resume {Path.cwd()}/no/such/checkpoint-00000020 does not"),
    ],
)
def test_a_bad_value_is_refused_before_anything_is_created(override, message, tmp_path, cache) -> None:
    with pytest.raises(ID3Error) as e:
        _check(tmp_path, override)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not cache.exists()


def test_bf16_zero1_with_fp32_accumulation_is_refused_for_masked_methods_only(tmp_path) -> None:
    bf16_optimizer = [
        "model.dtype=bf16",
        "deepspeed.zero_optimization.stage=1",
        'deepspeed.data_types={"grad_accum_dtype": "fp32"}',
    ]
    with pytest.raises(ID3Error, match="BF16_Optimizer"):
        _check(tmp_path, *bf16_optimizer)
    _check(tmp_path, *bf16_optimizer, "method=full", "train.export_delta=false")


def test_missing_data_and_model_paths_are_named(tmp_path) -> None:
    with pytest.raises(ID3Error, match=f"^data.path {tmp_path}/none.jsonl does not exist; set data.path to a JSON"):
        _check(tmp_path, f"data.path={tmp_path}/none.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ID3Error, match=f"^data.eval_path {tmp_path}/empty is a directory without a .json or .jsonl"):
        _check(tmp_path, f"data.eval_path={tmp_path}/empty")
    for model in (tmp_path / "Llama", tmp_path / "Llama-empty"):
        model.with_name("Llama-empty").mkdir(exist_ok=True)  # a folder without config.json
        with pytest.raises(
            ID3Error, match=f"^model.name_or_path '{model}' is not a local Hugging Face model directory"
        ):
            _check(tmp_path, f"model.name_or_path={model}")
    assert not (tmp_path / "out").exists()


def test_a_data_directory_of_json_files_passes(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text((ROOT / "id3_ds" / "resources" / "tiny_alpaca.jsonl").read_text())
    _check(tmp_path, f"data.path={tmp_path}/data")


def test_an_output_dir_that_cannot_be_created_is_refused_without_creating_its_parents(tmp_path, monkeypatch) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ID3Error, match="is not writable: .*a-file is a file, not a directory"):
        _check(tmp_path, f"train.output_dir={tmp_path}/a-file/run")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # as if `locked` were another user's (root passes os.access whatever the mode bits say)
    monkeypatch.setattr(pf.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    with pytest.raises(ID3Error, match=f"not writable by this user \\({locked}, where it would be created, is not"):
        _check(tmp_path, f"train.output_dir={locked}/a/b")
    assert list(locked.iterdir()) == []
    with pytest.raises(ID3Error, match="^data.cache_dir .* is not writable by this user; choose another directory"):
        _check(tmp_path, f"data.cache_dir={locked}")


# -- as the user runs it ------------------------------------------------------------------------------


@pytest.fixture
def no_deepspeed(tmp_path) -> dict:
    """An environment where importing deepspeed or transformers fails: a run that reaches either (the process
    group, the model) before refusing the config ends in a traceback instead of exit code 2."""
    fake = tmp_path / "fake-imports"
    for name in ("deepspeed", "transformers"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise RuntimeError('{name} imported before the config was checked')")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)]), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "override",
    [
        "id3.budget=-5",
        "deepspeed.zero_optimization.stage=7",
        "data.path=no/such/train.jsonl",
        "model.name_or_path=no/such/model",
    ],
)
def test_launch_refuses_a_bad_config_with_one_line_before_any_process_group(override, tmp_path, no_deepspeed) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, TRAIN, "--config", TINY_CONFIG, override, f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=no_deepspeed, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == proc.stderr.splitlines()
    assert len(proc.stderr.splitlines()) == 1 and override.split("=")[0] in proc.stderr
    assert not out.exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_report_a_missing_model_once(tmp_path, env) -> None:
    out = tmp_path / "run"
    proc = train([f"model.name_or_path={tmp_path}/no-model", f"train.output_dir={out}"], nproc=2, env=env)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout[-4000:]
    assert errors[0].startswith(f"error: model.name_or_path '{tmp_path}/no-model' is not a local Hugging Face model")
    assert "collective operation" not in proc.stdout and "stopping because another rank failed" not in proc.stdout
    assert not out.exists()


SPARSE = "id3.state=sparse"
STAGE3 = "deepspeed.zero_optimization.stage=3"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ([STAGE3, 'deepspeed.zero_optimization.offload_optimizer={"device": "cpu"}'], "zero_optimization.offload_op"),
        ([STAGE3, 'deepspeed.zero_optimization.offload_param={"device": "cpu"}'], "zero_optimization.offload_param"),
        ([STAGE3, 'deepspeed.zero_optimization.offload_param={"device": "nvme"}'], "zero_optimization.offload_param"),
        ([STAGE3, "lora.rank=4"], "does not support ID3 over LoRA"),
        ([STAGE3, "method=full", "train.export_delta=false"], "needs a masked method, but method 'full'"),
        (
            [STAGE3, "method=lora", "lora.rank=4", "train.export_delta=false"],
            "needs a masked method, but method 'lora'",
        ),
        ([STAGE3, "method=fish"], "does not support method 'fish'"),
        ([STAGE3, "deepspeed.zero_optimization.zero_hpz_partition_size=2"], "does not support hpZ"),
        ([STAGE3, "deepspeed.zero_optimization.zero_quantized_weights=true"], "zero_quantized_weights"),
        ([STAGE3, "deepspeed.zero_optimization.zero_quantized_nontrainable_weights=true"], "quantized_nontrainable"),
        ([STAGE3, "deepspeed.fp16.enabled=true"], "fp16 training is not supported"),
    ],
)
def test_sparse_state_refuses_what_it_cannot_run_with_one_line(overrides, message, tmp_path, cache) -> None:
    with pytest.raises(ID3Error) as e:
        _check(tmp_path, SPARSE, *overrides)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not cache.exists()


@pytest.mark.parametrize("method", ["id3", "random", "pafi", "bitfit"])
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_sparse_state_runs_without_a_deepspeed_optimizer(method, stage, tmp_path) -> None:
    from id3_ds.integration.ds_config import SPARSE_BUCKET, build_ds_config

    cfg = load_config(
        TINY_CONFIG,
        [
            f"train.output_dir={tmp_path / 'out'}",
            SPARSE,
            f"method={method}",
            f"deepspeed.zero_optimization.stage={stage}",
        ],
    )
    assert len(pf.preflight(cfg)) == (1 if stage == 2 else 0)  # stage 2: the note that it runs as stage 0
    ds, wd = build_ds_config(cfg, 2)
    assert "optimizer" not in ds and wd == cfg.train.weight_decay
    assert ds["zero_optimization"]["reduce_bucket_size"] == SPARSE_BUCKET
    assert ds["zero_optimization"].get("stage3_param_persistence_threshold") == (0 if stage == 3 else None)
    assert ds["zero_optimization"]["stage"] == (3 if stage == 3 else 0)  # stage 1/2: nothing to partition


def test_id3_state_must_be_dense_or_sparse(tmp_path) -> None:
    with pytest.raises(ID3Error, match="id3.state"):
        _check(tmp_path, "id3.state=half")


def test_sparse_state_at_zero_2_says_it_runs_as_stage_0(tmp_path) -> None:
    """The README's main job (ZeRO-2) with id3.state=sparse: not silently stage 0, one note at start-up."""
    from id3_ds.recipe.preflight import sparse_stage_notes

    cfg = load_config(ROOT / "configs" / "minilm_rotten_tomatoes.json", ["id3.state=sparse"])
    assert cfg.deepspeed["zero_optimization"]["stage"] == 2
    (note,) = sparse_stage_notes(cfg)
    assert "runs ZeRO stage 2 as stage 0" in note and "stage=3" in note and "\n" not in note
    stage3 = load_config(
        ROOT / "configs" / "minilm_rotten_tomatoes.json", ["id3.state=sparse", "deepspeed.zero_optimization.stage=3"]
    )
    assert (
        sparse_stage_notes(stage3) == []
        and sparse_stage_notes(load_config(ROOT / "configs" / "minilm_rotten_tomatoes.json")) == []
    )
    notes = pf.preflight(
        load_config(
            TINY_CONFIG, ["id3.state=sparse", "deepspeed.zero_optimization.stage=1", f"train.output_dir={tmp_path}"]
        )
    )
    assert any("runs ZeRO stage 1 as stage 0" in n for n in notes)


def test_tensorboard_without_the_package_is_refused_before_anything_is_written(tmp_path, monkeypatch) -> None:
    """It used to print a line mid-progress-bar and train on without logs (rc 0)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    out = tmp_path / "run"
    cfg = load_config(TINY_CONFIG, ["train.tensorboard=true", f"train.output_dir={out}"])
    with pytest.raises(ID3Error, match=r"^train.tensorboard=true needs the tensorboard package: pip install tensorb"):
        pf.preflight(cfg)
    assert not out.exists()
    pf.preflight(load_config(TINY_CONFIG, [f"train.output_dir={out}"]))  # off: no need for it


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_report_a_malformed_data_line_once_and_leave_no_output_folder(tmp_path, env) -> None:
    data = tmp_path / "train.jsonl"
    good = json.dumps({"instruction": "Say hi.", "output": "hi"})
    data.write_text(f"{good}\n{good}\n{{not json\n{good}\n")
    out = tmp_path / "run"
    args = [f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={out}"]
    proc = train(args, nproc=2, env=env)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and errors == [
        f"error: {data}:3: invalid JSON (Expecting property name enclosed in double quotes)"
    ], proc.stdout[-4000:]
    assert "stopping because another rank failed" not in proc.stdout
    assert "built successfully" not in proc.stdout  # DeepSpeed's op-loaded line, once per rank per start
    assert not out.exists()  # no folder, no config.json of a run that never started

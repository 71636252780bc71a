"""The one path rule of a run config, as a user meets it: a relative path written in the config file is
relative to the file's folder, one given on the command line to the working directory, and
train.output_dir always to the working directory; a path whose other reading exists gets one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from id3_ds.config import load_config
from id3_ds.errors import ID3Error
from id3_ds.recipe.preflight import preflight
from tests.launcher import ROOT

DATA = ROOT / "id3_ds" / "resources" / "tiny_alpaca.jsonl"


def _project(tmp_path: Path, **sections) -> Path:
    """tmp_path/proj/configs/run.json (with `sections` over a minimal run) and tmp_path/proj/data/train.jsonl."""
    proj = tmp_path / "proj"
    (proj / "configs").mkdir(parents=True)
    (proj / "data").mkdir()
    shutil.copy(DATA, proj / "data" / "train.jsonl")
    raw = {
        "model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"path": "../data/train.jsonl"},
        "train": {"steps": 1, "output_dir": "outputs/run"},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    (proj / "configs" / "run.json").write_text(json.dumps(raw))
    return proj


def _model(where: Path) -> Path:
    where.mkdir(parents=True)
    (where / "config.json").write_text("{}")
    return where


def test_config_paths_follow_the_config_file_whatever_the_working_directory(tmp_path, monkeypatch) -> None:
    proj = _project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(proj / "configs" / "run.json")
    assert cfg.data.path == str(proj / "data" / "train.jsonl")
    assert cfg.train.output_dir == "outputs/run"  # the exception: results land where the run is started
    assert preflight(cfg) == []
    assert not (elsewhere / "outputs").exists()  # checked, not created


def test_command_line_paths_follow_the_working_directory(tmp_path, monkeypatch) -> None:
    proj = _project(tmp_path)
    monkeypatch.chdir(proj)
    cfg = load_config("configs/run.json", ["data.path=data/train.jsonl", 'data={"path": "data/train.jsonl"}'])
    assert cfg.data.path == str(proj / "data" / "train.jsonl")
    cfg = load_config("configs/run.json", ["data.eval_path=data/train.jsonl", "data.cache_dir=cache"])
    assert cfg.data.eval_path == str(proj / "data" / "train.jsonl") and cfg.data.cache_dir == str(proj / "cache")


def test_a_model_written_relative_to_the_working_directory_is_refused_naming_both_and_the_fix(
    tmp_path, monkeypatch
) -> None:
    """The report: `./Llama-3.2-1B` in configs/run.json, run from the project folder that holds the model."""
    proj = _project(tmp_path, model={"name_or_path": "./Llama-3.2-1B"})
    _model(proj / "Llama-3.2-1B")
    monkeypatch.chdir(proj)
    cfg = load_config("configs/run.json")
    with pytest.raises(ID3Error) as e:
        preflight(cfg)
    message = str(e.value)
    assert message.startswith(f"model.name_or_path './Llama-3.2-1B' is {proj / 'configs' / 'Llama-3.2-1B'} (")
    assert "relative to its folder" in message and "which does not exist" in message
    assert f"{proj / 'Llama-3.2-1B'} does: write '../Llama-3.2-1B'" in message
    assert "model.name_or_path=./Llama-3.2-1B on the command line" in message and "\n" not in message
    assert load_config("configs/run.json", ["model.name_or_path=./Llama-3.2-1B"]).model.name_or_path == str(
        proj / "Llama-3.2-1B"
    )


def test_a_path_that_exists_both_ways_is_used_by_the_rule_and_noted(tmp_path, monkeypatch) -> None:
    proj = _project(tmp_path, data={"path": "data/train.jsonl"})
    (proj / "configs" / "data").mkdir()
    shutil.copy(DATA, proj / "configs" / "data" / "train.jsonl")
    monkeypatch.chdir(proj)
    cfg = load_config("configs/run.json")
    assert cfg.data.path == str(proj / "configs" / "data" / "train.jsonl")
    assert preflight(cfg) == [
        f"data.path 'data/train.jsonl' is {proj / 'configs' / 'data' / 'train.jsonl'} (relative paths in a config "
        f"file are relative to its folder {proj / 'configs'}); {proj / 'data' / 'train.jsonl'} also exists and is "
        "not used"
    ]


def test_a_command_line_path_that_only_exists_next_to_the_config_names_the_fix(tmp_path, monkeypatch) -> None:
    proj = _project(tmp_path)
    monkeypatch.chdir(proj)
    with pytest.raises(ID3Error, match=r"data.path '../data/train.jsonl' is .*command line is relative to the "):
        preflight(load_config("configs/run.json", ["data.path=../data/train.jsonl"]))


def test_a_deepspeed_file_is_found_next_to_the_config_and_overrides_reach_into_it(tmp_path, monkeypatch) -> None:
    proj = _project(tmp_path)
    (proj / "configs" / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    raw = json.loads((proj / "configs" / "run.json").read_text())
    (proj / "configs" / "run.json").write_text(json.dumps({**raw, "deepspeed": "ds.json"}))
    monkeypatch.chdir(tmp_path)
    assert load_config(proj / "configs" / "run.json").deepspeed == {"zero_optimization": {"stage": 3}}
    cfg = load_config(proj / "configs" / "run.json", ["deepspeed.zero_optimization.stage=1"])
    assert cfg.deepspeed == {"zero_optimization": {"stage": 1}}


def test_the_config_a_run_saves_reads_the_same_from_its_output_folder(tmp_path, monkeypatch) -> None:
    """output_dir/config.json is itself a --config: its input paths must not depend on where it lies."""
    proj = _project(tmp_path)
    monkeypatch.chdir(proj)
    cfg = load_config("configs/run.json", ["data.eval_path=data/train.jsonl"])
    saved = proj / "outputs" / "run" / "config.json"
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps(cfg.to_dict()))
    again = load_config(saved)
    assert (again.data.path, again.data.eval_path, again.train.output_dir) == (
        cfg.data.path,
        cfg.data.eval_path,
        cfg.train.output_dir,
    )


@pytest.mark.parametrize("name", ["tiny_cpu", "minilm_sentiment"])
def test_shipped_configs_find_their_data_from_any_folder(name, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / f"{name}.json")
    assert Path(cfg.data.path).is_file() and cfg.train.output_dir.startswith("outputs/")
    if cfg.data.eval_path:
        assert Path(cfg.data.eval_path).is_file()

"""What a run tells its user: timestamped records, the config that ran, the last line, and --help."""

from __future__ import annotations

import importlib.util
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from id3_ds.config import RunConfig, load_config
from id3_ds.training.run_log import RunLogger, final_line, print_final_line, save_resolved_config
from tests.launcher import TINY_CONFIG, TRAIN, ok, train


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def test_records_carry_utc_time_and_elapsed_seconds(tmp_path, capsys) -> None:
    logger = RunLogger(str(tmp_path), True, total=2, start=0, progress=False, tensorboard=False)
    logger.log({"event": "start", "step": 0})
    logger.log({"step": 1, "loss": 0.5})
    logger.close()
    first, second = _records(tmp_path)
    assert second["step"] == 1 and second["loss"] == 0.5
    for rec in (first, second):
        stamp = datetime.fromisoformat(rec["time"].replace("Z", "+00:00"))
        assert stamp.utcoffset().total_seconds() == 0
        assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 3600
        assert rec["elapsed_s"] >= 0
    assert second["elapsed_s"] >= first["elapsed_s"]
    assert "time=" not in capsys.readouterr().out  # the console line stays as it was


def test_elapsed_counts_from_the_runs_start(tmp_path) -> None:
    import time

    logger = RunLogger(str(tmp_path), True, 1, 0, False, False, started=time.monotonic() - 100.0)
    logger.log({"step": 0})
    logger.close()
    assert _records(tmp_path)[0]["elapsed_s"] >= 100.0


def test_the_resolved_config_is_saved_by_rank0_and_runs_again(tmp_path) -> None:
    out = tmp_path / "run"
    cfg = load_config(TINY_CONFIG, ["train.lr=0.01", f"train.output_dir={out}", "id3.budget=123"])
    assert save_resolved_config(cfg, is_main=False) is None
    assert not (out / "config.json").exists()
    path = save_resolved_config(cfg, is_main=True)
    assert path == out / "config.json"
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(cfg.to_dict()))
    assert saved["train"]["lr"] == 0.01 and saved["id3"]["budget"] == 123
    assert load_config(path) == cfg  # the saved file is itself a config that reproduces the run
    assert not [p for p in out.iterdir() if p.name != "config.json"]  # no temp file left


def test_final_line_names_the_output_checkpoint_and_export_command() -> None:
    line = final_line("outputs/x", "outputs/x/checkpoint-00000040", "builtin:tiny-llama")
    assert line.startswith("done: results in outputs/x")
    assert "checkpoint-00000040" in line
    assert "id3-ds export-delta outputs/x --base builtin:tiny-llama --out outputs/x/delta" in line


def test_final_line_after_an_export_names_the_delta(tmp_path) -> None:
    out = tmp_path / "out"
    line = final_line(str(out), f"{out}/checkpoint-00000002", "/m/base dir", delta=f"{out}/delta")
    assert f"sparse delta in {out}/delta" in line and "export-delta" not in line
    assert f"id3-ds merge '/m/base dir' {out}/delta --out {out}/merged" in line  # a space stays one argument


def test_the_suggested_merge_folder_is_never_one_that_exists(tmp_path) -> None:
    """The worked example's `merge ... --out merged/` had already made the folder the done line suggested."""
    out = tmp_path / "run"
    (out / "merged").mkdir(parents=True)
    line = final_line(str(out), None, "b", delta=str(out / "delta"))
    assert line.endswith(f"--out {out}/merged-2")
    (out / "merged-2").mkdir()
    assert final_line(str(out), None, "b", delta=str(out / "delta")).endswith(f"--out {out}/merged-3")


def test_the_done_line_repeats_the_final_eval_metrics(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    cfg = load_config(TINY_CONFIG, [f"train.output_dir={out}", "train.export_delta=false"])
    logger = RunLogger(str(out), True, total=2, start=0, progress=False, tensorboard=False)
    logger.log({"step": 1, "eval_loss": 0.9, "eval_accuracy": 0.5})
    logger.log({"step": 2, "loss": 0.4})
    logger.log({"step": 2, "eval_loss": 0.61234, "eval_accuracy": 0.7393, "eval_f1": 0.7824, "eval_examples": 1212})
    logger.close()
    print_final_line(cfg, is_main=True)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("done: eval_loss=0.6123 eval_accuracy=0.7393 eval_f1=0.7824 eval_examples=1212; results in")
    assert final_line("o", None, "b").startswith("done: results in o")  # no eval, no metrics


def test_final_line_for_dense_runs_offers_no_delta_command() -> None:
    line = final_line("out", "out/checkpoint-00000002", "b", sparse=False, final_model="out/final_model")
    assert "export-delta" not in line and "merge" not in line and "final model out/final_model" in line


def test_print_final_line_reads_the_latest_complete_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    cfg = load_config(TINY_CONFIG, [f"train.output_dir={out}", "train.export_delta=false"])
    for step, complete in ((10, True), (20, True), (30, False)):  # 30: killed mid-save
        ckpt = out / f"checkpoint-{step:08d}"
        ckpt.mkdir(parents=True)
        if complete:
            (ckpt / "COMPLETE").write_text("{}")
    print_final_line(cfg, is_main=False)
    assert capsys.readouterr().out == ""
    print_final_line(cfg, is_main=True)
    line = capsys.readouterr().out.strip()
    assert str(out / "checkpoint-00000020") in line and f"export-delta {out} --base builtin:tiny-llama" in line


def test_help_lists_every_config_section_and_points_to_the_readme(capsys) -> None:
    spec = importlib.util.spec_from_file_location("train_script", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    listed = text[text.index("config sections") :]
    for section in RunConfig.model_fields:
        assert f"\n  {section} " in listed, section
    assert "README" in listed and "--master_port" in listed


@pytest.mark.slow
def test_a_one_process_run_leaves_its_config_timed_records_and_a_last_line(env, tmp_path) -> None:
    out = tmp_path / "run"
    proc = ok(train(["train.steps=2", "train.save_steps=0", f"train.output_dir={out}"], nproc=1, env=env))
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["steps"] == 2 and saved["train"]["output_dir"] == str(out)
    records = _records(out)
    assert records[0]["event"] == "start" and records[-1]["event"] == "done"
    assert all("time" in r and r["elapsed_s"] >= 0 for r in records)
    last = proc.stdout.strip().splitlines()[-1]
    ckpt = out / "checkpoint-00000002"
    assert last == final_line(str(out), str(ckpt), "builtin:tiny-llama", delta=str(out / "delta")), last

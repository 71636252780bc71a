"""train.save_total_limit (Hugging Face's name): the newest N complete checkpoints stay, nothing else counts or
goes; and the one line that says when sparse state would make dense checkpoints small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from id3_ds.checkpoint import checkpoint_dir, list_checkpoints, mark_complete
from id3_ds.checkpoint.rotation import REMOVING, rotate_checkpoints, sparse_size_note
from id3_ds.config import load_config
from tests.launcher import TINY_CONFIG, ok, train


def _ckpts(out: Path, complete: list[int], incomplete: list[int] = ()) -> None:
    for step in [*complete, *incomplete]:
        ckpt = checkpoint_dir(out, step)
        (ckpt / "ds").mkdir(parents=True)
        (ckpt / "ds" / "model.pt").write_bytes(b"x" * 100)
        if step in complete:
            mark_complete(ckpt, {"step": step})


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.iterdir() if p.name.startswith("checkpoint-"))


def test_keeps_the_newest_complete_ones_and_never_an_incomplete_one(tmp_path) -> None:
    _ckpts(tmp_path, [10, 20, 30, 40, 50], incomplete=[5, 60])  # 60: being written (or killed mid-save)
    removed = rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-00000010", "checkpoint-00000020", "checkpoint-00000030"]
    assert _steps(tmp_path) == [5, 40, 50, 60] and [p.name[-2:] for p in list_checkpoints(tmp_path)] == ["40", "50"]
    assert not list(tmp_path.glob(f"{REMOVING}*"))
    assert rotate_checkpoints(tmp_path, None) == [] and _steps(tmp_path) == [5, 40, 50, 60]  # default: keep all


def test_the_checkpoint_resumed_from_is_kept_and_an_interrupted_removal_is_finished(tmp_path) -> None:
    _ckpts(tmp_path, [10, 20, 30, 40])
    (tmp_path / f"{REMOVING}checkpoint-00000005").mkdir()  # a kill during an earlier removal
    rotate_checkpoints(tmp_path, 1, protect=[checkpoint_dir(tmp_path, 20)])
    assert _steps(tmp_path) == [20, 40] and not list(tmp_path.glob(f"{REMOVING}*"))


def test_the_key_is_validated() -> None:
    assert load_config(TINY_CONFIG, ["train.save_total_limit=3"]).train.save_total_limit == 3
    with pytest.raises(Exception, match="train.save_total_limit' must be > 0"):
        load_config(TINY_CONFIG, ["train.save_total_limit=0"])


def test_a_large_dense_checkpoint_gets_the_sparse_state_line(tmp_path) -> None:
    ckpt = tmp_path / "checkpoint-00000020"
    ckpt.mkdir()
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"\0" * (70 * 2**20))
    line = sparse_size_note(ckpt, 31_874)
    assert line.startswith("note: checkpoint-00000020 holds 73.4 MB for 31,874 trained entries; id3.state=sparse")
    assert "about 892 KB per checkpoint" in line and "\n" not in line
    assert sparse_size_note(ckpt, 10_000_000) is None  # sparse would not be much smaller
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 1000)
    assert sparse_size_note(ckpt, 31_874) is None  # small anyway: nothing worth saying


@pytest.mark.slow
def test_a_run_with_save_total_limit_keeps_two_and_resumes_from_them(tmp_path, env) -> None:
    """The user's steps: a 6-step run saving every step with save_total_limit=2, killed after step 4 and run
    again: it resumes from the newest kept checkpoint and ends with the last two."""
    out = tmp_path / "run"
    args = ["train.steps=6", "train.save_steps=1", "train.save_total_limit=2", "id3.budget=600"]
    args += ["train.export_delta=false", f"train.output_dir={out}"]
    assert train(args, nproc=1, env={**env, "ID3_DS_FAULT": "kill_after_step:4:0"}).returncode != 0
    assert _steps(out) == [3, 4]
    log = ok(train(args, nproc=1, env=env)).stdout
    assert f"resumed from {checkpoint_dir(out, 4)} at step 4 of 6" in log, log[-3000:]
    assert _steps(out) == [5, 6] and not list(out.glob(f"{REMOVING}*"))
    assert json.loads((checkpoint_dir(out, 6) / "COMPLETE").read_text())["step"] == 6


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_at_zero_3_rotate_and_print_no_third_party_noise(tmp_path, env) -> None:
    """save_total_limit=1 under 2 ranks (rank 0 removes, after every rank wrote its part), and the run's
    output holds none of the lines every run used to print: DeepSpeed's op-loaded line per rank, torch's
    reduce_scatter_tensor FutureWarning (DeepSpeed's ZeRO-3 calls it)."""
    out = tmp_path / "run"
    args = ["train.steps=3", "train.save_steps=1", "train.save_total_limit=1", "id3.budget=600", "train.log_steps=1"]
    args += ["deepspeed.zero_optimization.stage=3", "train.export_delta=false", f"train.output_dir={out}"]
    proc = ok(train(args, nproc=2, env=env))
    assert _steps(out) == [3] and not list(out.glob(f"{REMOVING}*"))
    for noise in ("built successfully", "FutureWarning", "reduce_scatter_tensor", "gemm_4bit_forward"):
        assert noise not in proc.stdout, proc.stdout[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("done: results in")

"""The learning-rate schedule (transformers.get_scheduler) under DeepSpeed: the warm-up and decay users of the
HF Trainer get, continued exactly by a resume, whether DeepSpeed restores the scheduler or it is fast-forwarded."""

from __future__ import annotations

import json

import pytest
import torch

from id3_ds.checkpoint import checkpoint_dir
from id3_ds.training.lr_schedule import lr_scheduler
from tests.launcher import ok, train, weights

LR, WARMUP, STEPS = 0.003, 2, 6
ARGS = [
    "id3.budget=600",
    f"train.steps={STEPS}",
    f"train.lr={LR}",
    "train.lr_scheduler=linear",
    f"train.warmup_steps={WARMUP}",
    "train.log_steps=1",
    "train.save_steps=2",
    "train.save_final_model=true",
    "train.export_delta=false",
    "model.dtype=fp32",
]


def _lrs(run_dir) -> dict[int, float]:
    """The lr logged after each optimizer step (the rate of the step that follows it)."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if "lr" in r}


def _hf_linear(done: int) -> float:
    """transformers' linear schedule: lr * s / warmup in the warm-up (0 at the first step), then down to 0."""
    if done < WARMUP:
        return LR * done / WARMUP
    return LR * (STEPS - done) / (STEPS - WARMUP)


@pytest.mark.parametrize(
    ("name", "hf_name"), [("constant", "constant_with_warmup"), ("linear", "linear"), ("cosine", "cosine")]
)
@pytest.mark.parametrize(("warmup", "total"), [(0, 7), (3, 10), (5, 5)])
def test_each_schedule_is_transformers_own(name, hf_name, warmup, total) -> None:
    """The trainer's schedules (id3_ds.training.lr_schedule) equal transformers.get_scheduler at every step, and
    their saved states load into each other (a checkpoint from before keeps resuming)."""
    from transformers import get_scheduler

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)

    ours, hf = lr_scheduler(name, optimizer(), warmup, total), get_scheduler(hf_name, optimizer(), warmup, total)
    for _ in range(total + 2):
        assert ours.get_last_lr() == hf.get_last_lr()
        ours.optimizer.step(), hf.optimizer.step()
        ours.step(), hf.step()
    again = lr_scheduler(name, optimizer(), warmup, total)
    again.load_state_dict(hf.state_dict())
    assert again.get_last_lr() == hf.get_last_lr() and again.last_epoch == total + 2


@pytest.mark.distributed
@pytest.mark.slow
def test_warmup_and_decay_resume_exactly(tmp_path, env) -> None:
    whole = tmp_path / "whole"
    ok(train([*ARGS, "deepspeed.zero_optimization.stage=2", f"train.output_dir={whole}"], nproc=1, env=env))
    want = _lrs(whole)
    assert want == pytest.approx({s: _hf_linear(s) for s in range(1, STEPS + 1)}, abs=1e-12)

    killed = tmp_path / "killed"  # DeepSpeed reloads its own scheduler state
    args = [*ARGS, "deepspeed.zero_optimization.stage=2", f"train.output_dir={killed}"]
    assert train(args, nproc=1, env={**env, "ID3_DS_FAULT": "kill_after_step:3:0"}).returncode != 0
    ok(train(args, nproc=1, env=env))
    assert _lrs(killed) == want  # steps 1-3 from the killed run, 3-6 from the resumed one
    got, ref = weights(killed / "final_model"), weights(whole / "final_model")
    # one process under ZeRO-2 resumes to within float rounding (~1e-7 with a constant lr as well)
    assert max(float((got[n] - ref[n]).abs().max()) for n in ref) < 1e-6

    restarted = tmp_path / "restarted"  # ZeRO-2 -> ZeRO-3: moments restart, the scheduler is fast-forwarded
    at2 = f"train.resume={checkpoint_dir(killed, 2)}"
    log = ok(
        train([*ARGS, at2, "deepspeed.zero_optimization.stage=3", f"train.output_dir={restarted}"], nproc=1, env=env)
    )
    assert "optimizer moments restart" in log.stdout, log.stdout[-3000:]
    assert _lrs(restarted) == {s: lr for s, lr in want.items() if s > 2}

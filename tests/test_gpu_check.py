"""benchmarks/gpu_check.py: its CPU dry run passes every check, and a phase past its budget ends with one line.

The dry run is the GPU check's own code path (real trainer, ZeRO-3, bf16, grad_accum 2, export, merge, the
interleaved overhead engines) on a tiny model with gloo on DeepSpeed's CPU accelerator, so the script that
will spend a GPU lease is known to work before it gets one. Behaviour only: no timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check as gc
from tests.launcher import require_markers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "gpu_check.py")


@pytest.mark.slow
def test_cpu_dry_run_passes_every_check(tmp_path: Path) -> None:
    require_markers(1)
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--cpu-dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    v = report["verify"]
    assert "error" not in report
    assert v["budget_expected"] == v["budget_logged"] == v["chosen_logged"] == v["delta_entries"] > 0
    assert v["moved_outside_delta"] == 0 and v["merged_mismatch"] == 0
    assert 0 < v["moved_entries"] <= v["delta_entries"]
    assert [r["stage"] for r in report["overhead"]] == [2, 3]
    for r in report["overhead"]:
        assert len(r["full_ms_all"]) == len(r["id3_ms_all"]) == report["plan"]["pairs"]
        assert r["mask_bytes_per_rank"] > 0
    assert [(r["mode"], r["shape"]) for r in report["steps"]["rows"]] == [("dense", "tiny"), ("sparse", "tiny")]
    for r in report["steps"]["rows"]:
        assert r["full_ms"] > 0 and r["id3_ms"] > 0 and r["syncs_per_step"] is None  # no CUDA: no sync count
    qlora, sparse = report["nf4"]["rows"]
    assert (qlora["variant"], sparse["variant"]) == ("qlora", "id3_sparse")
    assert qlora["trainable"] == sparse["trainable"] == qlora["lora_count"] > 0  # equal trainable counts
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| verdict | PASS |" in table and table.strip() in proc.stdout
    assert "| sparse ID3, tiny |" in table and "| id3_sparse, tiny |" in table and "70B projection" in table


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU refusal")
def test_without_cuda_one_clear_line(tmp_path: Path) -> None:
    require_markers(1)
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("gpu_check: error:")]
    assert errors == ["gpu_check: error: no CUDA device visible to torch: run on a GPU machine, or pass --cpu-dry-run"]
    assert "no CUDA" in json.loads((tmp_path / "gpu_check.json").read_text())["error"]


def test_lora_count_is_what_peft_trains() -> None:
    """The nf4 phase gives sparse ID3 LoRA r=16's trainable count, computed from the shape: PEFT's own count."""
    from benchmarks import gpu_steps
    from id3_ds.models.load import wrap_lora

    model = wrap_lora(gpu_steps.llama("tiny", __import__("torch").float32, "cpu"), 16, 32, 0.0, gpu_steps.LINEAR, False)
    assert gpu_steps.lora_count("tiny", 16) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_unknown_phase_is_one_clear_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--cpu-dry-run", "--only", "steps,gpu", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_check: error: --only 'steps,gpu': choose phases")


def test_in_process_phase_past_its_budget_raises() -> None:
    timings: dict = {}
    with pytest.raises(gc.CheckError, match="phase slow ran past its 1 s budget"):
        with gc.phase("slow", 1, timings):
            time.sleep(5)
    assert "slow" in timings


def test_child_past_its_budget_is_killed(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(gc.CheckError, match=r"phase sleeper ran past its 1 s budget \(killed\)"):
        gc.run_child("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], 1, gc.child_env(True),
                     tmp_path / "log")  # fmt: skip
    assert time.monotonic() - t0 < 30  # killed, not waited for


def test_failed_child_names_its_error_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "print('noise'); print('error: data.path missing: fix it'); raise SystemExit(3)"]
    with pytest.raises(gc.CheckError, match=r"phase train failed \(exit 3\): error: data.path missing: fix it"):
        gc.run_child("train", cmd, 60, gc.child_env(True), tmp_path / "log")


def test_whole_check_keeps_its_time_limit(tmp_path: Path) -> None:
    with pytest.raises(gc.CheckError, match="no time left for phase requirements within --time-limit 0 s"):
        gc.run_check(gc.CPU, True, tmp_path, keep=False, limit=0)
    assert "no time left" in json.loads((tmp_path / "gpu_check.json").read_text())["error"]


def test_gpu_quality_script_refuses_a_bare_call_and_a_machine_without_half_the_model(tmp_path: Path) -> None:
    """benchmarks/gpu_quality.sh spends a GPU lease in two calls; a wrong verb, or stage2 on a machine where
    stage1 never left the model's first half, stops at once with one line instead of running the plan."""
    script = str(ROOT / "benchmarks" / "gpu_quality.sh")
    bare = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30)
    assert bare.returncode == 2 and bare.stdout.startswith("usage: bash benchmarks/gpu_quality.sh")
    if Path("/tmp/stash/part1").exists():
        pytest.skip("this machine holds a stage1 stash")
    fresh = subprocess.run(["bash", script, "stage2", "60"], capture_output=True, text=True, timeout=30)
    assert fresh.returncode == 2
    assert fresh.stdout.strip() == (
        "gpu_quality: error: half 1 of the model is not on this machine (a fresh one): run stage1 first"
    )

"""apply_delta / remove_delta on a model partitioned by ZeRO-3 across 2 processes."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from id3_ds.delta import export_delta
from tests.launcher import ROOT, launch_command, require_markers
from tests.test_delta_common import make_case

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_apply_and_remove_on_a_zero3_partitioned_model(tmp_path) -> None:
    case = make_case(tmp_path)
    export_delta(case.run, case.base, tmp_path / "delta")
    worker = ROOT / "tests" / "zero3_apply_worker.py"
    cmd = launch_command(2, worker, str(case.base), str(tmp_path / "delta"), str(tmp_path))
    require_markers(2)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    applied, removed = load_file(tmp_path / "applied.safetensors"), load_file(tmp_path / "removed.safetensors")
    trained = {n: p.detach() for n, p in case.model.named_parameters()}
    base = {}
    for f in case.base.glob("*.safetensors"):
        base.update(load_file(f))
    for name, want in trained.items():
        assert torch.equal(applied[name], want), f"{name}: ZeRO-3 apply_delta differs from the trained weights"
        assert torch.equal(removed[name], base[name]), f"{name}: remove_delta did not restore the base bit for bit"

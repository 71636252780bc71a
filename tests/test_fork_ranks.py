"""id3_ds/runtime/fork_ranks.py, the tests' launcher: ranks see their rank, a failing rank stops the others, and
exit codes come back as from a fresh process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from id3_ds.runtime.launching import FORK_RANKS, fork_server, launch_command
from tests.launcher import ROOT, require_markers


def _launch(tmp_path: Path, nproc: int, code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    if fork_server() is None:
        pytest.skip("ID3_DS_FORK_RANKS=0: this session launches without the fork server")
    script = tmp_path / "script.py"
    script.write_text(code)
    cmd = launch_command(nproc, script)
    assert "fork_ranks.py" in cmd[1], "the session's fork server is not in use"
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.distributed
@pytest.mark.slow
def test_each_rank_runs_the_script_as_main_with_its_rank_and_world(tmp_path: Path) -> None:
    require_markers(2)
    code = (
        "import os, sys\n"
        "if __name__ == '__main__':\n"
        "    print('rank', os.environ['RANK'], os.environ['WORLD_SIZE'], sys.argv[0])\n"
    )
    proc = _launch(tmp_path, 2, code)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == [f"rank {r} 2 {tmp_path / 'script.py'}" for r in (0, 1)]


@pytest.mark.slow
def test_one_rank_exits_with_the_scripts_code_and_message(tmp_path: Path) -> None:
    require_markers(1)
    assert _launch(tmp_path, 1, "import sys\nsys.exit(3)\n").returncode == 3
    proc = _launch(tmp_path, 1, "import sys\nsys.exit('error: bad config')\n")
    assert proc.returncode == 1 and proc.stderr.strip().endswith("error: bad config")
    proc = _launch(tmp_path, 1, "raise ValueError('boom')\n")
    assert proc.returncode == 1 and "ValueError: boom" in proc.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_a_failed_rank_stops_the_others_and_the_launch_fails(tmp_path: Path) -> None:
    require_markers(2)
    code = "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(5)\ntime.sleep(600)\n"
    start = time.monotonic()
    proc = _launch(tmp_path, 2, code)
    assert proc.returncode == 1 and "rank 1" in proc.stderr and "exited with 5" in proc.stderr
    assert time.monotonic() - start < 60  # rank 0 was stopped, not waited for


def test_without_a_server_launch_command_is_torchrun_or_plain_python(monkeypatch) -> None:
    monkeypatch.setenv(FORK_RANKS, "0")
    assert launch_command(1, "x.py", "a") == [sys.executable, "x.py", "a"]
    assert launch_command(2, "x.py")[1:3] == ["-m", "torch.distributed.run"]

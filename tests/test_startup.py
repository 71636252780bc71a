"""Start-up as a user meets it: a port another job holds, DeepSpeed's op builds, third-party warnings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from id3_ds.errors import ID3Error
from id3_ds.integration import op_builds
from id3_ds.training import startup
from tests.launcher import ROOT, TINY_CONFIG, TRAIN

# -- the rendezvous port ------------------------------------------------------------------------------


@pytest.fixture
def taken_port():
    """A port held the way another job's rendezvous store holds it: bound on all interfaces, listening."""
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        yield s.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_second_job_on_a_taken_port_stops_at_once_with_one_line_naming_the_flag(taken_port, env, tmp_path) -> None:
    """The user's steps: a job holds the port, a second `python launch/train.py` is started on it."""
    run_env = {
        **os.environ,
        **env,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(taken_port),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, TRAIN, "--config", TINY_CONFIG, f"train.output_dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert str(taken_port) in errors[0] and "deepspeed --master_port" in errors[0] and "torchrun" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # stopped before the run wrote anything


def test_rank0_refuses_a_taken_port(taken_port) -> None:
    env = {"RANK": "0", "MASTER_PORT": str(taken_port)}
    with pytest.raises(ID3Error, match=f"port {taken_port} .*already in use.*--master_port"):
        startup.check_rendezvous_port(env)


def test_a_free_port_and_ranks_that_only_connect_pass(taken_port) -> None:
    startup.check_rendezvous_port({"RANK": "0", "MASTER_PORT": str(_free_port())})
    startup.check_rendezvous_port({"RANK": "1", "MASTER_PORT": str(taken_port)})  # rank 1 connects, binds nothing


def test_under_torchrun_the_agent_holds_the_port_and_it_is_not_a_clash(taken_port) -> None:
    """torchrun's agent binds MASTER_PORT itself and says so to its workers; the port is then taken by design."""
    env = {
        "RANK": "0",
        "MASTER_PORT": str(taken_port),
        "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }
    startup.check_rendezvous_port(env)
    with pytest.raises(ID3Error):  # a torchelastic run whose rank 0 hosts the store itself is checked
        startup.check_rendezvous_port({**env, "TORCHELASTIC_USE_AGENT_STORE": "False"})


# -- DeepSpeed's JIT-compiled ops ---------------------------------------------------------------------


def test_extensions_dir_is_keyed_by_the_environment(monkeypatch) -> None:
    from torch.utils.cpp_extension import get_default_build_root

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    here = op_builds.extensions_dir()
    assert here.parent == Path(get_default_build_root())
    assert op_builds.extensions_dir() == here  # stable: every rank and every run of this env agree
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    other = op_builds.extensions_dir()
    assert other != here and other.parent == here.parent


def test_a_users_torch_extensions_dir_is_respected(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert op_builds.use_per_environment_extensions(is_main=False) == tmp_path
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path)


def test_without_one_the_environments_dir_is_set_for_torch(monkeypatch) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    path = op_builds.use_per_environment_extensions(is_main=False)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(path)
    assert op_builds.environment_key() in path.name


def test_arch_specific_cuda_arch_entries_are_made_readable_for_deepspeeds_jit_builder(monkeypatch, tmp_path) -> None:
    """DeepSpeed's JIT builder int()s every part of TORCH_CUDA_ARCH_LIST, so an image's "9.0a" stopped every
    GPU run at FusedAdam's build; the entry becomes "9.0" for the build, and a list it reads stays as it is."""
    assert op_builds.deepspeed_arch_list("8.0 9.0 9.0a") == "8.0;9.0"
    assert op_builds.deepspeed_arch_list("9.0a;10.0f+PTX") == "9.0;10.0+PTX"
    assert op_builds.deepspeed_arch_list("8.0 8.6+PTX") == "8.0 8.6+PTX"  # readable: the user's own spelling
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    op_builds.use_per_environment_extensions(is_main=False)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;8.0")
    op_builds.use_per_environment_extensions(is_main=False)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5;8.0"


def test_the_build_message_appears_only_while_the_op_is_not_built(tmp_path) -> None:
    message = op_builds.build_message("fused_adam", tmp_path)
    assert message is not None and "fused_adam" in message and "once for this environment" in message
    (tmp_path / "fused_adam").mkdir()
    (tmp_path / "fused_adam" / "fused_adam.so").write_bytes(b"")
    assert op_builds.build_message("fused_adam", tmp_path) is None


def test_rank0_announces_a_jit_build_before_it_runs(monkeypatch, tmp_path, capsys) -> None:
    """DeepSpeed's loader is wrapped: the line comes before the (here: fake) build, on rank 0 only."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    calls = []

    def fake_jit_load(self, verbose=True):
        calls.append(capsys.readouterr().out)  # what was printed before the build started
        return "module"

    class FakeBuilder:
        name = "cpu_adam"

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(OpBuilder, "jit_load", fake_jit_load)
    capsys.readouterr()  # DeepSpeed's import-time notes
    op_builds.announce_op_builds(is_main=False)
    assert OpBuilder.jit_load is fake_jit_load
    op_builds.announce_op_builds(is_main=True)
    op_builds.announce_op_builds(is_main=True)  # idempotent: one line per build, not one per call
    assert OpBuilder.jit_load(FakeBuilder()) == "module"
    assert calls == [op_builds.build_message("cpu_adam", tmp_path) + "\n"]
    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "cpu_adam.so").write_bytes(b"")
    OpBuilder.jit_load(FakeBuilder())
    assert calls[-1] == ""  # built already: silent


def test_stale_build_locks_are_found_in_the_dir_ops_are_built_in(monkeypatch, tmp_path) -> None:
    """With TORCH_EXTENSIONS_DIR set (always, now) torch builds in <dir>/<op>/, without a py311_cpu level."""
    from id3_ds.integration.op_builds import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "fused_adam" / "lock"
    stale.parent.mkdir()
    stale.touch()
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    assert clear_stale_build_locks() == [str(stale)]


# -- third-party noise --------------------------------------------------------------------------------


def _all_gather_into_tensor_warnings() -> list[str]:
    """Call torch's deprecated collective the way DeepSpeed does; no process group: it warns, then fails."""
    import torch
    import torch.distributed as dist

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        startup.quiet_third_party_noise(rank=0)
        with pytest.raises((RuntimeError, ValueError)):
            dist.all_gather_into_tensor(torch.zeros(2), torch.zeros(1))
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning, stacklevel=1)
    return [str(w.message) for w in caught]


def test_torchs_all_gather_deprecation_is_filtered_only_where_torch_raises_it() -> None:
    caught = _all_gather_into_tensor_warnings()
    assert caught == ["`torch.distributed.all_gather_into_tensor` is deprecated"]  # ours (this module) still shows


def test_torchs_reduce_scatter_deprecation_is_filtered_only_where_torch_raises_it() -> None:
    """DeepSpeed's ZeRO calls reduce_scatter_tensor: a FutureWarning per rank per run, nobody's to act on."""
    import torch
    import torch.distributed as dist

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        startup.quiet_third_party_noise(rank=0)
        with pytest.raises((RuntimeError, ValueError)):
            dist.reduce_scatter_tensor(torch.zeros(1), torch.zeros(2))
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`torch.distributed.reduce_scatter_tensor` is deprecated"]


def test_bitsandbytes_optional_kernel_line_is_dropped_and_nothing_else(caplog) -> None:
    import logging

    startup.quiet_third_party_noise(rank=0)
    log = logging.getLogger(startup.BNB_CPU_LOGGER)
    with caplog.at_level(logging.WARNING, logger=startup.BNB_CPU_LOGGER):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
        log.warning("something bitsandbytes really wants said")
    assert [r.getMessage() for r in caplog.records] == ["something bitsandbytes really wants said"]


def test_deepspeeds_op_loaded_line_is_dropped_and_its_other_output_kept(capsys) -> None:
    import importlib

    from id3_ds.integration.op_builds import quiet_op_loaded_line

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    assert "def build_shm_op" in Path(ds_torch.__file__).read_text()  # the module whose line this is

    quiet_op_loaded_line()
    quiet_op_loaded_line()  # twice: still one wrapper
    ds_torch.print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    ds_torch.print("anything else", 3)
    assert capsys.readouterr().out == "anything else 3\n"


def test_ranks_above_0_keep_transformers_to_errors(monkeypatch) -> None:
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    try:
        startup.quiet_third_party_noise(rank=0)
        assert hf_logging.get_verbosity() == before
        startup.quiet_third_party_noise(rank=1)
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(before)
        hf_logging.enable_progress_bar()


def test_every_deepspeed_worker_builds_its_ops_in_the_trainers_folder() -> None:
    """A worker that starts DeepSpeed without `use_per_environment_extensions` builds its ops again in torch's
    shared default folder, which another venv may have built over (2 min on 2 cores; one CI launch took 124 s)."""
    scripts = [*(ROOT / "launch").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").glob("*.py")]
    starters = [p for p in scripts if "deepspeed.init_distributed(" in p.read_text() and p.name != Path(__file__).name]
    assert any(p.name == "zero3_apply_worker.py" for p in starters)
    missing = [p.name for p in starters if "use_per_environment_extensions(" not in p.read_text()]
    assert not missing, f"call use_per_environment_extensions() before deepspeed.init_distributed in {missing}"


# -- CPU threads per rank -------------------------------------------------------------------------------


@pytest.fixture
def torch_threads():
    """The test process's torch thread count, restored afterwards (share_cpu_threads sets it)."""
    import torch

    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("env", "cores", "want"),
    [
        ({"LOCAL_SIZE": "2"}, 2, 1),  # the deepspeed launcher's variable, 2 ranks on 2 cores
        ({"LOCAL_WORLD_SIZE": "4"}, 16, 4),  # torchrun's variable
        ({"LOCAL_SIZE": "3"}, 2, 1),  # more ranks than cores: still one thread each
    ],
)
def test_ranks_on_one_machine_split_its_cores(torch_threads, env, cores, want):
    torch_threads.set_num_threads(cores)
    assert startup.share_cpu_threads(env, cores=cores) == want
    assert torch_threads.get_num_threads() == want


@pytest.mark.parametrize("env", [{"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "2"}, {}, {"LOCAL_WORLD_SIZE": "1"}])
def test_a_chosen_thread_count_or_a_lone_process_is_left_alone(torch_threads, env):
    torch_threads.set_num_threads(2)
    assert startup.share_cpu_threads(env, cores=8) is None
    assert torch_threads.get_num_threads() == 2

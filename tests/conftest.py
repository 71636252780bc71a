"""Fixtures shared by the tests that launch real training processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from id3_ds.models import resolve_model
from id3_ds.runtime.launching import FORK_RANKS
from tests import launcher
from tests.launcher import ROOT

# One intra-op thread in the test process, as launched runs get (OMP_NUM_THREADS=1, tests/launcher.py): the
# tests' tensors are tiny, and a 2-thread pool on 2 cores that other processes keep busy spends its time
# waiting at every op's barrier (test_thousands_of_steps_keep_memory_flat: 388 s with 2 threads on a loaded
# machine, 50 of its steps 16x slower than with one).
torch.set_num_threads(1)
# Tests never download: a Hub name (owner/name) that no test cache holds fails at once instead of reaching
# for the network (tests/test_hub_names.py builds its own cache; launched runs inherit this).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most slow (process-launching) tests first, each file's tests in their own order.

    pytest-xdist (pyproject's addopts) hands each worker one whole file at a time in this order: a long file
    handed out last would keep one core busy while the other idles at the end of the run.
    """
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    first_seen = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items))}
    items.sort(key=lambda item: (-slow[item.path], first_seen[item.path]))  # stable: in-file order is kept


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tell the launcher which test runs (before any fixture: module fixtures launch processes too)."""
    launcher.CURRENT_TEST = item


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    launcher.CURRENT_TEST = None


@pytest.fixture(scope="session", autouse=True)
def fork_server(request, tmp_path_factory) -> Iterator[str | None]:
    """One fork server per pytest worker (id3_ds/runtime/fork_ranks.py): every launch forks its ranks from a process
    that imported torch, DeepSpeed and transformers once, instead of each rank importing them. Set in the
    environment, so the benchmarks the tests launch use it too. ID3_DS_FORK_RANKS=0 launches without it; a
    session without `slow` tests (e.g. `-m "not slow"`) starts no process, so no server either."""
    if os.environ.get(FORK_RANKS) == "0" or not any(i.get_closest_marker("slow") for i in request.session.items):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="id3fork"))  # short: a unix socket's path is limited to ~107 bytes
    sock = str(folder / "s")
    log = tmp_path_factory.getbasetemp() / f"fork_server_{os.getpid()}.log"
    with log.open("w") as err:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "id3_ds" / "runtime" / "fork_ranks.py"), "--serve", sock],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    os.environ[FORK_RANKS] = sock  # launches wait for the socket: the server's imports overlap the first tests
    yield sock
    del os.environ[FORK_RANKS]
    server.terminate()
    server.wait(timeout=30)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    """Environment for launched runs: one model cache for the whole session, never the user's."""
    return {"ID3_DS_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="session")
def base_dir(env) -> str:
    """The builtin tiny LLaMA, materialised once into the session cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ID3_DS_CACHE", env["ID3_DS_CACHE"])
    try:
        return resolve_model("builtin:tiny-llama")
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def shared_case(tmp_path_factory) -> Callable:
    """`shared_case(world=1)`: one trained delta case per world size for the session, under pytest's temp
    directory (read-only: copy before breaking it)."""
    from tests.test_delta_common import make_case

    cases = {}

    def get(world: int = 1):
        if world not in cases:
            cases[world] = make_case(tmp_path_factory.mktemp(f"delta-case-w{world}"), world=world)
        return cases[world]

    return get

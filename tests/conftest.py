"""Fixtures shared by the tests that launch real training processes."""

from __future__ import annotations

import pytest

from id3_ds.builtin import resolve_model
from tests import launcher


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tell the launcher which test runs (before any fixture: module fixtures launch processes too)."""
    launcher.CURRENT_TEST = item


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    launcher.CURRENT_TEST = None


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

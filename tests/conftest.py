"""Fixtures shared by the tests that launch real training processes."""

from __future__ import annotations

import pytest

from id3_ds.models import resolve_model


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

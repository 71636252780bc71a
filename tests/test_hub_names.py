"""Hub names as PEFT users type them: `model.name_or_path=owner/name`, `data.path=owner/name`, read from a local
Hugging Face cache built here (offline: nothing is ever downloaded), and one line where neither the cache nor
a download can give them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from id3_ds.config import load_config
from id3_ds.data import load_records
from id3_ds.errors import ID3Error
from id3_ds.models import resolve_model
from id3_ds.recipe.preflight import preflight
from id3_ds.resources import builtin_data
from tests.launcher import TINY_CONFIG, ok, train

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL, DATA = "TinyOrg/tiny-llama-chat", "tiny-lab/alpaca"


def _repo(hub: Path, kind: str, repo_id: str) -> Path:
    """A repository in huggingface_hub's cache layout: refs/main names the snapshot folder."""
    root = hub / f"{kind}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory, base_dir) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = tmp_path_factory.mktemp("hf") / "hub"
    shutil.copytree(base_dir, _repo(hub, "model", MODEL), dirs_exist_ok=True)
    rows = [json.loads(line) for line in builtin_data().read_text().splitlines() if line.strip()]
    data = _repo(hub, "dataset", DATA) / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:-8]), data / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[-8:]), data / "test-00000-of-00001.parquet")
    (data.parent / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n")
    return hub


@pytest.fixture
def offline(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ID3_DS_CACHE", str(tmp_path / "id3cache"))
    monkeypatch.chdir(tmp_path)
    return hub


def test_hub_names_resolve_from_the_local_cache(offline) -> None:
    snap = offline / f"models--{MODEL.replace('/', '--')}" / "snapshots" / COMMIT
    assert Path(resolve_model(MODEL)) == snap
    cfg = load_config(TINY_CONFIG, [f"model.name_or_path={MODEL}", f"data.path={DATA}", f"data.eval_path={DATA}:test"])
    assert (cfg.model.name_or_path, cfg.data.path) == (MODEL, DATA)  # names, not paths under the working dir
    assert preflight(cfg) == []
    rows = [json.loads(line) for line in builtin_data().read_text().splitlines() if line.strip()]
    assert [r for _, r in load_records(DATA)] == rows[:-8]
    assert [r for _, r in load_records(f"{DATA}:test")] == rows[-8:]
    with pytest.raises(ID3Error, match=r"has no 'validation' split .*; its splits: test, train \(write tiny-lab"):
        load_records(f"{DATA}:validation")


def test_a_local_folder_of_that_name_wins(offline, tmp_path) -> None:
    local = tmp_path / MODEL
    shutil.copytree(offline / f"models--{MODEL.replace('/', '--')}" / "snapshots" / COMMIT, local)
    assert resolve_model(MODEL) == MODEL
    assert load_config(TINY_CONFIG, [f"model.name_or_path={MODEL}"]).model.name_or_path == str(local)


def test_offline_and_not_in_the_cache_says_so_in_one_line(offline) -> None:
    cfg = load_config(TINY_CONFIG, ["model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct"])
    with pytest.raises(ID3Error) as e:
        preflight(cfg)
    line = str(e.value)
    assert line.startswith("model.name_or_path 'HuggingFaceTB/SmolLM2-135M-Instruct' is not a local path, and the ")
    assert "not in the cache" in line and "HF_HUB_OFFLINE=1" in line and "\n" not in line
    cfg = load_config(TINY_CONFIG, ["data.path=tatsu-lab/alpaca"])
    with pytest.raises(ID3Error, match=r"^data.path 'tatsu-lab/alpaca' is not a local path, and the Hugging Face data"):
        preflight(cfg)


def test_a_missing_data_file_is_still_a_missing_file(offline) -> None:
    cfg = load_config(TINY_CONFIG, ["data.path=data/train.jsonl"])  # owner/name-shaped, but a file name
    with pytest.raises(ID3Error, match=r"^data.path .*data/train.jsonl does not exist; set data.path to a JSON"):
        preflight(cfg)


def test_no_network_and_not_in_the_cache_says_so_in_one_line(offline, monkeypatch) -> None:
    """Online mode on a machine without network (simulated: the test never opens a connection)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(repo_id, **kw):
        raise LocalEntryNotFoundError("ConnectError: [Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    assert preflight(load_config(TINY_CONFIG, ["model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct"])) == []
    with pytest.raises(ID3Error) as e:  # rank 0's download, after the checks
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "not in the cache" in str(e.value) and "the Hub cannot be reached" in str(e.value)
    assert "no network" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_a_run_on_hub_names_trains_offline_from_the_cache(hub, env, tmp_path) -> None:
    out = tmp_path / "run"
    args = [f"model.name_or_path={MODEL}", f"data.path={DATA}", "train.steps=2", "id3.budget=600"]
    args += ["train.export_delta=false", f"train.output_dir={out}"]
    proc = ok(train(args, nproc=1, env={**env, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}))
    assert "downloading" not in proc.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["name_or_path"] == MODEL and saved["data"]["path"] == DATA
    assert json.loads((out / "checkpoint-00000002" / "COMPLETE").read_text())["step"] == 2

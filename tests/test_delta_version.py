"""Format versions (docs/delta-format.md, "Versions"): what a writer declares, and how a reader tells a delta
from a newer id3-ds (upgrade) from a corrupt one, in delta_config.json and in delta.safetensors' metadata."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from id3_ds.delta import export_delta, load_delta, merge
from id3_ds.delta.base import BaseModel
from id3_ds.delta.format import (
    CONFIG_FILE,
    DELTA_FILE,
    FORMAT_VERSION,
    LoraDelta,
    LoraModule,
    ParamDelta,
    write_delta,
)
from id3_ds.delta.summary import render, summarize
from id3_ds.errors import ID3Error
from tests.test_delta_common import rewrite

V = "model.layers.0.self_attn.v_proj.weight"  # folded by the LoRA section of the built delta
A = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight"
B = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"
HEAD = "score.weight"
NEWER = FORMAT_VERSION + 1
UPGRADE = re.escape(
    f"written by a newer id3-ds (format version {NEWER} in WHERE; this id3-ds reads up to {FORMAT_VERSION}): "
    "upgrade id3-ds (pip install -U id3-ds)"
)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, shared_case):
    c = shared_case()
    out = tmp_path_factory.mktemp("ver") / "delta"
    export_delta(c.ckpt, c.base, out, index="flat")  # int32 positions: the version-1 form
    return c, out


def _with_sections(c, plain: Path, out: Path, sections: tuple[str, ...]) -> Path:
    """The plain delta rewritten with a LoRA section (V folded instead of added) and/or a new head."""
    base = BaseModel.open(c.base)
    delta = load_delta(plain, base)
    cfg = delta.config
    params = dict(delta.params)
    lora = None
    if "lora" in sections:
        out_dim, in_dim = base.get(V).info.shape
        params.pop(V)
        a = ParamDelta((2, in_dim), "F32", torch.tensor([0.5, -0.25]), torch.tensor([0, 5]))
        b = ParamDelta((out_dim, 2), "F32", torch.tensor([0.125, 1.0]), torch.tensor([1, 3]))
        lora = LoraDelta(2, 4.0, ["v_proj"], {V: LoraModule(V, A, B, torch.randn(2, in_dim), a, b)})
    new, updates = None, None
    if "new" in sections:
        new = {HEAD: torch.randn(2, 64)}
        updates = {
            "architectures": ["LlamaForSequenceClassification"],
            "num_labels": 2,
            "id2label": {"0": "neg", "1": "pos"},
            "label2id": {"neg": 0, "pos": 1},
        }
    base_info = {k: v for k, v in cfg["base"].items() if k != "fingerprint"}
    fp = cfg["base"]["fingerprint"]["tensors"]
    return write_delta(
        out,
        params,
        base=base_info,
        id3=cfg["id3"],
        fingerprint_tensors=fp,
        lora=lora,
        new=new,
        config_updates=updates,
        index="flat",
    )


def _versions(d: Path) -> tuple[object, object]:
    """(delta_config.json's version, delta.safetensors' metadata version)."""
    from safetensors import safe_open

    with safe_open(str(d / DELTA_FILE), "pt") as f:
        meta = f.metadata() or {}
    return json.loads((d / CONFIG_FILE).read_text()).get("version"), meta.get("version")


def _set_metadata(d: Path, metadata: dict[str, str] | None) -> None:
    save_file(load_file(str(d / DELTA_FILE)), str(d / DELTA_FILE), metadata=metadata)


def _set_version(d: Path, version: int) -> None:
    """Re-declare the version in both places (as an id3-ds writing `version` would have)."""
    rewrite(d, config=lambda x: x.update(version=version))
    _set_metadata(d, {"format": "id3-delta", "version": str(version)})


def _refused(c, d: Path, match: str, tmp_path: Path) -> str:
    """load_delta and merge refuse with one line matching `match`; merge leaves nothing behind."""
    with pytest.raises(ID3Error, match=match) as e:
        load_delta(d, BaseModel.open(c.base))
    with pytest.raises(ID3Error, match=match):
        merge(c.base, d, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert "\n" not in str(e.value)
    return str(e.value)


def _copy(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "delta"
    shutil.copytree(src, d)
    return d


def test_plain_delta_is_written_as_version_1(plain) -> None:
    c, d = plain
    assert _versions(d) == (1, "1")
    s = summarize(d)
    assert s["format_version"] == 1
    assert f"format     id3-delta version 1 (this id3-ds reads versions 1 to {FORMAT_VERSION})" in render(s)


@pytest.mark.parametrize("sections", [("lora",), ("new",), ("lora", "new")])
def test_delta_with_sections_is_written_as_version_2_and_loads(plain, tmp_path, sections) -> None:
    c, d = plain
    out = _with_sections(c, d, tmp_path / "delta", sections)
    assert _versions(out) == (2, "2")
    delta = load_delta(out, BaseModel.open(c.base))
    assert (delta.lora is not None) == ("lora" in sections) and bool(delta.new) == ("new" in sections)
    assert summarize(out)["format_version"] == 2


def test_version_1_delta_with_sections_from_the_previous_id3_ds_loads(plain, tmp_path) -> None:
    """The previous id3-ds wrote lora/new/config_updates under version 1: such a delta still loads, whole."""
    c, d = plain
    out = _with_sections(c, d, tmp_path / "delta", ("lora", "new"))
    want = load_delta(out, BaseModel.open(c.base))
    _set_version(out, 1)
    assert _versions(out) == (1, "1")
    got = load_delta(out, BaseModel.open(c.base))
    assert got.lora.modules[V].a_init.equal(want.lora.modules[V].a_init) and got.new[HEAD].equal(want.new[HEAD])
    assert got.config_updates == want.config_updates and got.total_entries == want.total_entries
    merge(c.base, out, tmp_path / "merged")
    assert summarize(out)["format_version"] == 1


def test_version_2_delta_without_sections_loads(plain, tmp_path) -> None:
    c, d = plain
    d = _copy(d, tmp_path)
    _set_version(d, 2)
    assert load_delta(d, BaseModel.open(c.base)).total_entries == 600


def test_newer_version_in_config_is_refused_with_the_upgrade_message(plain, tmp_path) -> None:
    c, d = plain
    d = _copy(d, tmp_path)
    # only the config: it is read first and authoritative, so the tensor file is never consulted
    rewrite(d, config=lambda x: x.update(version=NEWER, new_section={"unknown": True}))
    msg = _refused(c, d, UPGRADE.replace("WHERE", CONFIG_FILE), tmp_path)
    assert "corrupt" not in msg


def test_newer_version_in_file_metadata_is_refused_with_the_upgrade_message(plain, tmp_path) -> None:
    c, d = plain
    d = _copy(d, tmp_path)
    _set_metadata(d, {"format": "id3-delta", "version": str(NEWER)})
    msg = _refused(c, d, UPGRADE.replace("WHERE", f"{DELTA_FILE} metadata"), tmp_path)
    assert "corrupt" not in msg


@pytest.mark.parametrize("version", [None, "1", "2", 1.0, 2.5, True, 0, -1, [1], {"v": 1}])
def test_corrupt_config_version_is_refused_as_corrupt(plain, tmp_path, version) -> None:
    c, d = plain
    d = _copy(d, tmp_path)
    rewrite(d, config=lambda x: x.update(version=version))
    msg = _refused(c, d, f"{CONFIG_FILE} declares (no format version|format version .*not an integer >= 1)", tmp_path)
    assert "corrupt" in msg and "upgrade" not in msg


def test_missing_config_version_is_refused_as_corrupt(plain, tmp_path) -> None:
    c, d = plain
    d = _copy(d, tmp_path)
    rewrite(d, config=lambda x: x.pop("version"))
    assert "upgrade" not in _refused(c, d, f"{CONFIG_FILE} declares no format version; the delta is corrupt", tmp_path)


@pytest.mark.parametrize(
    "metadata,match",
    [
        (None, "does not declare format 'id3-delta'"),
        ({"format": "other", "version": "1"}, "does not declare format 'id3-delta'"),
        ({"format": "id3-delta"}, "metadata declares no format version; the delta is corrupt"),
        ({"format": "id3-delta", "version": ""}, "version '', not an integer >= 1"),
        ({"format": "id3-delta", "version": "abc"}, "version 'abc', not an integer >= 1"),
        ({"format": "id3-delta", "version": "1.0"}, "version '1.0', not an integer >= 1"),
        ({"format": "id3-delta", "version": "0"}, "version 0, not an integer >= 1"),
        ({"format": "id3-delta", "version": "-1"}, "version '-1', not an integer >= 1"),
    ],
)
def test_corrupt_file_metadata_is_refused_as_corrupt(plain, tmp_path, metadata, match) -> None:
    c, d = plain
    d = _copy(d, tmp_path)
    _set_metadata(d, metadata)
    assert "upgrade" not in _refused(c, d, match, tmp_path)


def test_config_and_file_versions_must_agree(plain, tmp_path) -> None:
    c, d = plain
    d = _copy(d, tmp_path)
    rewrite(d, config=lambda x: x.update(version=2))
    msg = _refused(c, d, f"{CONFIG_FILE} declares format version 2 but {DELTA_FILE} declares 1", tmp_path)
    assert "corrupt" in msg and "upgrade" not in msg

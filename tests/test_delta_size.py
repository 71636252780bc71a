"""Compact deltas: sparse positions as uint16 gap codes (format version 3), ~6 bytes an fp32 entry, within
1.01 x B x 8 bytes with the header; exact round trip of positions; broken gap codes are refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from id3_ds.delta import export_delta, load_delta, merge
from id3_ds.delta.base import BaseModel
from id3_ds.delta.format import DELTA_FILE, GAP_ESCAPE, ParamDelta, decode_gaps, encode_gaps, write_delta
from id3_ds.errors import ID3Error
from tests.test_delta_common import rewrite


@pytest.mark.parametrize(
    "idx",
    [
        [],
        [0],
        [5],
        [0, 1, 2, 3],
        [65534, 65535, 65536, 131071, 131072, 131073],
        [0, 10_000_000, 10_000_001, 99_999_999],
    ],
)
def test_gap_codes_round_trip(idx) -> None:
    t = torch.tensor(idx, dtype=torch.int64)
    codes = encode_gaps(t)
    back, closed = decode_gaps(codes)
    assert codes.dtype == torch.uint16 and closed and torch.equal(back, t)
    gaps = torch.diff(t, prepend=torch.tensor([-1])) - 1 if len(idx) else t
    assert codes.numel() == len(idx) + int((gaps // GAP_ESCAPE).sum())  # one escape per 65535 skipped


def test_gap_codes_of_random_supports() -> None:
    g = torch.Generator().manual_seed(0)
    for numel, k in [(1000, 999), (10**6, 1000), (10**8, 50)]:
        t = torch.randperm(numel, generator=g)[:k].sort().values
        back, _ = decode_gaps(encode_gaps(t))
        assert torch.equal(back, t)


def _synthetic(tmp, tensors: int = 8, rows: int = 512, budget: int = 60_000):
    """A base of `tensors` fp32 [rows, rows] weights and a delta of `budget` random entries over them."""
    g = torch.Generator().manual_seed(1)
    base = tmp / "base"
    base.mkdir()
    weights = {f"w{i}.weight": torch.randn(rows, rows, generator=g) for i in range(tensors)}
    save_file(weights, str(base / "model.safetensors"))
    b = BaseModel.open(base)
    params, prints = {}, {}
    for name, w in weights.items():
        idx = torch.randperm(w.numel(), generator=g)[: budget // tensors].sort().values
        params[name] = ParamDelta(tuple(w.shape), "F32", torch.randn(idx.numel(), generator=g) * 1e-3, idx)
        prints[name] = {"shape": list(w.shape), "dtype": "F32", "sha256": b.read(name)[1]}
    kw = dict(
        base={"name_or_path": "synthetic", "numel": rows * rows * tensors},
        id3={"budget": budget},
        fingerprint_tensors=prints,
    )
    return base, params, kw


def test_compact_delta_is_within_1_01_b_x_8_and_equal_to_flat(tmp_path) -> None:
    base, params, kw = _synthetic(tmp_path)
    gaps = write_delta(tmp_path / "gaps", params, **kw)
    flat = write_delta(tmp_path / "flat", params, **kw, index="flat")
    b = sum(p.entries for p in params.values())
    size_gaps, size_flat = (gaps / DELTA_FILE).stat().st_size, (flat / DELTA_FILE).stat().st_size
    assert size_gaps <= 1.01 * b * 8 and size_gaps < 0.8 * size_flat, (size_gaps, size_flat, b)
    a, c = load_delta(gaps), load_delta(flat)
    assert a.config["version"] == 3 and c.config["version"] == 1
    for name, p in a.params.items():
        assert torch.equal(p.indices.to(torch.int64), c.params[name].indices.to(torch.int64))
        assert torch.equal(p.values, c.params[name].values)


def test_default_export_uses_gaps_and_merges_like_flat(tmp_path, shared_case) -> None:
    c = shared_case()
    export_delta(c.ckpt, c.base, tmp_path / "gaps")
    export_delta(c.ckpt, c.base, tmp_path / "flat", index="flat")
    d = load_delta(tmp_path / "gaps")
    assert d.config["version"] == 3 and any(e["storage"] == "gaps" for e in d.config["params"].values())
    merge(c.base, tmp_path / "gaps", tmp_path / "m1")
    merge(c.base, tmp_path / "flat", tmp_path / "m2")
    for f in (tmp_path / "m1").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "m2" / f.name).read_bytes()


def _gap_delta(tmp_path):
    base, params, kw = _synthetic(tmp_path, tensors=2, rows=64, budget=200)
    return base, write_delta(tmp_path / "d", params, **kw)


def test_gap_storage_under_an_older_version_is_corrupt(tmp_path) -> None:
    _, d = _gap_delta(tmp_path)
    rewrite(d, config=lambda x: x.update(version=2))
    from safetensors.torch import load_file

    save_file(load_file(str(d / DELTA_FILE)), str(d / DELTA_FILE), metadata={"format": "id3-delta", "version": "2"})
    with pytest.raises(ID3Error, match="stored as 'gaps', which format version 3 introduced") as e:
        load_delta(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: torch.cat([t, torch.tensor([GAP_ESCAPE], dtype=torch.int64)]), "ends in an escape"),
        (lambda t: torch.cat([t[:1] + 60_000, t[1:]]), "out of range"),
        (lambda t: t[:-1], "indices but the config counts|shape"),
    ],
)
def test_broken_gap_codes_are_refused(tmp_path, edit, match) -> None:
    base, d = _gap_delta(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(d, broken)

    def change(t):
        k = "w0.weight.gaps"
        t[k] = edit(t[k].to(torch.int64)).to(torch.uint16)

    rewrite(broken, tensors=change)
    with pytest.raises(ID3Error, match=match):
        load_delta(broken, BaseModel.open(base))

"""Mask state round-trips through safetensors and re-slices onto any number of holders."""

from __future__ import annotations

import pytest
import torch

from id3_ds.algorithm.mask import MaskState, ParamMask, SliceMask
from id3_ds.algorithm.slices import ParamSlice
from id3_ds.checkpoint.mask_file import load_mask, save_mask
from id3_ds.errors import ID3Error


def _state() -> MaskState:
    g = torch.Generator().manual_seed(0)
    params = {}
    for name, shape in {"a.weight": (10, 7), "b.bias": (13,), "c": (3, 3, 3)}.items():
        n = torch.Size(shape).numel()
        idx = torch.sort(torch.randperm(n, generator=g)[: n // 3]).values
        params[name] = ParamMask(
            shape, idx, torch.randint(0, 9, (idx.numel(),), dtype=torch.int32), torch.randn(idx.numel())
        )
    return MaskState(params)


def _same(a: MaskState, b: MaskState) -> None:
    assert set(a.params) == set(b.params)
    for n in a.params:
        pa, pb = a.params[n], b.params[n]
        assert pa.shape == pb.shape
        assert torch.equal(pa.indices, pb.indices) and torch.equal(pa.chosen_at, pb.chosen_at)
        assert torch.equal(pa.base, pb.base)


def test_roundtrip_through_safetensors(tmp_path) -> None:
    st = _state()
    save_mask(st, tmp_path / "m.safetensors", meta={"step": 4})
    back, meta = load_mask(tmp_path / "m.safetensors")
    _same(st, back)
    assert meta == {"step": 4}


@pytest.mark.parametrize("pieces", [1, 2, 3, 5, 8])
def test_reslice_into_pieces_and_back(pieces: int, tmp_path) -> None:
    st = _state()
    shards = []
    for r in range(pieces):  # ZeRO-3 style: holder r owns [r*P, (r+1)*P) of every parameter
        items = []
        for name, pm in st.params.items():
            per = -(-pm.numel // pieces)
            start, numel = r * per, max(0, min(per, pm.numel - r * per))
            sl = ParamSlice(name, pm.shape, 0, start, numel)
            items.append((sl, st.slice_mask(sl)))
        shard = MaskState.from_slices(items)
        save_mask(shard, tmp_path / f"r{r}.safetensors")
        shards.append(load_mask(tmp_path / f"r{r}.safetensors")[0])
    _same(st, MaskState.union(shards))


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path) -> None:
    p = tmp_path / "m.safetensors"
    save_mask(_state(), p)
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ID3Error, match="corrupt"):
        load_mask(p)
    with pytest.raises(ID3Error, match="does not exist"):
        load_mask(tmp_path / "missing.safetensors")


def test_overlapping_shards_are_rejected() -> None:
    st = _state()
    with pytest.raises(ID3Error, match="overlap"):
        MaskState.union([st, st])


def test_slice_mask_add_keeps_positions_sorted() -> None:
    m = SliceMask()
    v = torch.arange(10, dtype=torch.float32)
    m.add(torch.tensor([5, 7]), 0, v)
    m.add(torch.tensor([1, 6, 9]), 1, v)
    assert m.positions.tolist() == [1, 5, 6, 7, 9]
    assert m.chosen_at.tolist() == [1, 0, 1, 0, 1]
    assert m.base.tolist() == [1, 5, 6, 7, 9]

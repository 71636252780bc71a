"""Every validation failure of a hand-broken delta is one clear ID3Error, and nothing is written."""

from __future__ import annotations

import shutil

import pytest
import torch

from id3_ds.delta import export_delta, load_delta, merge
from id3_ds.delta.base import BaseModel
from id3_ds.delta.format import CONFIG_FILE, DELTA_FILE
from id3_ds.errors import ID3Error
from tests.test_delta_common import rewrite

V = "model.layers.0.self_attn.v_proj.weight"
N = "model.norm.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory, shared_case):
    c = shared_case()
    out = tmp_path_factory.mktemp("fmt") / "delta"
    export_delta(c.ckpt, c.base, out, index="flat")  # int32 positions (the gap form: tests/test_delta_size.py)
    return c, out


@pytest.fixture
def broken(good, tmp_path):
    """A private copy of the good delta to break."""
    d = tmp_path / "delta"
    shutil.copytree(good[1], d)
    return good[0], d


def _fails(c, d, match: str, tmp_path) -> None:
    with pytest.raises(ID3Error, match=match):
        load_delta(d, BaseModel.open(c.base))
    with pytest.raises(ID3Error):
        merge(c.base, d, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_good_delta_loads_with_int32_indices(good) -> None:
    c, d = good
    delta = load_delta(d, BaseModel.open(c.base))
    assert delta.params[V].indices.dtype == torch.int32 and delta.params[N].dense
    assert delta.total_entries == 600


def test_truncated_file(broken, tmp_path) -> None:
    c, d = broken
    raw = (d / DELTA_FILE).read_bytes()
    (d / DELTA_FILE).write_bytes(raw[: len(raw) - 100])
    _fails(c, d, "truncated|corrupt", tmp_path)
    (d / DELTA_FILE).write_bytes(raw[:5])
    _fails(c, d, "truncated", tmp_path)


def test_wrong_shape_against_base(broken, tmp_path) -> None:
    c, d = broken

    def cfg(x):
        for k in (x["params"][N], x["base"]["fingerprint"]["tensors"][N]):
            k["shape"] = [8, 8]
        from id3_ds.delta.base import combine

        x["base"]["fingerprint"]["digest"] = combine(x["base"]["fingerprint"]["tensors"])

    rewrite(d, tensors=lambda t: t.update({f"{N}.dense": t[f"{N}.dense"].reshape(8, 8)}), config=cfg)
    _fails(c, d, "shape", tmp_path)


def test_tensor_shape_disagrees_with_config(broken, tmp_path) -> None:
    c, d = broken
    rewrite(d, tensors=lambda t: t.update({f"{N}.dense": t[f"{N}.dense"][:10]}))
    _fails(c, d, "wrong shape", tmp_path)


def test_index_out_of_range(broken, tmp_path) -> None:
    c, d = broken

    def t(x):
        x[f"{V}.indices"][-1] = 2048

    rewrite(d, tensors=t)
    _fails(c, d, "out of range", tmp_path)


def test_unsorted_indices(broken, tmp_path) -> None:
    c, d = broken
    rewrite(d, tensors=lambda x: x.update({f"{V}.indices": x[f"{V}.indices"].flip(0).contiguous()}))
    _fails(c, d, "not sorted and unique", tmp_path)


def test_duplicate_indices(broken, tmp_path) -> None:
    c, d = broken

    def t(x):
        x[f"{V}.indices"][1] = x[f"{V}.indices"][0]

    rewrite(d, tensors=t)
    _fails(c, d, "not sorted and unique", tmp_path)


def test_lengths_mismatch(broken, tmp_path) -> None:
    c, d = broken
    rewrite(d, tensors=lambda x: x.update({f"{V}.values": x[f"{V}.values"][:-1].contiguous()}))
    _fails(c, d, "wrong shape", tmp_path)


def test_count_disagrees_with_config(broken, tmp_path) -> None:
    c, d = broken

    def t(x):
        x[f"{V}.indices"] = x[f"{V}.indices"][:-1].contiguous()
        x[f"{V}.values"] = x[f"{V}.values"][:-1].contiguous()

    rewrite(d, tensors=t)
    _fails(c, d, "config counts", tmp_path)


def test_wrong_base(good, tmp_path) -> None:
    c, d = good
    other = tmp_path / "other"
    shutil.copytree(c.base, other)
    from tests.test_delta_common import tiny_llama

    tiny_llama(seed=3).save_pretrained(other, max_shard_size="100KB")
    with pytest.raises(ID3Error, match="pass --force"):
        load_delta(d, BaseModel.open(other))
    load_delta(d, BaseModel.open(other), force=True)


def test_name_absent_from_base(broken, tmp_path) -> None:
    c, d = broken

    def cfg(x):
        from id3_ds.delta.base import combine

        for k in ("params",):
            x[k]["model.extra.weight"] = x[k].pop(N)
        fpt = x["base"]["fingerprint"]["tensors"]
        fpt["model.extra.weight"] = fpt.pop(N)
        x["base"]["fingerprint"]["digest"] = combine(fpt)

    rewrite(d, tensors=lambda t: t.update({"model.extra.weight.dense": t.pop(f"{N}.dense")}), config=cfg)
    _fails(c, d, "not in the base model", tmp_path)


def test_base_dtype_mismatch(broken, tmp_path) -> None:
    c, d = broken

    def cfg(x):
        from id3_ds.delta.base import combine

        x["base"]["fingerprint"]["tensors"][V]["dtype"] = "BF16"
        x["base"]["fingerprint"]["digest"] = combine(x["base"]["fingerprint"]["tensors"])

    rewrite(d, config=cfg)
    _fails(c, d, "BF16 base", tmp_path)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda x: x.update(format="other"), "not an id3-ds delta"),
        (lambda x: x.update(total_entries=1), "total_entries"),
        (lambda x: x["base"]["fingerprint"].update(digest="0" * 64), "digest does not match"),
        (lambda x: x["params"][V].update(entries="many"), "malformed"),
    ],
)
def test_config_errors(broken, tmp_path, edit, match) -> None:
    c, d = broken
    rewrite(d, config=edit)
    _fails(c, d, match, tmp_path)


def test_missing_files_and_bad_json(broken, tmp_path) -> None:
    c, d = broken
    (d / CONFIG_FILE).write_text("{not json")
    _fails(c, d, "not valid JSON", tmp_path)
    (d / CONFIG_FILE).unlink()
    _fails(c, d, "missing", tmp_path)
    with pytest.raises(ID3Error, match="does not exist"):
        load_delta(tmp_path / "nowhere")


def test_nan_values_and_stray_tensors(broken, tmp_path) -> None:
    c, d = broken

    def t(x):
        x[f"{V}.values"][0] = float("nan")

    rewrite(d, tensors=t)
    _fails(c, d, "NaN", tmp_path)
    rewrite(d, tensors=lambda x: x.update({f"{V}.values": torch.zeros_like(x[f"{V}.values"]), "x.evil": torch.ones(1)}))
    _fails(c, d, "does not list", tmp_path)


def test_bf16_values_roundtrip(good, tmp_path) -> None:
    """A bf16 delta holds the fp32 delta's entries with each update rounded once to bf16 (no fix-ups), so
    base + update lands within bf16 rounding of the update on the trained weight."""
    c, fp32_dir = good
    export_delta(c.ckpt, c.base, tmp_path / "d", dtype="bf16")
    base = BaseModel.open(c.base)
    delta, exact = load_delta(tmp_path / "d", base), load_delta(fp32_dir, base)
    trained = c.model.state_dict()
    assert set(delta.params) == set(exact.params) and delta.total_entries == exact.total_entries == 600
    for name, p in delta.params.items():
        q = exact.params[name]
        assert p.values.dtype == torch.bfloat16 and p.fixes == 0, name
        assert p.dense == q.dense and (p.dense or torch.equal(p.indices, q.indices)), name
        assert torch.equal(p.values, q.values.to(torch.bfloat16)), name
        start, want = base.read(name)[0].float(), trained[name].float()
        err = (p.add_to(start) - want).abs()
        bound = (want - start).abs() * 2**-8 + want.abs() * 2**-24  # half a bf16 ulp of the update, fp32 sum
        assert bool((err <= bound).all()), f"{name}: {float((err - bound).max())} beyond bf16 rounding"
    with pytest.raises(ID3Error, match="--dtype"):
        export_delta(c.ckpt, c.base, tmp_path / "d2", dtype="int8")

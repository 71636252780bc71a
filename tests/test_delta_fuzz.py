"""Property-based fuzzing of the loader: a mutated delta either loads or raises ID3Error, never anything else."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from id3_ds.delta import export_delta, load_delta
from id3_ds.delta.base import BaseModel
from id3_ds.delta.format import CONFIG_FILE, DELTA_FILE
from id3_ds.errors import ID3Error

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Good:
    """An exported delta, read once: the raw tensor file and config every mutation starts from."""

    dir: Path
    raw: bytes
    cfg: dict
    base: BaseModel


@pytest.fixture(scope="module")
def good(tmp_path_factory, shared_case) -> Good:
    c = shared_case()
    d = tmp_path_factory.mktemp("fuzz") / "delta"
    export_delta(c.ckpt, c.base, d)
    return Good(d, (d / DELTA_FILE).read_bytes(), json.loads((d / CONFIG_FILE).read_text()), BaseModel.open(c.base))


def _load_or_own_error(good: Good, raw: bytes, cfg_text: str) -> None:
    """The property: a mutated delta loads, or fails with one ID3Error line; never another exception."""
    with tempfile.TemporaryDirectory() as tmp:  # per example: hypothesis runs many in one test call
        d = Path(tmp)
        (d / DELTA_FILE).write_bytes(raw)
        (d / CONFIG_FILE).write_text(cfg_text)
        try:
            delta = load_delta(d, good.base)
        except ID3Error as e:
            assert str(e) and "\n" not in str(e)
            return
        assert delta.total_entries == json.loads(cfg_text)["total_entries"]  # what loads is what it declares


edits = st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=8)


@FUZZ
@given(edits=edits, cut=st.one_of(st.none(), st.integers(min_value=0)))
def test_byte_mutations_of_the_tensor_file(good, edits, cut) -> None:
    buf = bytearray(good.raw)
    for pos, val in edits:
        buf[pos % len(buf)] = val
    if cut is not None:
        buf = buf[: cut % (len(buf) + 1)]
    _load_or_own_error(good, bytes(buf), json.dumps(good.cfg))


@FUZZ
@given(edits=edits)
def test_header_mutations_of_the_tensor_file(good, edits) -> None:
    """Concentrate edits in the JSON header, where the structure lives."""
    n = int.from_bytes(good.raw[:8], "little")
    buf = bytearray(good.raw)
    for pos, val in edits:
        buf[pos % (n + 8)] = val
    _load_or_own_error(good, bytes(buf), json.dumps(good.cfg))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@FUZZ
@given(data=st.data())
def test_config_mutations(good, data) -> None:
    cfg = json.loads(json.dumps(good.cfg))  # a private copy to mutate
    paths = [p for p in _paths(cfg) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = cfg
        for k in path[:-1]:
            node = node[k]
        if data.draw(st.booleans()) and isinstance(node, dict):
            node.pop(path[-1], None)
        else:
            node[path[-1]] = data.draw(json_values)
        paths = [p for p in _paths(cfg) if p]
        if not paths:
            break
    _load_or_own_error(good, good.raw, json.dumps(cfg))


@FUZZ
@given(text=st.text(max_size=200))
def test_arbitrary_config_text(good, text) -> None:
    _load_or_own_error(good, good.raw, text)


def test_the_unmutated_delta_loads(good) -> None:
    assert load_delta(good.dir, good.base).total_entries == good.cfg["total_entries"] == 600

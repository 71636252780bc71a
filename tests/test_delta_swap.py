"""Live swap: apply_delta / remove_delta on a loaded model restore the base bit for bit, in any order that
loses nothing, in fp32 and bf16; a Delta's repr stays one short line."""

from __future__ import annotations

import shutil

import pytest
import torch

from id3_ds.delta import apply as apply_mod
from id3_ds.delta import apply_delta, load_delta, remove_delta
from id3_ds.delta.apply import applied_deltas
from id3_ds.errors import ID3Error
from tests.test_delta_common import rewrite, two_deltas


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return two_deltas(tmp_path_factory.mktemp("swap"))


def _coarse(d1, out):
    """d1 with every update set to 0.75: b + 0.75 rounds away b's low bits, so subtracting 0.75 again cannot
    give b back (the case an arithmetic inverse gets wrong, for any dtype)."""
    shutil.copytree(d1, out)

    def edit(t):
        for k in t:
            if k.endswith((".values", ".dense")):
                t[k] = torch.full_like(t[k], 0.75)
            elif k.endswith(".fix"):
                t[k] = torch.zeros_like(t[k])

    rewrite(out, tensors=edit)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_then_remove_is_bit_identical(two, tmp_path, dtype) -> None:
    c, d1, _ = two
    coarse = _coarse(d1, tmp_path / "coarse")
    for delta in (d1, coarse):
        model = _load(c.base, dtype)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        apply_delta(model, delta, force=dtype != torch.float32)  # the fingerprint is of the fp32 base file
        assert sum(int((v != base[k]).sum()) for k, v in model.state_dict().items()) > 1000
        remove_delta(model, delta)
        assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items()), (delta, dtype)
        assert applied_deltas(model) == []
    apply_delta(model, coarse, force=True)
    model.__dict__[apply_mod._RECORDS].clear()  # a model with no record: only the arithmetic inverse is left
    with pytest.raises(ID3Error, match="was not applied to this model"):
        remove_delta(model, coarse)
    remove_delta(model, coarse, exact=False)  # fl(fl(b + d) - d) misses entries: why apply keeps the values
    assert sum(int((v != base[k]).sum()) for k, v in model.state_dict().items()) > 100


def test_swap_one_delta_for_another_and_stacked_order(two) -> None:
    c, d1, d2 = two
    model = _load(c.base)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_delta(model, d1)
    after1 = {k: v.clone() for k, v in model.state_dict().items()}
    remove_delta(model, d1)
    apply_delta(model, d2)  # the swap: the model is the base again, so d2's fingerprint holds
    remove_delta(model, d2)
    apply_delta(model, d1)
    assert all(torch.equal(v, after1[k]) for k, v in model.state_dict().items())
    apply_delta(model, d2, force=True)  # stacked: d2's tensors are no longer the base
    shared = load_delta(d1).params.keys() & load_delta(d2).params.keys()
    assert shared  # both trained some of the same tensors
    with pytest.raises(ID3Error, match="remove .*d2/' first") as e:
        remove_delta(model, d1)  # d2 changed entries d1 also changed: restoring d1's would lose d2's
    assert "\n" not in str(e.value)
    remove_delta(model, d2)
    remove_delta(model, d1)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    with pytest.raises(ID3Error, match="was not applied to this model"):
        remove_delta(model, d1)


def test_repr_is_one_short_line(two) -> None:
    _, d1, _ = two
    d = load_delta(d1)
    text = repr(d)
    assert "\n" not in text and len(text) < 300 and "2,000 entries" in text and "tensor(" not in text
    p = next(iter(d.params.values()))
    assert "tensor(" not in repr(p) and len(repr(p)) < 100

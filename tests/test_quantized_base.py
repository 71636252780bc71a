"""A quantized frozen base for sparse-state ID3 (`model.quantization: nf4 | int8`, issue 16).

Unit tests (no launch): the custom Function's outputs and gradients against autograd on the dense effective
weight; training steps change nothing but the overlay at chosen entries; save/load on a freshly quantized
base continues bit-identically; preflight refusals. One launched pair (2 ranks, ZeRO-2, nf4) covers the
trainer: it trains, ranks agree, a killed run resumes to the same state, and the exported delta merged into
the unquantized base gives the trained values at chosen entries and the base elsewhere.
"""

from __future__ import annotations

import json

import pytest
import torch

from id3_ds.algorithm import ID3Config, SparseID3
from id3_ds.config import load_config
from id3_ds.errors import ID3Error
from id3_ds.models.quantized import (
    QuantizedLinear,
    QuantizedWeight,
    dequantized_reference,
    quantize_selectable,
    quantized_names,
)
from id3_ds.training import preflight as pf
from tests.launcher import TINY_CONFIG

pytest.importorskip("bitsandbytes")

KINDS = ["nf4", "int8"]
LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)
STEPS, LR = 4, 1e-2


def quantized_llama(kind: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny LLaMA whose linear layers (lm_head too) are quantized; embeddings and norms stay parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).to(dtype)
    linears = [f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    quantize_selectable(model, linears, kind)
    return model


def batches(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, LLAMA["vocab_size"], (2, 12), generator=g) for _ in range(steps)]


def driver(model: torch.nn.Module, budget: int = 300) -> SparseID3:
    # embeddings and norms frozen: every chosen entry is in a quantized weight
    cfg = ID3Config(budget=budget, targets=("*proj.weight", "lm_head.weight"))
    return SparseID3.from_module(model, cfg, STEPS, lr=LR, weight_decay=0.1, max_grad_norm=1.0)


def train(drv: SparseID3, model: torch.nn.Module, data: list[torch.Tensor]) -> None:
    for ids in data:
        model(input_ids=ids, labels=ids).loss.backward()
        drv.step()


def quantized(model: torch.nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_function_gives_autograds_outputs_and_gradients_on_the_effective_weight(kind, dtype) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 24).to(dtype)
    q = QuantizedLinear(linear, kind)
    q.write(torch.tensor([0, 5, 100, 1151]), torch.tensor([0.5, -0.25, 1.0, 2.0]))
    w = q.effective_weight().clone().requires_grad_(True)
    bias = q.bias.detach().clone().requires_grad_(True)
    x = torch.randn(3, 5, 48, dtype=dtype)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = torch.nn.functional.linear(xa, w, bias)
    got = q(xb)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    grad_out = torch.randn_like(want)
    want.backward(grad_out)
    got.backward(grad_out)
    torch.testing.assert_close(xb.grad, xa.grad, **tol)
    torch.testing.assert_close(q.weight_grad.view_as(w), w.grad, **tol)  # dW of the effective weight
    torch.testing.assert_close(q.bias.grad, bias.grad, **tol)
    assert w.view(-1)[[0, 5, 100, 1151]].float().tolist() == [0.5, -0.25, 1.0, 2.0]


def test_backward_reaches_a_quantized_layer_when_nothing_upstream_requires_grad() -> None:
    q = QuantizedLinear(torch.nn.Linear(8, 4, bias=False), "nf4")
    x = torch.randn(2, 8)  # a frozen embedding's output: requires no grad
    q(x).sum().backward()
    assert q.weight_grad is not None and q.weight_grad.shape == (32,)


@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_only_the_overlay_at_exactly_the_chosen_entries(kind) -> None:
    model = quantized_llama(kind)
    layers = quantized(model)
    packed = {n: m.qweight.packed.clone() for n, m in layers.items()}
    base = {n: m.qweight.dequantize() for n, m in layers.items()}
    drv = driver(model)
    train(drv, model, batches(STEPS))
    state = drv.state()
    assert len(state) == drv.id3.budget == 300
    moved = 0
    for name, m in layers.items():
        assert torch.equal(m.qweight.packed, packed[name]), name  # the base is never written
        pm = state.params[f"{name}.weight"]
        assert torch.equal(m.positions, pm.indices), name  # the overlay is exactly the chosen entries
        assert torch.equal(m.values, pm.value.to(m.values.dtype)), name  # ... holding the rounded masters
        diff = (m.effective_weight() != base[name]).view(-1).nonzero().flatten()
        assert bool(torch.isin(diff, pm.indices).all()), name  # nothing else differs from the base
        assert torch.equal(pm.base, base[name].view(-1)[pm.indices]), name  # masters started at dequantize(W)
        moved += diff.numel()
    assert moved > 0.9 * 300


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_on_a_requantized_base_continue_the_uninterrupted_run(tmp_path, kind) -> None:
    data = batches(STEPS)
    whole = quantized_llama(kind)
    train(driver(whole), whole, data)

    first = quantized_llama(kind)
    drv = driver(first)
    train(drv, first, data[:2])
    drv.save(tmp_path / "sparse.safetensors")
    resumed = quantized_llama(kind)  # quantized again from the same weights: the same packed base
    again = driver(resumed)
    again.load(tmp_path / "sparse.safetensors")
    train(again, resumed, data[2:])
    for (name, a), b in zip(quantized(whole).items(), quantized(resumed).values()):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.values, b.values), name


@pytest.mark.parametrize("kind", KINDS)
def test_the_export_reference_is_what_training_starts_from(kind) -> None:
    w = torch.randn(16, 64, dtype=torch.bfloat16)
    assert torch.equal(dequantized_reference(w, kind), QuantizedWeight(w, kind).dequantize())
    assert QuantizedWeight(w, kind).dequantize().dtype == torch.bfloat16


def test_only_untied_selectable_linears_are_quantized() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=True))
    names = [n for n, _ in model.named_parameters()]  # lm_head.weight is embed_tokens.weight: not listed
    quantize_selectable(model, names, "nf4")
    got = quantized_names(model)
    assert len(got) == 7 and all(n.endswith("proj.weight") for n in got)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ID3Error, match="no selectable weight is an nn.Linear"):
        quantize_selectable(model, ["model.norm.weight"], "nf4")


QUANT = ["id3.state=sparse", "model.quantization=nf4", "deepspeed.zero_optimization.stage=2"]


def _check(tmp_path, *overrides: str) -> None:
    cfg = load_config(TINY_CONFIG, [f"train.output_dir={tmp_path / 'out'}", *overrides])
    pf.preflight(cfg)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["id3.state=dense"], "needs id3.state=sparse"),
        (["deepspeed.zero_optimization.stage=3"], "does not work with ZeRO stage 3"),
        (["method=full", "train.export_delta=false"], "does not support method 'full'"),
        (["method=fish"], "does not support method 'fish'"),
        (["method=bitfit"], "does not support method 'bitfit'"),
        (["lora.rank=4"], "with LoRA is not supported"),
        (["train.save_final_model=true"], "no dense weights to save"),
        (["model.quantization=fp8"], "model.quantization"),
    ],
)
def test_preflight_refuses_what_a_quantized_base_cannot_run_with_in_one_line(tmp_path, overrides, message) -> None:
    with pytest.raises(ID3Error) as e:
        _check(tmp_path, *QUANT, *overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_preflight_accepts_sparse_id3_on_a_quantized_base(tmp_path, stage) -> None:
    _check(tmp_path, *QUANT, f"deepspeed.zero_optimization.stage={stage}", "model.quantization=int8")


def _json(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]

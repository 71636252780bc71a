"""A quantized frozen base for sparse-state ID3 (`model.quantization: nf4 | int8`, issue 16).

Unit tests (no launch): the custom Function's outputs and gradients against autograd on the dense effective
weight; training steps change nothing but the overlay at chosen entries; save/load on a freshly quantized
base continues bit-identically; preflight refusals. One module fixture of launched runs (2 ranks, ZeRO-2,
nf4) covers the trainer: sparse ID3 trains, ranks agree, a killed run resumes to the same state, and the
exported delta merged into the unquantized base gives the trained values at chosen entries and the base
elsewhere; QLoRA (method lora on the same nf4 base, the memory baseline) trains and resumes.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from id3_ds.algorithm import ID3Config, SparseID3
from id3_ds.checkpoint.mask_file import load_mask, save_mask
from id3_ds.config import load_config
from id3_ds.errors import ID3Error
from id3_ds.models.quantized import (
    QuantizedLinear,
    QuantizedWeight,
    dequantized_reference,
    quantize_selectable,
    quantized_names,
)
from id3_ds.recipe import preflight as pf
from tests.launcher import TINY_CONFIG

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
NF4_HALF_GAP = (1.0 - 0.6961928009986877) / 2  # README: a merged model's bound on unchosen entries


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


def test_a_grad_hook_reads_the_weight_backward_built_instead_of_dequantizing_again(monkeypatch) -> None:
    q = QuantizedLinear(torch.nn.Linear(64, 32), "nf4")
    q.write(torch.tensor([3, 40]), torch.tensor([0.5, -1.0]))
    want = q.effective_weight()
    calls, seen = [], []
    dequantize = QuantizedWeight.dequantize
    monkeypatch.setattr(QuantizedWeight, "dequantize", lambda self: calls.append(1) or dequantize(self))
    access = q.held_weights()["weight"]
    q.grad_hook = lambda m: seen.append(access.value().clone())
    x = torch.randn(2, 64, requires_grad=True)
    q(x).sum().backward()
    assert len(calls) == 2  # forward's and backward's: the hook's read cost none
    assert len(seen) == 1 and torch.equal(seen[0], want.view(-1))
    assert torch.equal(access.value(), want.view(-1)) and len(calls) == 3  # outside the hook: a fresh one
    q(torch.randn(2, 64)).sum().backward()  # no grad_x needed: backward builds no weight, the hook dequantizes
    assert len(calls) == 5 and torch.equal(seen[1], want.view(-1))


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
    save_mask(drv.state(), tmp_path / "sparse.safetensors", drv.state_meta())
    resumed = quantized_llama(kind)  # quantized again from the same weights: the same packed base
    again = driver(resumed)
    again.load_state(*load_mask(tmp_path / "sparse.safetensors"))
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


class DeviceMixes(TorchDispatchMode):
    """Records every op whose tensors (inputs and outputs, 0-dim CPU scalars aside, as CUDA allows them) sit on
    more than one device: on a GPU such an op raises, or copies through the host."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if len({t.device.type for t in tensors if t.dim() > 0 or t.device.type != "cpu"}) > 1:
            self.mixed.append(str(func))
        return out


@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_layer_keeps_every_tensor_on_its_weights_device(kind) -> None:
    # "meta" stands in for a GPU: bitsandbytes' ops have meta kernels, and a CPU tensor anywhere shows
    device = torch.device("meta")
    with DeviceMixes() as mode:
        q = QuantizedLinear(torch.nn.Linear(64, 32, device=device), kind)
        q.write(torch.tensor([0, 5, 2047], device=device), torch.tensor([0.5, -0.25, 1.0], device=device))
        x = torch.randn(2, 3, 64, device=device, requires_grad=True)
        q(x).sum().backward()
        q(x).sum().backward()  # a second micro-batch accumulates into weight_grad
        access = q.held_weights()["weight"]
        value, grad = access.value(), access.take_grad()
        reference = dequantized_reference(torch.randn(32, 64, device=device), kind)
    assert mode.mixed == []
    qw = q.qweight
    held = [qw.packed, *qw.backend.constants(qw.state), q.positions, q.values, q.anchor, q.bias]
    made = [value, grad, reference, x.grad, q.bias.grad]
    assert {t.device for t in held + made} == {device}


@pytest.mark.parametrize("kind", KINDS)
def test_moving_a_quantized_layer_moves_its_base_overlay_and_constants(kind) -> None:
    q = QuantizedLinear(torch.nn.Linear(64, 32), kind)
    q.write(torch.tensor([1, 7]), torch.tensor([0.5, 1.0]))
    q.to("meta")
    qw = q.qweight
    held = [qw.packed, *qw.backend.constants(qw.state), q.positions, q.values, q.anchor, q.bias]
    assert {t.device.type for t in held} == {"meta"}


def _two_layers(kind: str, sim: bool) -> torch.nn.Module:
    """Two bias-free quantized layers; `sim`: every tensor they hold on the simulated device (device_sim.py)."""
    from benchmarks.device_sim import on_device

    torch.manual_seed(0)
    layers = [QuantizedLinear(torch.nn.Linear(i, o, bias=False), kind) for i, o in ((64, 48), (48, 32))]
    for q in layers if sim else []:
        qw = q.qweight
        qw.packed = on_device(qw.packed)
        if kind == "nf4":
            qw.state.absmax, qw.state.code = on_device(qw.state.absmax), on_device(qw.state.code)
        else:
            qw.state = on_device(qw.state)
        q.positions, q.values = on_device(q.positions), on_device(q.values)
        q.anchor = on_device(torch.zeros(0)).requires_grad_()
    return torch.nn.Sequential(layers[0], torch.nn.Tanh(), layers[1])


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_id3_on_a_quantized_base_runs_on_the_device_as_it_runs_on_the_cpu(kind) -> None:
    # CUDA would refuse nothing, syncs stay the step's constant (none in the quantized layer), same overlay
    from benchmarks.device_sim import SimTensor, SyncCounter, on_device

    overlays = {}
    for sim in (False, True):
        model = _two_layers(kind, sim)
        drv = SparseID3.from_module(model, ID3Config(budget=200, targets=("*",)), 4, lr=LR, weight_decay=0.1)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(4, 64, generator=g)
            with SyncCounter() as mode:
                model(on_device(x) if sim else x).square().mean().backward()
                drv.step()
            assert mode.refused == 0, mode.table()
            assert mode.syncs <= 4 and not [e for e in mode.table() if "models/quantized" in e[2]], mode.table()
        layers = [model[0], model[2]]
        if sim:
            assert all(isinstance(t, SimTensor) for q in layers for t in (q.positions, q.values))
        unwrap = lambda t: t.elem if isinstance(t, SimTensor) else t  # noqa: E731
        overlays[sim] = [(unwrap(q.positions), unwrap(q.values)) for q in layers]
    for (pc, vc), (pd, vd) in zip(overlays[False], overlays[True]):
        assert pc.numel() > 0 and torch.equal(pc, pd) and torch.equal(vc, vd)


def test_qloras_base_is_packed_by_the_same_quantizer_as_bitsandbytes_own_linear4bit() -> None:
    # the one quantizer (QuantizedWeight) gives bnb.nn.Linear4bit exactly what quantizing on its first move gives
    import bitsandbytes as bnb

    from id3_ds.models.quantized import quantize_for_lora

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    own = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4", device="meta")
    own.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
    own.bias = linear.bias
    own = own.to("cpu")  # Params4bit quantizes on its first move
    holder = torch.nn.Sequential(linear)
    assert quantize_for_lora(holder) == 1
    ours = holder[0]
    assert type(ours) is bnb.nn.Linear4bit
    assert torch.equal(ours.weight.data, own.weight.data)
    for key, value in own.weight.quant_state.as_dict(packed=True).items():
        mine = ours.weight.quant_state.as_dict(packed=True)[key]
        assert torch.equal(mine, value) if isinstance(value, torch.Tensor) else mine == value, key
    x = torch.randn(3, 64)
    assert torch.equal(ours(x), own(x))


def test_a_small_weight_dequantizes_on_one_thread_and_a_large_one_on_torchs_count() -> None:
    # bitsandbytes' CPU kernels open an OpenMP region per call: bounded as torch bounds its own small ops
    from id3_ds.models.quantized import GRAIN, cpu_threads_for

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = {}
        with cpu_threads_for(torch.device("cpu"), 64 * 172):
            seen["small"] = torch.get_num_threads()
        with cpu_threads_for(torch.device("cpu"), 4 * GRAIN):
            seen["large"] = torch.get_num_threads()
        with cpu_threads_for(torch.device("meta"), 10):
            seen["not cpu"] = torch.get_num_threads()
        with pytest.raises(ValueError), cpu_threads_for(torch.device("cpu"), 10):
            raise ValueError
        assert seen == {"small": 1, "large": 2, "not cpu": 2}
        assert torch.get_num_threads() == 2  # restored, after an error too
    finally:
        torch.set_num_threads(before)


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
        (["lora.rank=4"], "does not support ID3 over LoRA"),
        (["method=lora", "lora.rank=4", "model.quantization=int8", "train.export_delta=false"], "supports nf4 on"),
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


# -- the trainer: 2 ranks, ZeRO-2 (run as stage 0: see ds_config._sparse_state), nf4 ---------------------------

RUN_STEPS = 6
RUN = [
    *QUANT,
    "id3.budget=600",
    f"train.steps={RUN_STEPS}",
    "train.save_steps=3",
    "train.log_steps=1",
    "train.micro_batch_size=2",
    "train.export_delta=true",
    "model.gradient_checkpointing=true",  # a recomputed forward must hand dW over once per backward
]


QLORA = [  # PEFT LoRA on the same nf4 base: the baseline of the memory comparison
    "method=lora",
    "lora.rank=4",
    "model.quantization=nf4",
    "deepspeed.zero_optimization.stage=2",
    "train.steps=4",
    "train.save_steps=2",
    "train.log_steps=1",
    "train.micro_batch_size=2",
    "train.export_delta=false",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env) -> dict:
    """One uninterrupted run and one killed after step 4 (its last checkpoint: step 3), then resumed."""
    from tests.launcher import ok
    from tests.launcher import train as launch

    out = {name: tmp_path_factory.mktemp(name) for name in ("whole", "killed")}
    out["whole_log"] = ok(launch([*RUN, f"train.output_dir={out['whole']}"], env=env)).stdout
    killed = launch([*RUN, f"train.output_dir={out['killed']}"], env={**env, "ID3_DS_FAULT": "kill_after_step:4:1"})
    assert killed.returncode != 0
    out["resumed_log"] = ok(launch([*RUN, f"train.output_dir={out['killed']}"], env=env)).stdout
    out["qlora"] = tmp_path_factory.mktemp("qlora")
    qlora = launch([*QLORA, f"train.output_dir={out['qlora']}"], env={**env, "ID3_DS_FAULT": "kill_after_step:3:1"})
    assert qlora.returncode != 0
    out["qlora_log"] = qlora.stdout + ok(launch([*QLORA, f"train.output_dir={out['qlora']}"], env=env)).stdout
    return out


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_train_sparse_id3_on_an_nf4_base_and_agree(runs) -> None:
    from id3_ds.checkpoint import checkpoint_dir, read_id3_state

    assert "model.quantization=nf4: 15 linear weights packed" in runs["whole_log"]
    steps = [r for r in _log(runs["whole"]) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, RUN_STEPS + 1))
    assert steps[-1]["chosen"] == steps[-1]["budget"] == 600
    assert all(r["grad_norm"] > 0 for r in steps)
    # every save compares the ranks' replicated state (winners digest, masters, moments): the run got past it
    state, meta = read_id3_state(checkpoint_dir(runs["whole"], RUN_STEPS))
    assert meta["state"] == "sparse" and len(state) == 600
    chosen_in = {n for n, pm in state.params.items() if pm.indices.numel()}
    assert len(chosen_in & set(quantized_names_of(runs))) >= 5  # quantized weights trained, next to embeddings


def quantized_names_of(runs) -> list[str]:
    from id3_ds.checkpoint import checkpoint_dir, read_complete

    info = read_complete(checkpoint_dir(runs["whole"], RUN_STEPS))
    assert info["model"]["quantization"] == "nf4"
    return info["model"]["quantized"]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_runs_state(runs) -> None:
    from id3_ds.checkpoint import checkpoint_dir, read_id3_state

    assert "resumed from" in runs["resumed_log"]
    a, ameta = read_id3_state(checkpoint_dir(runs["whole"], RUN_STEPS))
    b, bmeta = read_id3_state(checkpoint_dir(runs["killed"], RUN_STEPS))
    assert ameta == bmeta  # the winners digest chains every step's winners
    for n, pm in a.params.items():
        for f in ("indices", "value", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(pm, f), getattr(b.params[n], f)), (n, f)
    losses = [[r["loss"] for r in _log(d) if "loss" in r] for d in (runs["whole"], runs["killed"])]
    assert losses[0][-2:] == losses[1][-2:]


@pytest.mark.distributed
@pytest.mark.slow
def test_the_delta_merged_into_the_unquantized_base_gives_trained_values_at_chosen_entries(
    runs, base_dir, tmp_path
) -> None:
    from id3_ds.checkpoint import checkpoint_dir, read_id3_state
    from id3_ds.delta.merge import merge
    from tests.launcher import weights

    merge(base_dir, runs["whole"] / "delta", tmp_path / "merged")
    merged, base = weights(tmp_path / "merged"), weights(base_dir)
    state, _ = read_id3_state(checkpoint_dir(runs["whole"], RUN_STEPS))
    names = quantized_names_of(runs)
    for name, w in base.items():
        m = merged[name].reshape(-1)
        pm = state.params.get(name)
        at = pm.indices if pm is not None else torch.empty(0, dtype=torch.int64)
        if pm is not None:
            assert torch.equal(m[at], pm.value.to(m.dtype)), name  # the trained (fp32) masters
        rest = torch.ones(m.numel(), dtype=torch.bool)
        rest[at] = False
        assert torch.equal(m[rest], w.reshape(-1)[rest]), name  # the unquantized base, not what training saw
        if name in names:  # how far the merged model is from the trained quantized one: the nf4 error there
            flat = w.reshape(-1)
            err = (dequantized_reference(w, "nf4").reshape(-1) - flat)[rest].abs()
            # half NF4's widest code gap (-1 to -0.6962) times the absmax of the entry's 64-entry block
            bound = (NF4_HALF_GAP * flat.reshape(-1, 64).abs().amax(1)).repeat_interleave(64)[rest]
            assert float(err.max()) > 0 and bool((err <= bound * (1 + 1e-6)).all()), name


@pytest.mark.distributed
@pytest.mark.slow
def test_qlora_trains_peft_lora_on_linear4bit_layers_and_resumes(runs) -> None:
    assert "model.quantization=nf4: 14 linear layers as bitsandbytes Linear4bit (QLoRA)" in runs["qlora_log"]
    assert "resumed from" in runs["qlora_log"]
    records = [r for r in _log(runs["qlora"]) if "loss" in r]
    # killed after step 3 (last checkpoint: step 2): the resumed run redoes step 3 exactly, then step 4
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4]
    assert records[2]["loss"] == records[3]["loss"] and records[2]["grad_norm"] == records[3]["grad_norm"]


def test_the_memory_benchmark_gives_id3_the_trainable_count_of_qlora(base_dir) -> None:
    """benchmarks/bench_quantized.py compares at one trainable count: id3.budget = PEFT LoRA's count on LINEAR."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from benchmarks.bench_quantized import LINEAR, lora_count, variants

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules=LINEAR))
    peft_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_count(base_dir, 4) == peft_count
    assert f"id3.budget={peft_count}" in variants(4, peft_count)["id3 sparse, nf4"]

"""A quantized frozen base (`model.quantization: nf4 | int8`): sparse-state ID3 on it, and QLoRA's base.

Why: sparse state (`id3.state: sparse`) already keeps optimizer state for the B chosen entries only, so
the base weights are what is left of a run's memory. Storing them as bitsandbytes does for QLoRA (4-bit
NF4, or 8-bit) brings sparse ID3 down to what QLoRA costs, while still training individual weights.

One mechanism serves both, in PEFT's style of one class per quantization backend:

- a `QuantBackend` per kind (`BACKENDS`) knows how bitsandbytes packs and dequantizes a weight, which
  tensors hold its constants, and which bitsandbytes layer PEFT's LoRA wraps for it. nf4 =
  `quantize_4bit` (blocks of 64: 0.5 B + 4/64 B per entry with an fp32 absmax, what sparse ID3 stores;
  QLoRA's base packs the absmax again, double quantization, as `bnb.nn.Linear4bit` does by default);
  int8 = `int8_vectorwise_quant` (one absmax per output row: what `bnb.nn.Linear8bitLt` stores);
- `QuantizedWeight` is one packed weight (the only quantizer: sparse ID3's layer and QLoRA's
  `bnb.nn.Linear4bit` are both built from it, so both train on the same 4-bit codes);
- `replace_linears` is the one module swap: `quantize_selectable` puts a `QuantizedLinear` in place of
  each selectable nn.Linear (sparse ID3), `quantize_for_lora` the backend's bitsandbytes layer (QLoRA).

What a `QuantizedLinear` holds in place of an `nn.Linear`'s weight:

- the packed base, `QuantizedWeight` (not a Parameter, not a buffer: nothing casts, saves or broadcasts
  it; the model is re-quantized deterministically from the unquantized base at every load);
- an overlay: the chosen entries' sorted flat positions and values in the model dtype, written by the
  sparse update (`QuantizedAccess.write`); the base itself can never be written in place;
- the bias, an ordinary Parameter.
Every tensor it holds or makes lives on the packed weight's device (a GPU base dequantizes there with
bitsandbytes' CUDA kernels); moving the module moves them all.

Forward computes with W = dequantize(packed), W.view(-1)[positions] = values (the *effective* weight).
`_QuantizedLinearFn` recomputes W in backward instead of saving it (one layer's dense weight at a time,
as bitsandbytes' own 4-bit matmul does), returns grad_x and hands the dense dW (the gradient with respect
to the effective weight) to the module: it is accumulated into `weight_grad` (plain torch, like `.grad`)
and then passed to `grad_hook` when one is set (the DeepSpeed sparse update reduces and scores it there,
like a post-accumulate-grad hook; the W backward built is lent to that hook, not dequantized again). A
zero-size `anchor` requiring grad is an input of the Function, so backward reaches it even when nothing
upstream requires grad (frozen embeddings).

Speed on CPU: bitsandbytes' CPU kernels open an OpenMP region for every call; `cpu_threads_for` gives a
small weight one thread, as torch does for its own small ops, so several ranks sharing the cores do not
wait on each other's descheduled threads at every layer.

Scoring therefore uses the gradient w.r.t. the effective weight and |theta| of the effective weight, and a
newly chosen entry's fp32 master starts at its dequantized value. Export: the masters are effective-weight
values; the delta against the unquantized base (master - W_base) merged into that base gives the trained
value at every chosen entry and the unquantized base elsewhere, where training saw dequantize(W_base).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from id3_ds.errors import ID3Error

KINDS = ("nf4", "int8")
NF4_BLOCK = 64  # bnb.nn.Linear4bit's (and QLoRA's) block size
# torch's at::internal::GRAIN_SIZE: below this many entries per thread torch runs its own ops on one thread
GRAIN = 32768


def _bnb_functional():
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise ID3Error(
            "model.quantization needs bitsandbytes: pip install bitsandbytes (or set model.quantization=none)"
        ) from None
    return bnbf


@contextlib.contextmanager
def cpu_threads_for(device: torch.device, numel: int) -> Iterator[None]:
    """Run a bitsandbytes CPU kernel over `numel` entries on as many threads as torch would give the same work.

    Why: bitsandbytes' CPU kernels open an OpenMP parallel region for every call, however small the weight,
    while torch's own ops stay on one thread below GRAIN entries per thread. With several ranks sharing a
    machine's cores (the `deepspeed` launcher leaves OMP_NUM_THREADS unset), each of those regions waits for
    a descheduled thread: a 64 x 172 dequantize took ~3 ms instead of ~0.1 ms. Both share torch's OpenMP
    runtime, so lowering torch's thread count around the call bounds the kernel's threads too. Not CPU: no-op.
    """
    if device.type != "cpu":
        yield
        return
    have = torch.get_num_threads()
    want = max(1, min(have, -(-numel // GRAIN)))
    if want == have:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(have)


class QuantBackend:
    """One quantization kind, as bitsandbytes stores it: how a weight is packed and dequantized, which tensors
    hold its constants, and the bitsandbytes layer that PEFT's LoRA wraps for it (QLoRA). Every op runs on the
    packed tensors' device, so a base packed on a GPU dequantizes there with bitsandbytes' CUDA kernels."""

    kind = ""

    def pack(self, weight: torch.Tensor, double_quant: bool) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def dequantize(self, packed: torch.Tensor, state: Any) -> torch.Tensor:
        """The dense base, in bitsandbytes' output dtype (flat or shaped: the caller views it)."""
        raise NotImplementedError

    def constants(self, state: Any) -> list[torch.Tensor]:
        """The tensors of the quantization state (absmax, ...): counted in `nbytes`, moved with the weight."""
        raise NotImplementedError

    def moved(self, state: Any, device: torch.device) -> Any:
        raise NotImplementedError

    def lora_base(self, qweight: QuantizedWeight, linear: torch.nn.Linear) -> torch.nn.Module:
        """The bitsandbytes layer holding `qweight` that PEFT recognises and puts its own LoRA layer on."""
        raise ID3Error(f"method lora with model.quantization={self.kind} is not supported; use nf4 (QLoRA) or none")


class NF4Backend(QuantBackend):
    """`quantize_4bit` in blocks of 64 (0.5 B + 4/64 B per entry; double_quant packs the absmax to 8 bits as
    QLoRA's `bnb_4bit_use_double_quant` does); its base layer for LoRA is `bnb.nn.Linear4bit`."""

    kind = "nf4"

    def pack(self, weight: torch.Tensor, double_quant: bool) -> tuple[torch.Tensor, Any]:
        with cpu_threads_for(weight.device, weight.numel()):
            return _bnb_functional().quantize_4bit(
                weight, blocksize=NF4_BLOCK, compress_statistics=double_quant, quant_type="nf4"
            )

    def dequantize(self, packed: torch.Tensor, state: Any) -> torch.Tensor:
        with cpu_threads_for(packed.device, 2 * packed.numel()):
            return _bnb_functional().dequantize_4bit(packed, state)

    def constants(self, state: Any) -> list[torch.Tensor]:
        nested = [state.offset, state.state2.absmax, state.state2.code] if state.nested else []
        return [state.absmax, *nested]

    def moved(self, state: Any, device: torch.device) -> Any:
        state.to(device)  # QuantState.to moves its tensors in place
        return state

    def lora_base(self, qweight: QuantizedWeight, linear: torch.nn.Linear) -> torch.nn.Module:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=qweight.dtype,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            qweight.packed,
            requires_grad=False,
            quant_state=qweight.state,
            blocksize=NF4_BLOCK,
            compress_statistics=qweight.state.nested,
            quant_type="nf4",
            module=layer,
            bnb_quantized=True,  # already packed: moving it never quantizes again
        )
        layer.quant_state = qweight.state
        layer.bias = linear.bias
        return layer


class Int8Backend(QuantBackend):
    """`int8_vectorwise_quant`: one absmax per output row (1 B per entry + 4 B per row), what
    `bnb.nn.Linear8bitLt`, the 8-bit LoRA base, stores."""

    kind = "int8"

    def pack(self, weight: torch.Tensor, double_quant: bool) -> tuple[torch.Tensor, Any]:
        packed, state, _ = _bnb_functional().int8_vectorwise_quant(weight)
        return packed, state

    def dequantize(self, packed: torch.Tensor, state: Any) -> torch.Tensor:
        return _bnb_functional().int8_vectorwise_dequant(packed, state)

    def constants(self, state: Any) -> list[torch.Tensor]:
        return [state]

    def moved(self, state: Any, device: torch.device) -> Any:
        return state.to(device)


BACKENDS: dict[str, QuantBackend] = {b.kind: b for b in (NF4Backend(), Int8Backend())}


class QuantizedWeight:
    """One weight as its backend packs it, on the weight's device, dequantized on demand into `dtype`."""

    def __init__(self, weight: torch.Tensor, kind: str, double_quant: bool = False) -> None:
        if kind not in BACKENDS:
            raise ID3Error(f"model.quantization must be one of none, {', '.join(KINDS)}; got {kind!r}")
        self.backend = BACKENDS[kind]
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype
        self.packed, self.state = self.backend.pack(weight.detach().contiguous(), double_quant)

    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight and its quantization constants."""
        tensors = [self.packed, *self.backend.constants(self.state)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize(self) -> torch.Tensor:
        """A fresh dense tensor of `shape` in `dtype`, on the packed weight's device: the base as training sees it."""
        return self.backend.dequantize(self.packed, self.state).to(self.dtype).view(self.shape)

    def to(self, device: torch.device) -> QuantizedWeight:
        self.packed = self.packed.to(device)
        self.state = self.backend.moved(self.state, device)
        return self


def dequantized_reference(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """What a run quantizing `weight` (already in the training dtype) trains from: dequantize(quantize(w)).
    The export checks a checkpoint's base values against it (deterministic on one device kind)."""
    return QuantizedWeight(weight, kind).dequantize()


class _QuantizedLinearFn(torch.autograd.Function):
    """y = x @ W_eff^T with W_eff recomputed in backward; dW goes to the module, not to autograd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        ctx.module = module
        ctx.save_for_backward(x)
        return torch.matmul(x, module.effective_weight().t())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        module = ctx.module
        w = module.effective_weight() if ctx.needs_input_grad[0] else None
        grad_x = None if w is None else torch.matmul(grad_out, w)
        dw = torch.matmul(grad_out.reshape(-1, grad_out.shape[-1]).t(), x.reshape(-1, x.shape[-1]).to(grad_out.dtype))
        module.receive_grad(dw, w)
        return grad_x, None, None


class QuantizedLinear(torch.nn.Module):
    """An nn.Linear whose weight is a bitsandbytes-packed base plus an overlay of trained entries."""

    def __init__(self, linear: torch.nn.Linear, kind: str) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.qweight = QuantizedWeight(linear.weight.data, kind)
        self.bias = linear.bias
        self.positions = torch.empty(0, dtype=torch.int64, device=self.qweight.device)
        self.values = torch.empty(0, dtype=self.qweight.dtype, device=self.qweight.device)
        self.weight_grad: torch.Tensor | None = None  # the accumulated dW (flat), like a parameter's .grad
        self.grad_hook: Callable[[QuantizedLinear], None] | None = None
        self._lent: torch.Tensor | None = None  # backward's effective weight, while the grad hook runs
        # unregistered, so no optimizer, state dict or DeepSpeed ever sees it; only makes backward reach us
        self.anchor = torch.zeros(0, requires_grad=True, device=self.qweight.device)

    @property
    def kind(self) -> str:
        return self.qweight.kind

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def effective_weight(self) -> torch.Tensor:
        """dequantize(base) with the overlay's trained values at their positions: a fresh dense tensor, except
        inside the grad hook, which reads (never writes) the one backward has just built for grad_x."""
        if self._lent is not None:
            return self._lent
        w = self.qweight.dequantize()
        if self.positions.numel():
            w.view(-1)[self.positions] = self.values
        return w

    def receive_grad(self, dw: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Accumulate one backward's dW, then let the hook (if any) take it, as autograd does for a leaf.

        weight: the effective weight backward built (None if it needed none). The hook scores with the
        weight's values (the sparse update streams candidates there), so it is lent to the hook instead of
        dequantized a second time, and dropped when the hook returns: still one layer's dense weight at a time.
        """
        flat = dw.reshape(-1)
        self.weight_grad = flat if self.weight_grad is None else self.weight_grad.add_(flat)
        if self.grad_hook is not None:
            self._lent = weight
            try:
                self.grad_hook(self)
            finally:
                self._lent = None

    def write(self, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Set the overlay to exactly these sorted flat positions and values (rounded to the model dtype)."""
        self.positions = positions.to(self.qweight.device, torch.int64).clone()
        self.values = values.to(self.qweight.device, self.qweight.dtype).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _QuantizedLinearFn.apply(x, self.anchor, self)
        return y if self.bias is None else y + self.bias

    def _apply(self, fn, recurse: bool = True):
        """Device moves reach the packed base and the overlay; dtype casts do not (absmax stays fp32)."""
        out = super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.qweight.device)).device
        if device != self.qweight.device:
            self.qweight.to(device)
            self.positions, self.values = self.positions.to(device), self.values.to(device)
            self.anchor = torch.zeros(0, requires_grad=True, device=device)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.kind}, overlay={self.positions.numel()}"

    def held_weights(self) -> dict[str, QuantizedAccess]:
        """The weights this module holds outside nn.Parameter (algorithm/slices.py, `named_weights`)."""
        return {"weight": QuantizedAccess(self)}


class QuantizedAccess:
    """A quantized weight as one slice: value = the effective weight (transient), grad = the collected dW,
    write = the overlay. Sparse-state ID3 treats it like any parameter's slice."""

    def __init__(self, module: QuantizedLinear) -> None:
        self.module = module

    @property
    def shape(self) -> tuple[int, ...]:
        return self.module.weight_shape

    def grad(self) -> torch.Tensor | None:
        return self.module.weight_grad

    def value(self) -> torch.Tensor:
        return self.module.effective_weight().view(-1)

    def write(self, positions: torch.Tensor, values: torch.Tensor) -> None:
        self.module.write(positions, values)

    def clear_grad(self) -> None:
        self.module.weight_grad = None

    def take_grad(self) -> torch.Tensor | None:
        """The accumulated dW, dropped from the module (a hook's view of it, as `p.grad` is taken)."""
        g, self.module.weight_grad = self.module.weight_grad, None
        return g


def replace_linears(
    model: torch.nn.Module, names: Iterable[str], build: Callable[[torch.nn.Linear], torch.nn.Module]
) -> dict[str, torch.nn.Module]:
    """The one module swap: each named nn.Linear of `model` (module names, e.g. `model.layers.0.mlp.up_proj`)
    becomes `build(linear)`; returns the new modules by name. The dense weight is freed once nothing holds it."""
    out: dict[str, torch.nn.Module] = {}
    modules = dict(model.named_modules())
    for name in names:
        linear = modules.get(name)
        if type(linear) is not torch.nn.Linear:
            raise ID3Error(
                f"model.quantization: {name} is a {type(linear).__name__}, not an nn.Linear; narrow id3.targets "
                "to linear layers' weights"
            )
        parent_name, _, child = name.rpartition(".")
        new = build(linear)
        setattr(modules[parent_name] if parent_name else model, child, new)
        out[name] = new
    return out


def quantize_linears(model: torch.nn.Module, names: Iterable[str], kind: str) -> dict[str, QuantizedLinear]:
    """Replace each named nn.Linear of `model` by a QuantizedLinear of `kind`; returns them by module name."""
    return replace_linears(model, names, lambda linear: QuantizedLinear(linear, kind))  # type: ignore[return-value]


def packed_bytes(model: torch.nn.Module) -> int:
    """Bytes of every quantized base in `model` (for memory reports)."""
    return sum(m.qweight.nbytes for m in model.modules() if isinstance(m, QuantizedLinear))


def _parameter_uses(model: torch.nn.Module) -> dict[int, int]:
    """How many modules hold each parameter (by id): more than one means a tied weight, left unquantized."""
    uses: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    return uses


def quantize_selectable(model: torch.nn.Module, selectable: Iterable[str], kind: str) -> dict[str, QuantizedLinear]:
    """Quantize the nn.Linear layers whose weight is among the `selectable` parameter names (ID3 may choose
    entries of it); other weights (embeddings, norms, a fully trainable head, a weight tied to another
    module) stay as they are. Returns the new modules by module name."""
    uses = _parameter_uses(model)
    modules = dict(model.named_modules())
    names = []
    for name in selectable:
        owner, _, leaf = name.rpartition(".")
        m = modules.get(owner)
        if leaf == "weight" and type(m) is torch.nn.Linear and uses[id(m.weight)] == 1:
            names.append(owner)
    if not names:
        raise ID3Error(
            f"model.quantization={kind}: no selectable weight is an nn.Linear's; widen id3.targets to linear layers"
        )
    return quantize_linears(model, names, kind)


def quantized_names(model: torch.nn.Module) -> list[str]:
    """Parameter-style names (`<module>.weight`) of every quantized base in `model`, in model order."""
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def quantize_for_lora(model: torch.nn.Module) -> int:
    """QLoRA's base (method lora + model.quantization nf4): every nn.Linear but the output head and tied
    weights becomes its backend's bitsandbytes layer (`bnb.nn.Linear4bit`: nf4, blocks of 64 with the absmax
    packed again as QLoRA's double quantization does, compute in the model dtype), which PEFT wraps with its
    own 4-bit LoRA layer. The weight is packed by the same `QuantizedWeight` as sparse ID3's base, so both
    train on the same 4-bit codes. Returns the layers quantized."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    uses = _parameter_uses(model)
    names = [
        n for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head and uses[id(m.weight)] == 1
    ]
    backend = BACKENDS["nf4"]

    def build(linear: torch.nn.Linear) -> torch.nn.Module:
        return backend.lora_base(QuantizedWeight(linear.weight.data, "nf4", double_quant=True), linear)

    return len(replace_linears(model, names, build))

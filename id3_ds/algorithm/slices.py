"""Where a piece of a parameter lives: a contiguous range of its flat row-major coordinates.

The mask core never asks whether a slice is a whole tensor, a ZeRO-3 partition, a ZeRO-1/2 fragment of a
flat fp32 buffer, or a value vector: it sees a `ParamSlice` (coordinates) plus a `SliceAccess` (how to
reach the slice's gradient and master weights as writable 1-D tensors). The DeepSpeed integration
supplies other `SliceAccess` implementations; nothing else changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

import torch


@dataclass(frozen=True)
class ParamSlice:
    """Entries [start, start + numel) of parameter `name`, which has `param_numel` entries in all.

    key_base is the parameter's offset in the global ordering of all selectable entries (parameters in
    model order, each flattened row-major): the global key of local entry i is key_base + start + i.
    Ties in the importance score are broken by the smaller global key, so every slicing agrees.
    """

    name: str
    shape: tuple[int, ...]
    key_base: int
    start: int
    numel: int
    fully_trainable: bool = False
    aliases: tuple[str, ...] = ()  # the parameter's other names when it is tied (tied_aliases)

    @property
    def param_numel(self) -> int:
        return math.prod(self.shape)

    @property
    def first_key(self) -> int:
        return self.key_base + self.start

    def piece(self, start: int, numel: int) -> ParamSlice:
        """Entries [start, start + numel) of the same parameter (a rank's partition of a whole slice)."""
        return replace(self, start=start, numel=numel)


class SliceAccess(Protocol):
    """Writable 1-D views of one slice's reduced gradient and fp32 master weights; sparse state also calls
    `write(positions, values)` to set chosen entries (a weight it cannot reach by `value()`: a quantized base
    keeps them in an overlay)."""

    def grad(self) -> torch.Tensor | None: ...

    def value(self) -> torch.Tensor: ...


class TensorSliceAccess:
    """A slice that is a whole `torch.nn.Parameter` (plain torch, DeepSpeed ZeRO stage 0 in fp32)."""

    def __init__(self, param: torch.nn.Parameter) -> None:
        self.param = param

    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        return None if g is None else g.view(-1)

    def value(self) -> torch.Tensor:
        return self.param.data.view(-1)

    def write(self, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Round `values` into the weight at `positions` (local flat), in place; nothing else changes."""
        write_entries(self.value(), positions, values)

    def clear_grad(self) -> None:
        self.param.grad = None


def write_entries(flat: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """flat[positions] = values in flat's dtype, outside autograd: how every plain slice kind writes."""
    with torch.no_grad():
        flat[positions.to(flat.device)] = values.to(flat.device, flat.dtype)


def named_weights(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter | SliceAccess]]:
    """Every trainable parameter and every weight a module holds outside nn.Parameter, by name, in model
    order (the order of `named_parameters`, each tied parameter once).

    A module holding such a weight (a quantized base, id3_ds/models/quantized.py) says so with
    `held_weights() -> {local name: access}`; the access has `shape`, `grad()`, `value()` and `write()`.
    """
    out: list[tuple[str, torch.nn.Parameter | SliceAccess]] = []
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        held = getattr(module, "held_weights", None)
        if callable(held):
            out += [(dot + local, access) for local, access in held().items()]
        for local, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                out.append((dot + local, p))
    return out


def tied_aliases(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """The other names of each tied parameter, keyed by the name `named_weights` lists it under.

    A tied tensor is one parameter with several names (SmolLM2's lm_head.weight is
    model.embed_tokens.weight). ID3 scores, charges and saves it once under its first name, but a user's
    id3.targets or id3.fully_trainable pattern may name any of them, as PEFT's target names do.
    """
    first: dict[int, str] = {}
    others: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            others.setdefault(first[id(p)], []).append(name)
        else:
            first[id(p)] = name
    return {name: tuple(more) for name, more in others.items()}

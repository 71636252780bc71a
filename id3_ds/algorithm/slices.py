"""Where a piece of a parameter lives: a contiguous range of its flat row-major coordinates.

The mask core never asks whether a slice is a whole tensor, a ZeRO-3 partition, a ZeRO-1/2 fragment of a
flat fp32 buffer, or a value vector: it sees a `ParamSlice` (coordinates) plus a `SliceAccess` (how to
reach the slice's gradient and master weights as writable 1-D tensors). The DeepSpeed integration
supplies other `SliceAccess` implementations; nothing else changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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

    @property
    def param_numel(self) -> int:
        return math.prod(self.shape)

    @property
    def first_key(self) -> int:
        return self.key_base + self.start


class SliceAccess(Protocol):
    """Writable 1-D views of one slice's reduced gradient and fp32 master weights."""

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

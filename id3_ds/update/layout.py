"""Which weights a masked method may touch on a DeepSpeed engine's model: the layout every update and the
recipe's freezing share, with whole shapes also under ZeRO-3's zero.Init (algorithm/id3.module_layout)."""

from __future__ import annotations

import torch

from id3_ds.algorithm import id3
from id3_ds.algorithm.config import ID3Config
from id3_ds.algorithm.id3 import Keep
from id3_ds.integration.params import full_shape


def trainable_layout(model: torch.nn.Module, config: ID3Config, keep: Keep | None = None):
    """Whole-parameter slices (full shapes, also under zero.Init) and entry counts, in model order; weights
    held outside parameters (a quantized base) count as parameters."""
    return id3.module_layout(model, config, keep, full_shape)


def freeze_outside(model: torch.nn.Module, config: ID3Config, keep: Keep | None = None) -> None:
    """requires_grad=False for parameters ID3 may never touch, before DeepSpeed builds optimizer state."""
    id3.freeze_outside(model, trainable_layout(model, config, keep)[0])

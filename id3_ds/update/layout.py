"""Which weights a masked method may touch: the layout every update and the recipe's freezing share."""

from __future__ import annotations

import torch

from id3_ds.algorithm.config import ID3Config
from id3_ds.algorithm.id3 import Keep, layout
from id3_ds.algorithm.slices import named_weights, tied_aliases
from id3_ds.integration.params import full_shape


def trainable_layout(model: torch.nn.Module, config: ID3Config, keep: Keep | None = None):
    """Whole-parameter slices (full shapes, also under zero.Init) and entry counts, in model order; weights
    held outside parameters (a quantized base) count as parameters."""
    named = [
        (n, full_shape(w) if isinstance(w, torch.nn.Parameter) else tuple(w.shape)) for n, w in named_weights(model)
    ]
    return layout(named, config, keep, tied_aliases(model))


def freeze_outside(model: torch.nn.Module, config: ID3Config, keep: Keep | None = None) -> None:
    """requires_grad=False for parameters ID3 may never touch, before DeepSpeed builds optimizer state."""
    kept = {s.name for s in trainable_layout(model, config, keep)[0]}
    for n, p in model.named_parameters():
        if n not in kept:
            p.requires_grad_(False)

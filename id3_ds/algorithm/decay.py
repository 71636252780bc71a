"""Which parameters get weight decay: the rule nanoGPT and the Hugging Face Trainer users expect.

Tensors with fewer than 2 dimensions (biases, LayerNorm/RMSNorm scales) get none: decay pulls them toward
0, which for a norm's scale means toward switching the layer off, and they are too few to overfit with.
Names matched by the user's `id3.no_decay` globs get none either; they are matched case-insensitively,
because model families spell the same module `LayerNorm`, `layernorm` or `ln_f`. One rule for ID3's
masked decay and for the dense methods' optimizer groups.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence

import torch


def decays(name: str, shape: Sequence[int], no_decay: Iterable[str] = ()) -> bool:
    """Whether parameter `name` of (whole, unpartitioned) `shape` takes weight decay."""
    if len(shape) < 2:
        return False
    lowered = name.lower()
    return not any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in no_decay)


def decay_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    weight_decay: float,
    no_decay: Iterable[str] = (),
    shape_of: Callable[[torch.nn.Parameter], tuple[int, ...]] = lambda p: tuple(p.shape),
) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters: one with `weight_decay`, one with none.

    `shape_of` gives a parameter's whole shape: under ZeRO-3 a partition's own shape is only its local piece,
    so the trainer passes `id3_ds.integration.params.full_shape` (nothing here knows DeepSpeed).
    """
    patterns = tuple(no_decay)
    groups: dict[bool, list[torch.nn.Parameter]] = {True: [], False: []}
    for name, p in named_params:
        if p.requires_grad:
            groups[decays(name, shape_of(p), patterns)].append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0} for decay, params in groups.items() if params
    ]

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


def decays(name: str, shape: Sequence[int], no_decay: Iterable[str] = (), aliases: Iterable[str] = ()) -> bool:
    """Whether parameter `name` of (whole, unpartitioned) `shape` takes weight decay. A tied parameter is
    exempt when a pattern names it by any of its names (`aliases`: SmolLM2's `lm_head.weight` is
    `model.embed_tokens.weight`)."""
    if len(shape) < 2:
        return False
    patterns = [pattern.lower() for pattern in no_decay]
    return not any(fnmatch.fnmatchcase(n.lower(), pattern) for n in (name, *aliases) for pattern in patterns)


def decay_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    weight_decay: float,
    no_decay: Iterable[str] = (),
    shape_of: Callable[[torch.nn.Parameter], tuple[int, ...]] = lambda p: tuple(p.shape),
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters: one with `weight_decay`, one with none.

    `aliases` (`slices.tied_aliases(model)`) gives a tied parameter's other names: a no_decay pattern may
    name it by any of them.

    `shape_of` gives a parameter's whole shape: under ZeRO-3 a partition's own shape is only its local piece,
    so the trainer passes `id3_ds.integration.params.full_shape` (nothing here knows DeepSpeed).
    """
    patterns = tuple(no_decay)
    aliases = aliases or {}
    groups: dict[bool, list[torch.nn.Parameter]] = {True: [], False: []}
    for name, p in named_params:
        if p.requires_grad:
            groups[decays(name, shape_of(p), patterns, aliases.get(name, ()))].append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0} for decay, params in groups.items() if params
    ]

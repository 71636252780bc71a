"""Fold trained LoRA matrices into base weights: W' = W + (alpha / r) * B @ A.

The LoRA extension of the delta format is only partly done (see docs/delta-format.md, "LoRA runs"):
this is the arithmetic `merge` will use, checked against PEFT's own forward pass. ID3 over LoRA changes
only B entries of A and B, but A starts from a random init the base model does not hold, so a sparse
A/B delta needs that init (or dense A) next to it; the fold itself takes the final dense A and B.
"""

from __future__ import annotations

import re

import torch

from id3_ds.errors import ID3Error

_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """base weight name -> (A [r, in], B [out, r]) from a PEFT state dict (adapter name 'default')."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        m = _LORA.match(name)
        if m and m["adapter"] == "default":
            found.setdefault(f"{m['module']}.weight", {})[m["which"]] = t
    pairs = {}
    for weight, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise ID3Error(f"LoRA state for {weight} has only lora_{''.join(ab)}; both A and B are needed")
        pairs[weight] = (ab["A"], ab["B"])
    return pairs


def fold_lora(
    base: dict[str, torch.Tensor], lora_state: dict[str, torch.Tensor], alpha: float, rank: int
) -> dict[str, torch.Tensor]:
    """A copy of `base` (plain parameter names) with every LoRA pair folded in, computed in fp32."""
    out = dict(base)
    scale = alpha / rank
    for weight, (a, b) in lora_pairs(lora_state).items():
        if weight not in base:
            raise ID3Error(f"LoRA module {weight} is not a weight of the base model: wrong base for this adapter")
        w = base[weight]
        out[weight] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out

"""LoRA in a delta: the fold W' = W + (alpha / r) * B @ A, and how PEFT names map to base weights.

ID3 over LoRA chooses entries inside the PEFT matrices A ([r, in], random init) and B ([out, r], zero
init), so a run's B is exactly sparse and its A is its init plus a sparse change. A delta of such a run
(docs/delta-format.md, "LoRA runs") therefore stores the dense A init, the sparse A and B entries and the
LoRA settings; `merge` and `apply_delta` rebuild A and B and fold them into each base weight with
`fold`, the same arithmetic as `fold_lora` on a dense PEFT state dict (checked against PEFT's forward).
"""

from __future__ import annotations

import torch

from id3_ds.errors import ID3Error
from id3_ds.models.lora_names import is_lora_param, split_lora_name

__all__ = ["fold", "fold_lora", "is_lora_param", "lora_pairs", "split_lora_name"]


def fold(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """cast(w + scale * (b @ a)), computed in fp32; one temporary of w's shape in fp32."""
    prod = b.to(torch.float32) @ a.to(torch.float32)
    prod.mul_(scale)
    prod.add_(w)  # w is promoted exactly to fp32: the same sum as w.float() + prod
    return prod.to(out_dtype)


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """base weight name -> (A [r, in], B [out, r]) from a PEFT state dict (adapter 'default') or a saved
    adapter_model.safetensors."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        hit = split_lora_name(name)
        if hit:
            found.setdefault(hit[0], {})[hit[1]] = t
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
        out[weight] = fold(w, a, b, scale, w.dtype)
    return out

"""How PEFT names a LoRA model's A and B matrices: what checkpoints save and deltas fold, read one way."""

from __future__ import annotations

import re

# a live PeftModel names lora_A.<adapter>.weight; a saved adapter file (save_pretrained) drops the adapter name
_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def split_lora_name(name: str) -> tuple[str, str] | None:
    """(base weight name, 'A' | 'B') for a PEFT LoRA parameter of adapter 'default' (or of a saved adapter
    file, whose names carry no adapter), else None."""
    m = _LORA.match(name)
    if m is None or m["adapter"] not in (None, "default"):
        return None
    return f"{m['module']}.weight", m["which"]


def is_lora_param(name: str) -> bool:
    return split_lora_name(name) is not None

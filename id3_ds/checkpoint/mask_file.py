"""A MaskState as one safetensors file (no pickle): every rank's checkpoint shard, and sparse state's file.

Tensors `<param>.indices`, `.chosen_at`, `.base` and, where the state carries them, `.value`, `.exp_avg`,
`.exp_avg_sq`; the header holds the format, its version, each parameter's shape and the caller's `meta`.
"""

from __future__ import annotations

import json
import os

import torch

from id3_ds.algorithm.mask import OPTIONAL_FIELDS, MaskState, ParamMask
from id3_ds.errors import ID3Error
from id3_ds.files.safetensors_io import load_tensors, save_tensors

MASK_FORMAT = "id3-mask"
MASK_VERSION = 1


def save_mask(state: MaskState, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write atomically (temp file + rename): a crash never leaves a half-written mask."""
    tensors: dict[str, torch.Tensor] = {}
    shapes = {}
    for name, pm in state.params.items():
        tensors[f"{name}.indices"] = pm.indices.contiguous()
        tensors[f"{name}.chosen_at"] = pm.chosen_at.contiguous()
        tensors[f"{name}.base"] = pm.base.contiguous()
        for f in OPTIONAL_FIELDS:
            if getattr(pm, f) is not None:
                tensors[f"{name}.{f}"] = getattr(pm, f).contiguous()
        shapes[name] = list(pm.shape)
    header = {"format": MASK_FORMAT, "version": str(MASK_VERSION), "shapes": json.dumps(shapes)}
    header["meta"] = json.dumps(meta or {})
    save_tensors(path, tensors, header)


def load_mask(path: str | os.PathLike) -> tuple[MaskState, dict]:
    """Read and validate a mask file; returns the state and the caller's `meta`."""
    tensors, header = load_tensors(path, "mask file")
    if header.get("format") != MASK_FORMAT:
        raise ID3Error(f"{path} is not an id3-ds mask file (format={header.get('format')!r})")
    try:
        shapes = json.loads(header["shapes"])
        meta = json.loads(header.get("meta", "{}"))
        params = {
            name: ParamMask(
                shape=tuple(int(d) for d in shape),
                indices=tensors[f"{name}.indices"],
                chosen_at=tensors[f"{name}.chosen_at"],
                base=tensors[f"{name}.base"],
                **{f: tensors.get(f"{name}.{f}") for f in OPTIONAL_FIELDS},
            )
            for name, shape in shapes.items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # missing tensor, garbled JSON metadata
        raise ID3Error(f"mask file {path} is inconsistent ({type(e).__name__}: {e}); it is corrupt") from None
    state = MaskState(params)
    state.validate(str(path))
    return state, meta

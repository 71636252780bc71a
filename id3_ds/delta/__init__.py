"""Sparse deltas: the few-MB artifact an ID3 run ships instead of a full model (docs/delta-format.md)."""

from id3_ds.delta.apply import apply_delta, remove_delta
from id3_ds.delta.export import export_delta
from id3_ds.delta.format import Delta, LoraDelta, LoraModule, ParamDelta, load_delta, write_delta
from id3_ds.delta.merge import merge

__all__ = [
    "Delta",
    "LoraDelta",
    "LoraModule",
    "ParamDelta",
    "apply_delta",
    "export_delta",
    "load_delta",
    "merge",
    "remove_delta",
    "write_delta",
]

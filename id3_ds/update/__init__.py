"""How a run's weights move: one contract (`Update`, contract.py), its three implementations and the factory
that picks one from the run plan. DeepSpeed internals stay behind id3_ds/integration/."""

from id3_ds.update.contract import CheckpointParts, Update, UpdateState
from id3_ds.update.engine import DenseUpdate
from id3_ds.update.factory import build_update, update_for
from id3_ds.update.layout import freeze_outside, trainable_layout
from id3_ds.update.masked import DeepSpeedID3
from id3_ds.update.sparse import SparseDeepSpeedID3

__all__ = [
    "CheckpointParts",
    "DeepSpeedID3",
    "DenseUpdate",
    "SparseDeepSpeedID3",
    "Update",
    "UpdateState",
    "build_update",
    "freeze_outside",
    "trainable_layout",
    "update_for",
]

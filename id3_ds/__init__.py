"""id3-ds: ID3 sparse fine-tuning for large language models on DeepSpeed."""

from id3_ds.algorithm import ID3, ID3Config, MaskState, from_module
from id3_ds.delta import apply_delta, export_delta, merge, remove_delta
from id3_ds.errors import ID3Error

__all__ = [
    "ID3",
    "ID3Config",
    "ID3Error",
    "MaskState",
    "apply_delta",
    "export_delta",
    "from_module",
    "merge",
    "remove_delta",
]
__version__ = "0.1.0"

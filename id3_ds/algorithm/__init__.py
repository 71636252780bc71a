"""The ID3 algorithm in plain PyTorch: scores, schedule, selection and mask state.

Nothing in this package imports DeepSpeed. Every function works on *slices*: a contiguous range of a
parameter's flat row-major coordinates, whether that range is a whole tensor, a ZeRO partition, or a
value vector. The DeepSpeed integration only decides where a slice's gradient and weights live.
"""

from id3_ds.algorithm.config import ID3Config
from id3_ds.algorithm.id3 import ID3, from_module
from id3_ds.algorithm.mask import MaskState, ParamMask, SliceMask
from id3_ds.algorithm.schedule import UnmaskSchedule, resolve_budget
from id3_ds.algorithm.selection import Candidates, merge_candidates, slice_candidates
from id3_ds.algorithm.slices import ParamSlice, TensorSliceAccess
from id3_ds.algorithm.sparse import SparseID3
from id3_ds.algorithm.sparse_state import SparseSlice

__all__ = [
    "ID3",
    "ID3Config",
    "Candidates",
    "MaskState",
    "ParamMask",
    "ParamSlice",
    "SliceMask",
    "SparseID3",
    "SparseSlice",
    "TensorSliceAccess",
    "UnmaskSchedule",
    "from_module",
    "merge_candidates",
    "resolve_budget",
    "slice_candidates",
]

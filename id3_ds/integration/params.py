"""Parameters that ZeRO-3 may have partitioned: their real size, the whole tensor when needed, this rank's piece.

Under ZeRO-3 (`zero.Init` or an engine at stage 3) a parameter's `.data` is an empty placeholder: its
true shape and size live in DeepSpeed's `ds_shape` / `ds_numel`, this rank's piece in `ds_tensor`, and the
whole tensor exists only inside `deepspeed.zero.GatheredParameters`. Everything outside id3_ds/integration
asks these functions instead, so a DeepSpeed release that renames them is fixed here (the canary in
tests/test_deepspeed_internals.py names what moved). Every function also takes an ordinary tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a ZeRO-3 partitioned parameter (whose `.data` is not the whole tensor)."""
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's whole shape, also while ZeRO-3 holds only a piece of it."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def full_numel(p: torch.Tensor) -> int:
    """The parameter's whole number of entries, also while ZeRO-3 holds only a piece of it."""
    return int(getattr(p, "ds_numel", p.numel()))


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor], *, modify: bool = False) -> Iterator[None]:
    """Inside, every parameter holds its whole tensor; on exit ZeRO-3 partitions them again.

    Collective under ZeRO-3: every rank must enter it with the same parameters. With `modify`, writes made
    inside are kept, rank 0's copy winning (write the same values on every rank). Plain tensors pass through.
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed  # only a ZeRO-3 model reaches here, and it has DeepSpeed loaded already

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


def write_local_partition(p: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """Set entries of this rank's ZeRO-3 piece of `p` (positions counted from the piece's start).

    The model computes with these low-precision pieces (gathered per forward), apart from the fp32 masters the
    optimizer updates: a resume that writes masters must write these too.
    """
    local = p.ds_tensor.data.view(-1)
    local[positions] = values.to(local.device, local.dtype)


def zero3_share(p: torch.Tensor) -> tuple[int, int]:
    """(first flat entry, entries) of this rank's ZeRO-3 partition of `p`: rank r owns [r*P, r*P + valid) with
    P = ceil(numel / world) and valid possibly short (the tail's padding) or 0."""
    import torch.distributed as dist

    per = p.ds_tensor.ds_numel
    start = dist.get_rank(group=p.ds_process_group) * per
    return start, max(0, min(per, full_numel(p) - start))


def reduce_scatter_share(p: torch.Tensor, flat: torch.Tensor, world: int) -> torch.Tensor:
    """Sum the whole flat gradient of a ZeRO-3 parameter over its ranks into this rank's partition (P entries,
    padding included); the caller averages and trims it."""
    import torch.distributed as dist

    # torch >= 2.13 names it reduce_scatter_single (reduce_scatter_tensor is deprecated there); older torch lacks it
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    per = p.ds_tensor.ds_numel
    pad = per * world - flat.numel()  # a padded copy only when numel is not a multiple of world
    padded = torch.nn.functional.pad(flat, (0, pad)) if pad else flat.contiguous()
    out = flat.new_empty(per)
    reduce_scatter(out, padded, group=p.ds_process_group)
    return out


def empty_partition_cache(engine) -> None:
    """Release every gathered ZeRO-3 parameter, so the next forward gathers the partitions written since."""
    engine.optimizer.empty_partition_cache()

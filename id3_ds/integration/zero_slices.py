"""Each rank's slice of every trainable parameter under DeepSpeed, as writable 1-D views.

Measured on DeepSpeed 0.19.8 (see tests/test_deepspeed_internals.py, which fails loudly if these
internals change), between `engine.backward()` at an accumulation boundary and `engine.step()`:

- ZeRO-3: rank r owns flat entries [r*P, r*P + valid) with P = ceil(numel / world) (`ds_tensor.ds_numel`),
  the tail padded. Its fp32 master is a range of `fp32_partitioned_groups_flat[g]` at `grad_position`,
  its reduced gradient the optimizer's per-parameter grad partition (or the flat fp32 grad when the
  optimizer is offloaded). `safe_get_local_grad` returns copies, so the views are taken directly.
- ZeRO-1/2, and stage 0 with bf16 (BF16_Optimizer): `param._hp_mapping` gives the rank's contiguous
  fragment (`lp_fragment_address`), its gradient fragment and fp32 master fragment (`get_hp_fragment`).
  A parameter may straddle two ranks; a rank holding none of it has `_hp_mapping` None.
- Stage 0 in fp32: the whole parameter, `param.grad` already averaged over ranks.

The same views serve scoring (read), masking (write gradient) and weight decay (write master).
"""

from __future__ import annotations

import torch

from id3_ds.algorithm.slices import ParamSlice, TensorSliceAccess
from id3_ds.errors import ID3Error

SUPPORTED_DEEPSPEED = ("0.19",)


class Zero3Access:
    """The rank-local partition of a ZeRO-3 parameter."""

    def __init__(self, optimizer, param: torch.nn.Parameter, valid: int) -> None:
        self.opt, self.param, self.valid = optimizer, param, valid

    def _position(self) -> tuple[int, int, int]:
        return self.opt.grad_position[self.opt.get_param_id(self.param)]

    def grad(self) -> torch.Tensor | None:
        g_idx, off, n = self._position()
        if self.opt.offload_optimizer:
            flat = self.opt.fp32_partitioned_groups_flat[g_idx].grad
            return None if flat is None else flat.narrow(0, off, self.valid)
        parts = self.opt._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
        g = parts.get(self.param.ds_id)
        return None if g is None else g.view(-1).narrow(0, 0, self.valid)

    def value(self) -> torch.Tensor:
        g_idx, off, _ = self._position()
        return self.opt.fp32_partitioned_groups_flat[g_idx].detach().narrow(0, off, self.valid)


class FragmentAccess:
    """The rank's fragment of a parameter in a ZeRO-1/2 (or BF16_Optimizer) flat fp32 partition."""

    def __init__(self, param: torch.nn.Parameter, bf16_optimizer: bool) -> None:
        self.param, self.bf16_optimizer = param, bf16_optimizer
        addr = param._hp_mapping.lp_fragment_address
        self.start, self.numel = addr.start, addr.numel

    def grad(self) -> torch.Tensor | None:
        p, m = self.param, self.param._hp_mapping
        if self.bf16_optimizer and getattr(p, "_hp_grad", None) is not None:
            g = p._hp_grad.view(-1)
        else:
            g = m.get_lp_grad_fragment(p._index_in_param_group)
            if g is None:
                return None
            g = g.view(-1)
        if g.numel() != self.numel:  # a full-size buffer (bf16): narrow to this rank's fragment
            g = g.narrow(0, self.start, self.numel)
        return g.detach()

    def value(self) -> torch.Tensor:
        return self.param._hp_mapping.get_hp_fragment().detach().view(-1)


def check_deepspeed_version() -> None:
    import deepspeed

    if not deepspeed.__version__.startswith(SUPPORTED_DEEPSPEED):
        raise ID3Error(
            f"DeepSpeed {deepspeed.__version__} is not supported (tested: {', '.join(SUPPORTED_DEEPSPEED)}.x): "
            "ID3 reads ZeRO partitions through internals that change between releases; "
            "pip install 'deepspeed>=0.19.8,<0.20'"
        )


def full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


def engine_slices(engine, wanted: list[ParamSlice]) -> list[tuple[ParamSlice, object]]:
    """This rank's (ParamSlice, access) for each wanted whole-parameter slice it holds a piece of."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    params = dict(engine.module.named_parameters())
    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    out = []
    for whole in wanted:
        p = params[whole.name]
        if stage == 3:
            per = p.ds_tensor.ds_numel
            rank = _dp_rank(opt)
            start = rank * per
            valid = max(0, min(per, p.ds_numel - start))
            if valid:
                out.append((_piece(whole, start, valid), Zero3Access(opt, p, valid)))
        elif stage in (1, 2) or isinstance(opt, BF16_Optimizer):
            if getattr(p, "_hp_mapping", None) is None:
                continue  # this rank holds none of it
            acc = FragmentAccess(p, isinstance(opt, BF16_Optimizer))
            if acc.numel:
                out.append((_piece(whole, acc.start, acc.numel), acc))
        else:
            out.append((whole, TensorSliceAccess(p)))
    return out


def _piece(whole: ParamSlice, start: int, numel: int) -> ParamSlice:
    return ParamSlice(whole.name, whole.shape, whole.key_base, start, numel, whole.fully_trainable)


def _dp_rank(opt) -> int:
    import torch.distributed as dist

    return dist.get_rank(group=getattr(opt, "dp_process_group", None))


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that updates the fp32 masters (inside DeepSpeed's ZeRO/BF16 wrappers)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    if not isinstance(inner, torch.optim.Optimizer):
        raise ID3Error(f"unsupported DeepSpeed optimizer wrapper {type(opt).__name__}: cannot hook its step")
    return inner

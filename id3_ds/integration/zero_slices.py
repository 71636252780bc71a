"""Each rank's slice of every trainable parameter under DeepSpeed, as writable 1-D views.

Measured on DeepSpeed 0.19.8 (see tests/test_deepspeed_internals.py, which fails loudly if these
internals change), between `engine.backward()` at an accumulation boundary and `engine.step()`:

- ZeRO-3: rank r owns flat entries [r*P, r*P + valid) with P = ceil(numel / world) (`ds_tensor.ds_numel`),
  the tail padded. Its fp32 master is a range of `fp32_partitioned_groups_flat[g]` at `grad_position`,
  its reduced gradient the optimizer's per-parameter grad partition (or the flat fp32 grad when the
  optimizer is offloaded). `safe_get_local_grad` returns copies, so the views are taken directly.
- ZeRO-1/2: `param._hp_mapping` gives the rank's contiguous fragment (`lp_fragment_address`), its
  gradient fragment and fp32 master fragment (`get_hp_fragment`). A parameter may straddle two ranks; a
  rank holding none of it has `_hp_mapping` None.
- Stage 0 in bf16 (FP16_Optimizer with DeepSpeed's Adam, FP16_UnfusedOptimizer with a client one): the
  whole parameter on every rank; its bf16 `param.grad`, its fp32 master in the wrapper's fp32 groups.
- Stage 0 in fp32: the whole parameter, `param.grad` already averaged over ranks.
- With the optimizer offloaded to CPU, DeepSpeed clips by per-parameter norms cached during backward:
  `refresh_offload_norms` recomputes them from the masked gradients.
- Refused: BF16_Optimizer (ZeRO-1 + bf16 + fp32 gradient accumulation keeps an unpartitioned gradient
  per rank) and `round_robin_gradients` (its `_hp_mapping` is wrong).

The same views serve scoring (read), masking (write gradient) and weight decay (write master).
"""

from __future__ import annotations

import torch

from id3_ds.algorithm.slices import ParamSlice, TensorSliceAccess, write_entries
from id3_ds.errors import ID3Error
from id3_ds.integration.params import zero3_share
from id3_ds.plan import bf16_optimizer_refused, round_robin_refused

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


class PartitionAccess:
    """This rank's piece of a ZeRO-3 parameter itself (model dtype, tail padding left out), where no optimizer
    holds a master: sparse state reads and writes the chosen entries there."""

    def __init__(self, param: torch.nn.Parameter, valid: int) -> None:
        self.param, self.valid = param, valid

    def grad(self) -> torch.Tensor | None:
        return None  # the sparse update's hooks keep the gradient

    def value(self) -> torch.Tensor:
        return self.param.ds_tensor.data.view(-1).narrow(0, 0, self.valid)

    def write(self, positions: torch.Tensor, values: torch.Tensor) -> None:
        write_entries(self.value(), positions, values)


class FragmentAccess:
    """The rank's fragment of a parameter in a ZeRO-1/2 flat fp32 partition."""

    def __init__(self, param: torch.nn.Parameter) -> None:
        self.param = param
        addr = param._hp_mapping.lp_fragment_address
        self.start, self.numel = addr.start, addr.numel

    def grad(self) -> torch.Tensor | None:
        p, m = self.param, self.param._hp_mapping
        g = m.get_lp_grad_fragment(p._index_in_param_group)
        if g is None:
            return None
        g = g.reshape(-1)
        if g.numel() != self.numel:  # a full-size buffer (bf16): narrow to this rank's fragment
            g = g.narrow(0, self.start, self.numel)
        return g.detach()

    def value(self) -> torch.Tensor:
        return self.param._hp_mapping.get_hp_fragment().detach().view(-1)


class MasterAccess:
    """A whole parameter whose fp32 master lives apart from it (stage 0 with bf16)."""

    def __init__(self, param: torch.nn.Parameter, master: torch.Tensor) -> None:
        self.param, self.master = param, master.detach().view(-1)

    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        return None if g is None else g.view(-1)

    def value(self) -> torch.Tensor:
        return self.master


def stage0_masters(opt) -> dict[int, torch.Tensor] | None:
    """id(param) -> fp32 master for DeepSpeed's stage-0 bf16 wrappers; None when params are their own masters."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(opt, FP16_Optimizer):  # one flat fp32 buffer per group, parameters back to back
        out = {}
        for gi, group in enumerate(opt.fp16_groups):
            off = 0
            for p in group:
                out[id(p)] = opt.fp32_groups_flat[gi].narrow(0, off, p.numel())
                off += p.numel()
        return out
    if isinstance(opt, FP16_UnfusedOptimizer):
        return {id(p): opt.fp32_groups[gi][j] for gi, g in enumerate(opt.fp16_groups) for j, p in enumerate(g)}
    return None


def check_supported(engine) -> None:
    """Refuse, at start-up, the DeepSpeed set-ups whose partitions ID3 cannot mask correctly."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    opt = engine.optimizer
    if isinstance(opt, BF16_Optimizer):
        raise bf16_optimizer_refused()
    if getattr(opt, "round_robin_gradients", False):
        raise round_robin_refused()


def offloaded(engine) -> bool:
    opt = engine.optimizer
    return bool(getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False))


def refresh_offload_norms(engine, accesses: list) -> None:
    """Offloaded ZeRO clips by per-parameter norms cached in backward: recompute them from masked grads."""
    opt = engine.optimizer
    for acc in accesses:
        g = acc.grad()
        if g is not None:
            opt.norm_for_param_grads[opt.get_param_id(acc.param)] = g.float().norm(2)


def check_deepspeed_version() -> None:
    import deepspeed

    if not deepspeed.__version__.startswith(SUPPORTED_DEEPSPEED):
        raise ID3Error(
            f"DeepSpeed {deepspeed.__version__} is not supported (tested: {', '.join(SUPPORTED_DEEPSPEED)}.x): "
            "ID3 reads ZeRO partitions through internals that change between releases; "
            "pip install 'deepspeed>=0.19.8,<0.20'"
        )


def engine_slices(engine, wanted: list[ParamSlice]) -> list[tuple[ParamSlice, object]]:
    """This rank's (ParamSlice, access) for each wanted whole-parameter slice it holds a piece of."""
    params = dict(engine.module.named_parameters())
    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    masters = stage0_masters(opt) if stage == 0 else None
    out = []
    for whole in wanted:
        p = params[whole.name]
        if stage == 3:
            start, valid = zero3_share(p)
            if valid:
                out.append((whole.piece(start, valid), Zero3Access(opt, p, valid)))
        elif stage in (1, 2):
            if getattr(p, "_hp_mapping", None) is None:
                continue  # this rank holds none of it
            acc = FragmentAccess(p)
            if acc.numel:
                out.append((whole.piece(acc.start, acc.numel), acc))
        elif masters is not None:
            out.append((whole, MasterAccess(p, masters[id(p)])))
        else:
            out.append((whole, TensorSliceAccess(p)))
    return out


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that updates the fp32 masters (inside DeepSpeed's ZeRO/BF16 wrappers)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    if not isinstance(inner, torch.optim.Optimizer):
        raise ID3Error(f"unsupported DeepSpeed optimizer wrapper {type(opt).__name__}: cannot hook its step")
    return inner

"""A simulated accelerator: run torch code on the CPU while recording what would stall or break on a GPU.

Why: the host syncs of a training step (a scalar read, `nonzero`, a blocking copy between host and device)
decide how fast it runs on a GPU, and they can be counted without one. A `SimTensor` stands for a tensor in
device memory: its metadata says device "meta" (so code that branches on `.device.type == "cpu"` takes its
accelerator path and factories called with `device=t.device` make device tensors), its data is a CPU tensor.
Under `SyncCounter` (a TorchDispatchMode) every aten op runs on that data and is classified:

    sync     the host would wait for the device: a scalar read (item, bool, int, float, tolist), an op whose
             output size depends on values (nonzero, boolean-mask indexing, unique), torch.equal, a
             device-to-host copy, a blocking host-to-device copy, a host index applied to a device tensor
    refused  CUDA would raise: a device op mixing in CPU tensors (other than 0-d scalars), device values
             written into a CPU tensor or CPU values into a device tensor by index
    kernels  ops that would launch a device kernel (views excluded), for information

Outside the mode a SimTensor computes silently, so setup code needs no care. Collectives are not simulated:
pass in-process stand-ins (see tests/test_host_syncs.py).
"""

from __future__ import annotations

import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SIM = torch.device("meta")
_PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "id3_ds") + os.sep
_VIEWS = {
    "view", "_unsafe_view", "slice", "select", "squeeze", "unsqueeze", "t", "transpose", "expand", "as_strided",
    "alias", "detach", "permute", "narrow", "split", "split_with_sizes", "unbind", "reshape", "view_as",
    "_reshape_alias", "lift_fresh",
}  # fmt: skip
_DYNAMIC = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "_unique", "argwhere"}
_FACTORIES = {"empty", "zeros", "ones", "full", "arange", "empty_strided", "scalar_tensor", "randperm", "rand"}


class SimTensor(torch.Tensor):
    """A tensor in simulated device memory (see the module docstring); `elem` holds its data on the CPU."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> SimTensor:
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=SIM,
            requires_grad=False,
        )
        r.elem = elem
        return r

    def __repr__(self) -> str:
        return f"SimTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs or {}))
        return tree_map(lambda x: SimTensor(x) if isinstance(x, torch.Tensor) else x, out)


def tree_map(fn, x):
    """fn over the leaves of nested tuples, lists and dicts (aten arguments): torch's pytree, minus its cost."""
    if isinstance(x, (tuple, list)):
        return (
            type(x)(tree_map(fn, y) for y in x) if not hasattr(x, "_fields") else type(x)(*(tree_map(fn, y) for y in x))
        )
    if isinstance(x, dict):
        return {k: tree_map(fn, v) for k, v in x.items()}
    return fn(x)


def tree_leaves(x, out: list | None = None) -> list:
    out = [] if out is None else out
    if isinstance(x, (tuple, list)):
        for y in x:
            tree_leaves(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            tree_leaves(y, out)
    else:
        out.append(x)
    return out


def on_device(t: torch.Tensor) -> SimTensor:
    """`t`'s data seen as living on the simulated device (shares t's storage: in-place ops reach t)."""
    return SimTensor(t)


def _unwrap(x):
    if isinstance(x, SimTensor):
        return x.elem
    if isinstance(x, torch.device) and x.type == "meta":
        return torch.device("cpu")
    return x


def _site() -> str:
    """The innermost id3_ds frame that issued the op (where to look), else the innermost caller outside torch."""
    f = sys._getframe(1)
    first = None
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(_PKG):
            return f"id3_ds/{os.path.relpath(name, _PKG)}:{f.f_lineno}"
        if first is None and name != __file__ and f"{os.sep}torch{os.sep}" not in name:
            first = f"{os.path.basename(name)}:{f.f_lineno}"
        f = f.f_back
    return first or "?"


class SyncCounter(TorchDispatchMode):
    """Counts would-be host syncs, refusals and kernels of the ops run under it, by kind and call site."""

    def __init__(self) -> None:
        super().__init__()
        self.events: collections.Counter = collections.Counter()  # (kind, what, site) -> count
        self.kernels = 0

    @property
    def syncs(self) -> int:
        return sum(n for (kind, _, _), n in self.events.items() if kind == "sync")

    @property
    def refused(self) -> int:
        return sum(n for (kind, _, _), n in self.events.items() if kind == "refused")

    def table(self) -> list[tuple[str, str, str, int]]:
        """(kind, what, site, count), most frequent first."""
        return [(k, w, s, n) for (k, w, s), n in self.events.most_common()]

    def _rec(self, kind: str, what: str) -> None:
        self.events[(kind, what, _site())] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        flat = tree_leaves((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on_dev = any(isinstance(t, SimTensor) for t in tensors)
        target = kwargs.get("device")
        to_dev = target is not None and torch.device(target).type == "meta"
        out_dev = self._classify(name, func, args, tensors, on_dev, target, to_dev)
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if out_dev and name not in _VIEWS:
            self.kernels += 1
        same = {id(_unwrap(a)): a for a in flat if isinstance(a, torch.Tensor)}  # in-place results keep identity

        def wrap(x):
            if not isinstance(x, torch.Tensor):
                return x
            if id(x) in same:
                return same[id(x)]
            return SimTensor(x) if out_dev else x

        return tree_map(wrap, out)

    def _classify(self, name, func, args, tensors, on_dev, target, to_dev) -> bool:
        """Record what the op would cost on a GPU; returns whether its output lives on the device."""
        if name == "_local_scalar_dense":
            if on_dev:
                self._rec("sync", "scalar read (item/bool/int/float/tolist)")
            return False
        if name in _DYNAMIC or (name == "repeat_interleave" and on_dev):
            if on_dev:
                self._rec("sync", f"{name} (output size depends on values)")
            return on_dev
        if name in ("equal", "is_nonzero", "allclose"):
            if on_dev:
                self._rec("sync", name)
            return False
        if name == "_to_copy":
            src = args[0]
            if target is None:
                return isinstance(src, SimTensor)
            if isinstance(src, SimTensor) and not to_dev and src.numel():
                self._rec("sync", "device-to-host copy")
            elif to_dev and not isinstance(src, SimTensor) and src.numel():
                self._rec("sync", "host-to-device copy (blocking)")
            return to_dev
        if name == "copy_":
            dst, src = args[0], args[1]
            if isinstance(dst, SimTensor) and not isinstance(src, SimTensor) and src.numel():
                self._rec("sync", "host-to-device copy (blocking)")
            elif isinstance(src, SimTensor) and not isinstance(dst, SimTensor) and src.numel():
                self._rec("sync", "device-to-host copy")
            return isinstance(dst, SimTensor)
        if name in ("index", "index_put_", "index_put", "_index_put_impl_"):
            return self._indexing(name, args)
        if name in _FACTORIES:
            return to_dev
        if on_dev:
            if any(not isinstance(t, SimTensor) and t.dim() > 0 for t in tensors):
                self._rec("refused", f"{name} mixes CPU and device tensors")
            mutates = func._schema.is_mutable and args and isinstance(args[0], torch.Tensor)
            if mutates and not isinstance(args[0], SimTensor):
                self._rec("refused", f"{name} writes device values into a CPU tensor")
                return False
            return True
        return to_dev

    def _indexing(self, name, args) -> bool:
        target, indices = args[0], args[1]
        dev = isinstance(target, SimTensor)
        for i in indices:
            if i is None:
                continue
            if i.dtype == torch.bool and (dev or isinstance(i, SimTensor)):
                self._rec("sync", "boolean-mask index (a nonzero inside)")
            if dev and not isinstance(i, SimTensor) and i.numel():
                self._rec("sync", "host index on a device tensor (blocking copy)")
            if not dev and isinstance(i, SimTensor) and i.numel():
                self._rec("sync", "device index on a host tensor (device-to-host copy)")
        if name != "index":
            values = args[2]
            if dev and not isinstance(values, SimTensor) and values.dim() > 0:
                self._rec("refused", "index_put_ of CPU values into a device tensor")
            if not dev and isinstance(values, SimTensor):
                self._rec("refused", "index_put_ of device values into a CPU tensor")
        return dev

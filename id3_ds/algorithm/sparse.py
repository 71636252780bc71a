"""Single-process sparse-state ID3 (`id3.state: sparse`): the selector of dense mode, Adam on chosen entries.

One optimizer step, after the micro-batches' backward passes:

    driver.step()   # ID3.select on the dense transient .grad (same scores, top-k, budget as dense mode),
                    # clip by the masked gradient's norm, sparse AdamW on chosen entries (sparse_state.py),
                    # torch AdamW on fully trainable parameters, then every .grad = None

Selectable parameters keep requires_grad=True only so autograd produces their gradient; no torch optimizer
holds them, and their `.grad` is dropped after each step, so nothing per unchosen entry persists. Fully
trainable parameters are dense anyway and use an ordinary torch AdamW (in a bf16 model, keep them fp32).

State (`save`/`load`): one MaskState file in global per-parameter flat coordinates whose chosen entries
carry value (the fp32 master), exp_avg and exp_avg_sq: O(B), re-sliceable onto any slicing. Loading onto
the base model writes the masters back into the weights, so the file alone restores the trained model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from id3_ds.algorithm.config import ID3Config
from id3_ds.algorithm.id3 import ID3, Keep, from_module
from id3_ds.algorithm.mask import MaskState
from id3_ds.algorithm.sparse_state import AdamWHyper, SparseSlice, adamw_update, clip_coef, sq_norm
from id3_ds.errors import ID3Error

STATE_KIND = "sparse"


class SparseID3:
    """ID3 with sparse optimizer state over the slices one process holds (each with a `.param` access)."""

    def __init__(
        self,
        id3: ID3,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | dict[int, float] = 0.0,
        max_grad_norm: float | None = None,
    ) -> None:
        """weight_decay: one rate, spread by `ID3.decay_rates` (no decay for 1-D and id3.no_decay tensors),
        or a rate per held-slice index as `ID3.attach` takes it."""
        self.id3 = id3
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.max_grad_norm = max_grad_norm
        rates = id3.decay_rates(weight_decay) if isinstance(weight_decay, (int, float)) else weight_decay
        for i, h in enumerate(id3.held):
            h.weight_decay = rates.get(i, 0.0)
        self.states: dict[int, SparseSlice] = {
            i: SparseSlice() for i, h in enumerate(id3.held) if not h.info.fully_trainable
        }
        self.full_optimizer = self._full_optimizer()
        self.last_norm = 0.0

    @classmethod
    def from_module(
        cls, model: torch.nn.Module, config: ID3Config, steps: int, *, keep: Keep | None = None, **adam
    ) -> SparseID3:
        """Sparse ID3 over a plain torch module (parameters outside targets/fully_trainable are frozen)."""
        return cls(from_module(model, config, steps, keep=keep), **adam)

    def _full_optimizer(self) -> torch.optim.AdamW | None:
        """torch AdamW over the fully trainable parameters, one group per decay rate."""
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for h in self.id3.held:
            if h.info.fully_trainable:
                if h.info.numel != h.info.param_numel:
                    raise ID3Error(f"fully trainable {h.info.name} is sliced: the single-process driver needs it whole")
                groups.setdefault(h.weight_decay, []).append(self._param(h.access))
        if not groups:
            return None
        param_groups = [{"params": ps, "weight_decay": wd} for wd, ps in groups.items()]
        return torch.optim.AdamW(param_groups, lr=self.lr, betas=self.betas, eps=self.eps)

    @staticmethod
    def _param(access) -> torch.nn.Parameter:
        p = getattr(access, "param", None)
        if p is None:
            raise ID3Error("the sparse driver needs slice accesses with a .param (plain torch parameters)")
        return p

    def _selectable_params(self) -> Iterator[torch.nn.Parameter]:
        seen: set[int] = set()
        for i in self.states:
            p = self._param(self.id3.held[i].access)
            if id(p) not in seen:
                seen.add(id(p))
                yield p

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> float:
        """Select, clip, update, drop the gradients; returns the masked gradient's norm before clipping."""
        id3 = self.id3
        id3.select()
        grads: dict[int, torch.Tensor] = {}
        for i, st in self.states.items():
            h = id3.held[i]
            st.align(h.mask, h.access.value())
            grads[i] = st.gather(h.access.grad())
        full = [p.grad for p in self._full_params() if p.grad is not None]
        norm = sq_norm([*grads.values(), *full]).sqrt()
        coef = clip_coef(norm, self.max_grad_norm)
        hyper = AdamWHyper(self.lr, self.betas, self.eps, id3.config.bias_correction)
        for i, st in self.states.items():
            h = id3.held[i]
            g = grads[i].mul_(coef) if coef != 1.0 else grads[i]
            adamw_update(st, g, h.mask.chosen_at, id3.step, hyper, h.weight_decay)
            st.write_back(h.access.value())
        if self.full_optimizer is not None:
            for g in full:
                g.mul_(coef)
            for group in self.full_optimizer.param_groups:
                group["lr"] = self.lr
            self.full_optimizer.step()
            self.full_optimizer.zero_grad(set_to_none=True)
        for p in self._selectable_params():
            p.grad = None
        self.last_norm = float(norm)
        return self.last_norm

    def _full_params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.full_optimizer.param_groups for p in g["params"]] if self.full_optimizer else []

    # -- memory -----------------------------------------------------------------------------------

    @property
    def state_bytes(self) -> int:
        """Bytes of sparse optimizer state (master + moments of chosen selectable entries)."""
        return sum(st.nbytes for st in self.states.values())

    # -- state ------------------------------------------------------------------------------------

    def state(self) -> MaskState:
        """Mask + master + moments of every chosen entry in global coordinates (fully trainable included)."""
        items, adam = [], []
        for i, h in enumerate(self.id3.held):
            items.append((h.info, h.mask))
            if i in self.states:
                st = self.states[i]
                st.align(h.mask, h.access.value())
                adam.append((st.master, st.exp_avg, st.exp_avg_sq))
            else:
                adam.append(self._full_adam(h))
        return MaskState.from_slices(items, adam=adam)

    def _full_adam(self, h) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self._param(h.access)
        value = p.detach().reshape(-1)[h.mask.positions]
        st = self.full_optimizer.state.get(p, {}) if self.full_optimizer else {}
        zeros = torch.zeros(len(h.mask), dtype=torch.float32)
        m = st["exp_avg"].reshape(-1)[h.mask.positions] if "exp_avg" in st else zeros
        v = st["exp_avg_sq"].reshape(-1)[h.mask.positions] if "exp_avg_sq" in st else zeros.clone()
        return value, m, v

    def state_meta(self) -> dict:
        return {**self.id3.state_meta(), "state": STATE_KIND}

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file (atomic): this holder's share of the sparse state, O(chosen entries)."""
        self.state().save(path, self.state_meta())

    def load(self, path: str | os.PathLike) -> None:
        """Restore from `save`'s file onto this driver's slices (any slicing) and base model weights."""
        state, meta = MaskState.load(path)
        self.load_state(state, meta)

    def load_state(self, state: MaskState, meta: dict) -> None:
        """Restore from the union of every holder's shard (see MaskState.union), re-sliced onto this holder."""
        if meta.get("state") != STATE_KIND:
            raise ID3Error("the checkpoint holds dense-mode ID3 state, not sparse state: resume with id3.state dense")
        self.id3.load_state(state, meta)
        t = int(meta["step"])
        for i, h in enumerate(self.id3.held):
            adam = state.slice_adam(h.info)
            if adam is None:
                raise ID3Error(f"sparse-state checkpoint lacks the master/moments of {h.info.name}: it is corrupt")
            value, m, v = adam
            if i in self.states:
                self.states[i] = SparseSlice(h.mask.positions, value, m, v)
                self.states[i].write_back(h.access.value())
            else:
                self._load_full(h, value, m, v, t)

    def _load_full(self, h, value: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int) -> None:
        p = self._param(h.access)
        if len(h.mask) == 0:  # saved before the first step: nothing trained yet
            return
        if value.numel() != p.numel():
            raise ID3Error(
                f"sparse-state checkpoint has {value.numel()} of {p.numel()} entries of fully trainable {h.info.name}"
            )
        with torch.no_grad():
            p.copy_(value.view_as(p))
        if step > 0 and self.full_optimizer is not None:
            self.full_optimizer.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": m.view_as(p).to(p.dtype).clone(),
                "exp_avg_sq": v.view_as(p).to(p.dtype).clone(),
            }

"""Sparse-state ID3 (`id3.state: sparse`): the selector of dense mode, Adam on chosen entries only.

One optimizer step, after the micro-batches' backward passes:

    driver.step()   # ID3.select on the slices' gradients (same scores, top-k, budget as dense mode),
                    # clip by the masked gradient's norm, sparse AdamW on chosen entries (sparse_state.py),
                    # write the rounded masters into the weights, then release the gradients

`SparseID3` is the step for any holder: one process over plain torch (its slices are whole parameters,
gradients their `.grad`), or one DeepSpeed rank (id3_ds/update/sparse.py: its slices are the
rank's ZeRO-3 partitions or whole stage-0 weights, gradients a per-step accumulation buffer). What differs
is injected: `all_reduce` sums the clipping norm's squares over holders that own disjoint entries, and
`release` drops the step's gradients. Every held slice, fully trainable ones included (all their entries
join the mask at step 0), gets a `SparseSlice`: an fp32 master and both moments, also in a bf16 model.

Selectable parameters keep requires_grad=True only so autograd produces their gradient; no torch optimizer
holds them, and their gradient is dropped after each step, so nothing per unchosen entry persists.

State (`state`/`load_state`): one MaskState in global per-parameter flat coordinates whose chosen entries
carry value (the fp32 master), exp_avg and exp_avg_sq: O(B), re-sliceable onto any slicing (as a file:
id3_ds/checkpoint/mask_file.py). Loading onto the base model writes the masters back into the weights, so
the state alone restores the trained model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from id3_ds.algorithm.adam import ratio_table
from id3_ds.algorithm.config import ID3Config
from id3_ds.algorithm.id3 import ID3, Keep, from_module
from id3_ds.algorithm.mask import MaskState
from id3_ds.algorithm.sparse_state import AdamWHyper, SparseSlice, adamw_update, clip_coef, sq_norm
from id3_ds.algorithm.streaming import GradStream
from id3_ds.errors import ID3Error

STATE_KIND = "sparse"


class SparseID3:
    """ID3 with sparse optimizer state over the slices one holder owns."""

    def __init__(
        self,
        id3: ID3,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | dict[int, float] = 0.0,
        max_grad_norm: float | None = None,
        all_reduce: Callable[[torch.Tensor], None] | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        """weight_decay: one rate, spread by `ID3.decay_rates` (no decay for 1-D and id3.no_decay tensors),
        or a rate per held-slice index as `ID3.attach` takes it. all_reduce: sums a tensor in place over
        holders (None: one holder). release: drops the step's gradients (default: every held `.param.grad`)."""
        self.id3 = id3
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.max_grad_norm = max_grad_norm
        self.all_reduce = all_reduce
        self.release = release or self._drop_param_grads
        rates = id3.decay_rates(weight_decay) if isinstance(weight_decay, (int, float)) else weight_decay
        for i, h in enumerate(id3.held):
            h.weight_decay = rates.get(i, 0.0)
        self.states: dict[int, SparseSlice] = {i: SparseSlice() for i in range(len(id3.held))}
        self.last_norm = 0.0
        self.last_chosen = 0
        self._weights_device: torch.device | None = None

    @classmethod
    def from_module(
        cls, model: torch.nn.Module, config: ID3Config, steps: int, *, keep: Keep | None = None, **adam
    ) -> SparseID3:
        """Sparse ID3 over a plain torch module (parameters outside targets/fully_trainable are frozen)."""
        return cls(from_module(model, config, steps, keep=keep), **adam)

    def _drop_param_grads(self) -> None:
        for h in self.id3.held:
            clear = getattr(h.access, "clear_grad", None)
            if clear is None:
                raise ID3Error("the sparse driver needs slice accesses with clear_grad(), or a release callable")
            clear()

    # -- the step ---------------------------------------------------------------------------------

    def stream(self) -> GradStream:
        """Open this step's gradient stream: absorb each held slice's final reduced gradient into it as
        backward produces it (then drop the gradient), and pass it to `step`."""
        return GradStream(self.id3)

    def step(self, lr: float | None = None, streamed: GradStream | None = None) -> float:
        """Select, clip, update, release the gradients; returns the masked gradient's norm before clipping.

        lr: this step's learning rate (a schedule's value); None keeps the last one. streamed: the step's
        gradient stream (slices it lacks are absorbed now from `access.grad()`); None reads every held
        slice's dense gradient from `access.grad()`.
        """
        if lr is not None:
            self.lr = lr
        id3 = self.id3
        if streamed is None:
            self.last_chosen = id3.select()
        else:
            for i in streamed.missing():  # not reached by the last micro-batch: its accumulated grad, or none
                streamed.absorb(i, id3.held[i].access.grad())
            self.last_chosen = id3.select(candidates=streamed.candidates())
        grads: dict[int, torch.Tensor] = {}
        for i, st in self.states.items():
            h = id3.held[i]
            st.align(h.mask, h.access.value)
            grads[i] = st.gather(h.access.grad()) if streamed is None else streamed.chosen_grads(i)
        squares = sq_norm(grads.values()).to(self._device())
        if self.all_reduce is not None:  # holders own disjoint entries: the squares add up (on the device)
            self.all_reduce(squares)
        norm = squares.sqrt()
        coef = clip_coef(norm, self.max_grad_norm)
        hyper = AdamWHyper(self.lr, self.betas, self.eps, id3.config.bias_correction)
        per_entry = hyper.bias_correction == "per_entry"
        table = ratio_table(id3.step, self.betas, self._device()) if per_entry else None
        for i, st in self.states.items():
            h = id3.held[i]
            g = grads[i] if isinstance(coef, float) else grads[i].mul_(coef.to(grads[i].device))
            adamw_update(st, g, h.mask.chosen_at, id3.step, hyper, h.weight_decay, table)
            st.write_back(h.access)
        self.release()
        self.last_norm = float(norm)  # the step's one host read besides select's: the norm callers log
        return self.last_norm

    def _device(self) -> torch.device:
        """Where this holder's weights live (the norm is reduced there: NCCL takes device tensors only); read
        once, since `value()` may be costly (a quantized base dequantizes)."""
        if self._weights_device is None:
            held = self.id3.held
            self._weights_device = held[0].access.value().device if held else torch.device("cpu")
        return self._weights_device

    # -- memory -----------------------------------------------------------------------------------

    @property
    def state_bytes(self) -> int:
        """Bytes of sparse optimizer state (master + moments of every chosen entry, fully trainable included)."""
        return sum(st.nbytes for st in self.states.values())

    # -- state ------------------------------------------------------------------------------------

    def state(self) -> MaskState:
        """Mask + master + moments of this holder's chosen entries in global coordinates."""
        items, adam = [], []
        for i, h in enumerate(self.id3.held):
            st = self.states[i]
            st.align(h.mask, h.access.value)
            items.append((h.info, h.mask))
            adam.append((st.master, st.exp_avg, st.exp_avg_sq))
        return MaskState.from_slices(items, adam=adam)

    def state_meta(self) -> dict:
        return {**self.id3.state_meta(), "state": STATE_KIND}

    def load_state(self, state: MaskState, meta: dict) -> None:
        """Restore from the union of every holder's shard (see MaskState.union), re-sliced onto this holder,
        and write the masters into the (base) weights."""
        if meta.get("state") != STATE_KIND:
            raise ID3Error("the checkpoint holds dense-mode ID3 state, not sparse state: resume with id3.state dense")
        self.id3.load_state(state, meta)
        for i, h in enumerate(self.id3.held):
            adam = state.slice_adam(h.info)
            if adam is None:
                raise ID3Error(f"sparse-state checkpoint lacks the master/moments of {h.info.name}: it is corrupt")
            device = h.mask.positions.device
            value, m, v = (t.to(device) for t in adam)
            self.states[i] = SparseSlice(h.mask.positions, value, m, v)
            self.states[i].write_back(h.access)

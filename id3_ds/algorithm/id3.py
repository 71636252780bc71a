"""The ID3 selector: grows the mask each optimizer step and keeps unchosen entries frozen.

Call order for one optimizer step (plain torch or DeepSpeed alike):

    loss.backward()            # gradients reduced (data-parallel averaged)
    id3.select()               # score unchosen entries, unmask u_t of them by a global top-k
    id3.mask_grads()           # zero every unchosen gradient entry: clipping sees masked gradients
    clip_grad_norm_(...)
    optimizer.step()           # hooks attached by `attach`: decay chosen entries only, per-entry bias

The selector holds only its own slices (a whole model in one process, one partition per ZeRO rank);
`reducer` turns this holder's candidates into the global winners (identity here, an all-gather under
DeepSpeed), so every holder grows its mask with the same entries.

Host syncs: the masks live on the weights' device and every shape in scoring, top-k, merge, growth and
masking is known on the host, so a step reads the device once, whatever the number of tensors and chunks:
one copy of the k winners' keys with their per-slice bounds (`select`), which also gives the winners digest
and the exact-k check. A partitioned reducer adds one read (the cross-rank round-B size); see collectives.py.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from id3_ds.algorithm.adam import decay_factor, per_entry_ratio, ratio_table
from id3_ds.algorithm.config import ID3Config
from id3_ds.algorithm.decay import decays
from id3_ds.algorithm.mask import MaskState, SliceMask
from id3_ds.algorithm.schedule import UnmaskSchedule, resolve_budget
from id3_ds.algorithm.selection import CHUNK, NEG_INF, CandidatePool, Candidates, best_k, slice_candidates
from id3_ds.algorithm.slices import ParamSlice, SliceAccess, TensorSliceAccess, named_weights, tied_aliases
from id3_ds.algorithm.static import StaticSchedule
from id3_ds.errors import ID3Error

Reducer = Callable[[Candidates, int], Candidates]
# scorer(slice, access, lo, hi, out) -> out filled with the scores of local entries [lo, hi); None = ID3's own
Scorer = Callable[[ParamSlice, SliceAccess, int, int, torch.Tensor], torch.Tensor]
# keep(name, shape) -> whether a parameter may be selected at all (e.g. BitFit: 1-D tensors only)
Keep = Callable[[str, tuple[int, ...]], bool]


def local_reducer(candidates: Candidates, k: int) -> Candidates:
    """One holder owns every slice: its candidates already are the global ones."""
    return best_k(candidates, k)


class PhaseTimer:
    """Seconds spent per phase (score_topk, merge, grow, mask), for the overhead benchmarks.

    Off unless `enabled`; then each phase costs two perf_counter calls.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


@dataclass
class _Held:
    """One slice this holder owns: its coordinates, how to reach it, its mask, its decay rate."""

    info: ParamSlice
    access: SliceAccess
    mask: SliceMask
    weight_decay: float = 0.0


def budget_split(config: ID3Config, selectable: int, fully_trainable: int) -> tuple[int, int]:
    """(B, B left for selection once fully trainable entries are charged), validated."""
    total = resolve_budget(config.budget, selectable + fully_trainable)
    left = total - fully_trainable
    if left < 0:
        raise ID3Error(
            f"id3.budget={total} entries is smaller than the {fully_trainable} entries of the fully "
            "trainable parameters (id3.fully_trainable), which are charged to it; raise the budget"
        )
    return total, left


def unmask_horizon(config: ID3Config, steps: int) -> int:
    """T: the steps the budget is unmasked over (id3.unmask_steps, default the run's `steps`), validated."""
    horizon = config.unmask_steps or steps
    if horizon > steps:
        raise ID3Error(
            f"id3.unmask_steps={horizon} exceeds the run's {steps} optimizer steps, so the budget would never be "
            "fully chosen; lower it or remove it (default: unmask over the whole run)"
        )
    return horizon


class ID3:
    """Mask growth and gradient masking over the slices one process holds."""

    def __init__(
        self,
        slices: Iterable[tuple[ParamSlice, SliceAccess]],
        config: ID3Config,
        steps: int,
        *,
        selectable: int,
        fully_trainable: int = 0,
        reducer: Reducer = local_reducer,
        scorer: Scorer | None = None,
        static: bool = False,
    ) -> None:
        """scorer replaces the ID3 score; static chooses all of B at step 0 (the paper's static baselines)."""
        self.config = config
        self.budget, left = budget_split(config, selectable, fully_trainable)
        self.steps = steps  # the run's optimizer steps; the unmasking may end sooner (id3.unmask_steps)
        self.schedule = StaticSchedule(left, steps) if static else UnmaskSchedule(left, unmask_horizon(config, steps))
        self.reducer = reducer
        self.scorer = scorer
        self.held = [_Held(info, access, SliceMask()) for info, access in slices]
        self.held.sort(key=lambda h: (h.info.fully_trainable, h.info.first_key))
        self.step = 0  # optimizer steps done; advances in `select`, so the budget can never overshoot
        self.chosen = 0  # selected entries so far, globally (the same on every holder)
        self.digest = ""  # hash chain over every step's winners: equal on all holders, checked on save
        self._before: list[torch.Tensor] = []
        self.chunk = CHUNK  # entries scored at once (smaller in tests, to exercise several chunks per slice)
        self._edges: torch.Tensor | None = None  # [first_key, end) of every selectable slice, on the device
        self.timer = PhaseTimer()

    # -- the per-step API -------------------------------------------------------------------------

    def select(self, step: int | None = None, candidates: Candidates | None = None) -> int:
        """Unmask this step's entries; returns how many were chosen (globally). Call once per step.

        candidates: this holder's local top-`pending()` candidates, precomputed slice by slice with
        `slice_candidates` while the gradients existed (sparse state streams them during backward); None
        scores the held slices' gradients now.
        """
        if step is not None and step != self.step:
            raise ID3Error(
                f"select(step={step}) but the selector is at step {self.step}: call it exactly once per "
                "optimizer step, or restore its state when resuming"
            )
        if self.step == 0:
            for h in self.held:
                if h.info.fully_trainable and len(h.mask) == 0:
                    value = h.access.value()
                    h.mask.add(torch.arange(h.info.numel, device=value.device), 0, value)
        k = self.schedule.target_after(self.step) - self.chosen
        if k > 0:
            with self.timer("score_topk"):
                local = self._local_candidates(k) if candidates is None else candidates
            with self.timer("merge"):
                winners = self.reducer(local, k)
            with self.timer("grow"):
                keys = winners.keys
                edges = self._slice_edges(keys.device)
                real = (winners.scores > NEG_INF).sum().view(1)
                # the step's one host read: how many winners are real, where each slice's winners start, the keys
                host = torch.cat([real, torch.searchsorted(keys, edges), keys]).cpu().tolist()
                if len(winners) != k or host[0] != k:
                    raise RuntimeError(f"selection produced {min(host[0], len(winners))} winners, expected {k}")
                self._grow(keys, host[1 : 1 + edges.numel()], self.step)
            winner_keys = np.asarray(host[1 + edges.numel() :], dtype=np.int64)
            self.digest = hashlib.sha256(self.digest.encode() + winner_keys.tobytes()).hexdigest()
            self.chosen += k
        self.step += 1
        return max(k, 0)

    def mask_grads(self) -> None:
        """Zero the gradient of every unchosen entry, in place."""
        with self.timer("mask"):
            for h in self.held:
                g = h.access.grad()
                if g is not None:
                    h.mask.zero_unchosen(g)

    def pending(self) -> int:
        """k of the coming `select()`: entries it will choose (0 once the budget is reached)."""
        return max(self.schedule.target_after(self.step) - self.chosen, 0)

    def slice_candidates(self, i: int, grad: torch.Tensor | None, k: int) -> Candidates:
        """Held slice i's top-k unchosen candidates for `grad` (its 1-D reduced gradient; None = not reached
        by the loss), scored exactly as `select` scores it, each carrying its fp32 gradient as payload."""
        h = self.held[i]
        value = h.access.value()
        if grad is None:
            grad = torch.zeros_like(value)
        c = self._slice_top(h, grad, value, k)
        c.payload = grad[c.keys - h.info.first_key].to(torch.float32)
        return c

    @property
    def chosen_total(self) -> int:
        """Entries that may move so far: fully trainable ones plus those selected."""
        return self.chosen + (self.budget - self.schedule.budget)

    # -- internals --------------------------------------------------------------------------------

    def _slice_top(self, h: _Held, grad: torch.Tensor, value: torch.Tensor, k: int) -> Candidates:
        """Held slice h's top-k unchosen entries, scored by ID3's importance or the method's scorer."""
        score_chunk = None if self.scorer is None else functools.partial(self.scorer, h.info, h.access)
        cfg = self.config
        return slice_candidates(
            grad, value, h.mask.positions, h.info.first_key, k, cfg.eps, cfg.exp, self.chunk, score_chunk
        )

    def _local_candidates(self, k: int) -> Candidates:
        pool = CandidatePool(k)
        device = None
        for h in self.held:
            if h.info.fully_trainable:
                continue
            value = h.access.value()
            device = value.device
            grad = h.access.grad()
            if grad is None:  # a parameter the loss did not reach: every score is 0
                grad = torch.zeros_like(value)
            pool.add(self._slice_top(h, grad, value, k))
        return pool.result(device or "cpu")

    def _slice_edges(self, device: torch.device) -> torch.Tensor:
        """[first_key, first_key + numel] of every selectable held slice, interleaved, cached on `device`."""
        if self._edges is None or self._edges.device != device:
            selectable = [h.info for h in self.held if not h.info.fully_trainable]
            edges = [e for info in selectable for e in (info.first_key, info.first_key + info.numel)]
            self._edges = torch.tensor(edges, dtype=torch.int64).to(device)
        return self._edges

    def _grow(self, keys: torch.Tensor, bounds: list[int], step: int) -> None:
        """Add the winners (keys sorted ascending, on the device) that fall into this holder's slices;
        bounds: per selectable slice, where its winners start and end in `keys` (read on the host)."""
        selectable = [h for h in self.held if not h.info.fully_trainable]
        for j, h in enumerate(selectable):
            lo, hi = bounds[2 * j], bounds[2 * j + 1]
            if hi > lo:
                h.mask.add(keys[lo:hi] - h.info.first_key, step, h.access.value())

    # -- optimizer hooks: decoupled decay on chosen entries, optional per-entry bias correction --------

    def attach(self, optimizer: torch.optim.Optimizer, weight_decay: dict[int, float] | None = None) -> None:
        """Hook `optimizer.step` so weight decay and bias correction respect the mask.

        The optimizer's own weight decay is taken over (set to 0): applied by the optimizer it would
        shrink every entry, unchosen ones included (a trap of the reference code). `weight_decay` maps a
        held-slice index to its rate; by default each whole-tensor slice takes its parameter group's rate.
        """
        lrs = {g["lr"] for g in optimizer.param_groups}
        if len(lrs) > 1:
            raise ID3Error("ID3 needs one learning rate for all parameter groups; got " + str(sorted(lrs)))
        if weight_decay is None:
            weight_decay = self._group_decay(optimizer)
        for i, h in enumerate(self.held):
            h.weight_decay = weight_decay.get(i, 0.0)
        for g in optimizer.param_groups:
            if "weight_decay" in g:
                g["weight_decay"] = 0.0
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_step(opt))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step(opt))

    def decay_rates(self, weight_decay: float) -> dict[int, float]:
        """`weight_decay` for every held slice whose parameter decays (`decays`: 2-D or more and not matching
        id3.no_decay), 0 for the rest (biases, norm scales)."""
        no_decay = self.config.no_decay
        return {
            i: weight_decay if decays(h.info.name, h.info.shape, no_decay, h.info.aliases) else 0.0
            for i, h in enumerate(self.held)
        }

    def _group_decay(self, optimizer: torch.optim.Optimizer) -> dict[int, float]:
        by_param = {id(p): g.get("weight_decay", 0.0) for g in optimizer.param_groups for p in g["params"]}
        out = {}
        for i, h in enumerate(self.held):
            p = getattr(h.access, "param", None)
            out[i] = by_param.get(id(p), 0.0) if p is not None else 0.0
        return out

    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        lr = optimizer.param_groups[0]["lr"]
        self._before = []
        for h in self.held:
            if len(h.mask) == 0:
                continue
            v = h.access.value()
            pos = h.mask.positions
            if h.weight_decay:
                v.index_copy_(0, pos, v[pos].mul_(decay_factor(lr, h.weight_decay)))
            if self.config.bias_correction == "per_entry":
                self._before.append(v[pos])

    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """per_entry: rescale each entry's Adam step from the shared count t to its own count n.

        Adam's step is lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps); with n = t - chosen_at it
        becomes the same with n, i.e. the step times (1 - b1^t) / (1 - b1^n) * sqrt((1 - b2^n) / (1 - b2^t)),
        exact up to Adam's eps term.
        """
        if self.config.bias_correction != "per_entry":
            return
        betas = optimizer.param_groups[0].get("betas", (0.9, 0.999))
        held = [h for h in self.held if len(h.mask)]
        table = ratio_table(self.step, betas, held[0].mask.chosen_at.device) if held else None
        for h, before in zip(held, self._before):
            ratio = per_entry_ratio(self.step, h.mask.chosen_at, betas, table)
            v = h.access.value()
            after = v[h.mask.positions]
            v.index_copy_(0, h.mask.positions, before + (after - before) * ratio.to(after.dtype))
        self._before = []

    # -- state ------------------------------------------------------------------------------------

    def mask_state(self, with_values: bool = False) -> MaskState:
        """This holder's chosen entries in global coordinates (one shard of the model's mask).

        with_values also records each chosen entry's current weight, which makes the shard a
        self-contained sparse delta (value - base) for export.
        """
        values = [h.access.value() for h in self.held] if with_values else None
        return MaskState.from_slices([(h.info, h.mask) for h in self.held], values)

    def state_meta(self) -> dict:
        return {
            "step": self.step,
            "chosen": self.chosen,
            "budget": self.budget,
            "steps": self.steps,
            "winners_sha256": self.digest,
        }

    def load_state(self, state: MaskState, meta: dict) -> None:
        """Restore from the union of all shards of a checkpoint, re-sliced onto this holder's slices."""
        if int(meta["budget"]) != self.budget or int(meta["steps"]) != self.steps:
            raise ID3Error(
                f"checkpoint was trained with budget={meta['budget']} over {meta['steps']} steps but this run "
                f"has budget={self.budget} over {self.steps}: resume with the same id3 and train settings"
            )
        for h in self.held:
            h.mask = state.slice_mask(h.info).to(h.access.value().device)
        self.step = int(meta["step"])
        self.chosen = int(meta["chosen"])
        self.digest = str(meta.get("winners_sha256", ""))


def param_kinds(
    names: Iterable[str], config: ID3Config, aliases: dict[str, tuple[str, ...]] | None = None
) -> dict[str, str]:
    """'full', 'select' or 'frozen' for each trainable parameter name, by the config's glob patterns.

    A tied parameter matches a pattern through any of its names (`aliases`, from `tied_aliases`).
    """
    aliases = aliases or {}
    kinds = {}
    for n in names:
        known = (n, *aliases.get(n, ()))
        if any(fnmatch.fnmatchcase(a, p) for a in known for p in config.fully_trainable):
            kinds[n] = "full"
        elif any(fnmatch.fnmatchcase(a, p) for a in known for p in config.targets):
            kinds[n] = "select"
        else:
            kinds[n] = "frozen"
    return kinds


def layout(
    named_shapes: list[tuple[str, tuple[int, ...]]],
    config: ID3Config,
    keep: Keep | None = None,
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> tuple[list[ParamSlice], int, int]:
    """Whole-parameter slices with global key bases, plus (selectable, fully trainable) entry counts.

    Parameters matched by neither id3.targets nor id3.fully_trainable (through any of their `aliases`)
    are left out: the caller freezes them; so are selectable ones that `keep` rejects (a method narrowing
    the targets). Keys follow model order, the same on every rank.
    """
    kinds = param_kinds([n for n, _ in named_shapes], config, aliases)
    if keep is not None:
        kinds = {
            n: "frozen" if k == "select" and not keep(n, tuple(s)) else k
            for (n, s), k in zip(named_shapes, kinds.values())
        }
    slices, key, full = [], 0, 0
    for name, shape in named_shapes:
        n = math.prod(shape)
        if kinds[name] == "frozen":
            continue
        is_full = kinds[name] == "full"
        other = (aliases or {}).get(name, ())
        slices.append(ParamSlice(name, tuple(shape), 0 if is_full else key, 0, n, is_full, other))
        if is_full:
            full += n
        else:
            key += n
    if not slices:
        raise ID3Error(f"id3.targets {list(config.targets)} matched no trainable parameter; check the names")
    return slices, key, full


def module_layout(
    model: torch.nn.Module,
    config: ID3Config,
    keep: Keep | None = None,
    shape_of: Callable[[torch.Tensor], tuple[int, ...]] = lambda w: tuple(w.shape),
):
    """`layout` of a module's weights in model order: its trainable parameters (their shape by `shape_of`,
    e.g. the whole shape of a ZeRO-3 partitioned one) and the weights it holds outside parameters (a
    quantized base), each tied parameter once, matched by any of its names."""
    named = [(n, shape_of(w) if isinstance(w, torch.nn.Parameter) else tuple(w.shape)) for n, w in named_weights(model)]
    return layout(named, config, keep, tied_aliases(model))


def freeze_outside(model: torch.nn.Module, slices: list[ParamSlice]) -> None:
    """requires_grad=False for the parameters outside `slices` (ID3 may never touch them), before an optimizer
    builds state for them: they cost no gradient memory and can never move."""
    kept = {s.name for s in slices}
    for n, p in model.named_parameters():
        if n not in kept:
            p.requires_grad_(False)


def from_module(
    model: torch.nn.Module,
    config: ID3Config,
    steps: int,
    *,
    scorer: Scorer | None = None,
    static: bool = False,
    keep: Keep | None = None,
) -> ID3:
    """ID3 over a plain torch module: one whole-tensor slice per trainable parameter.

    Parameters outside id3.targets and id3.fully_trainable get requires_grad=False (frozen, as PEFT
    does), so they cost no gradient memory and can never move. scorer/static/keep select a baseline
    method (see id3_ds.methods); the defaults are ID3 itself.
    """
    weights = dict(named_weights(model))  # parameters, and weights held outside them (a quantized base)
    slices, selectable, full = module_layout(model, config, keep)
    freeze_outside(model, slices)
    accesses = {n: TensorSliceAccess(w) if isinstance(w, torch.nn.Parameter) else w for n, w in weights.items()}
    return ID3(
        [(s, accesses[s.name]) for s in slices],
        config,
        steps,
        selectable=selectable,
        fully_trainable=full,
        scorer=scorer,
        static=static,
    )

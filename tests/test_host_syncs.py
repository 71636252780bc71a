"""An ID3 step's would-be GPU host syncs are a small constant, the same for 10 and 1,000 tensors.

The weights and gradients sit on a simulated device (benchmarks/device_sim.py): every op runs on the CPU
while scalar reads, value-dependent shapes, host<->device copies and host indices on device tensors are
counted, and ops CUDA would refuse are recorded. The step under test is the real one (select, mask_grads,
the optimizer hooks; sparse state's streamed and buffered steps; a partitioned reducer), with several
chunks per tensor, NaN gradients and weight decay with per-entry bias correction. The same steps on
plain CPU tensors must choose the same entries, so the accelerator path (no host-side NaN check) is exact too.
"""

from __future__ import annotations

import types

import pytest
import torch

from benchmarks.device_sim import SyncCounter, on_device
from id3_ds.algorithm import ID3, ID3Config, SparseID3
from id3_ds.algorithm.id3 import layout
from id3_ds.algorithm.slices import write_entries
from id3_ds.integration.collectives import two_round_reduce

NUMEL = 64  # entries per tensor
CHUNK = 40  # two chunks per tensor, the last one short
STEPS = 10
MAX_SYNCS = 4  # the goal: a small constant per optimizer step
OPT = types.SimpleNamespace(param_groups=[{"lr": 1e-2, "betas": (0.9, 0.999)}])


class DevAccess:
    """A whole tensor whose weight and gradient live on the simulated device (or on the CPU: `sim=False`)."""

    def __init__(self, weight: torch.Tensor, grad: torch.Tensor, sim: bool) -> None:
        self.weight, self.g, self.sim = weight, grad, sim

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return on_device(t.view(-1)) if self.sim else t.view(-1)

    def grad(self) -> torch.Tensor:
        return self._view(self.g)

    def value(self) -> torch.Tensor:
        return self._view(self.weight)

    def write(self, positions: torch.Tensor, values: torch.Tensor) -> None:
        write_entries(self.value(), positions, values)

    def clear_grad(self) -> None:
        """Keep the gradient: the next step re-reads it (new values are drawn by `_new_grads`)."""


def _tensors(n: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(NUMEL, generator=g) for _ in range(n)]
    grads = [torch.randn(NUMEL, generator=g) for _ in range(n)]
    return weights, grads


def _new_grads(grads: list[torch.Tensor], step: int) -> None:
    """Fresh gradients in place: some rounded to few values (ties), a NaN in every fifth tensor."""
    g = torch.Generator().manual_seed(1000 + step)
    for i, t in enumerate(grads):
        t.copy_(torch.randn(NUMEL, generator=g))
        if i % 3 == 0:
            t.copy_(t.round())
        if i % 5 == 0:
            t[(7 * step + i) % NUMEL] = float("nan")


def _build(n: int, sim: bool, bias: str = "per_entry", reducer=None, seed: int = 0):
    weights, grads = _tensors(n, seed)
    named = [(f"layer{i}.weight", (NUMEL,)) for i in range(n - 1)] + [("norm.weight", (NUMEL,))]
    config = ID3Config(budget=0.2, bias_correction=bias, targets=("layer*",), fully_trainable=("norm*",))
    slices, selectable, full = layout(named, config)
    accesses = {name: DevAccess(w, g, sim) for (name, _), w, g in zip(named, weights, grads)}
    kwargs = {} if reducer is None else {"reducer": reducer}
    id3 = ID3(
        [(s, accesses[s.name]) for s in slices], config, STEPS, selectable=selectable, fully_trainable=full, **kwargs
    )
    id3.chunk = CHUNK
    for h in id3.held:
        h.weight_decay = 0.1
    return id3, grads


def _dense_step(id3: ID3) -> None:
    id3.select()
    id3.mask_grads()
    id3._before_step(OPT)  # what the optimizer's step pre/post hooks run (ID3.attach)
    id3._after_step(OPT)


def _partitioned_reducer():
    """A 2-rank two-round reducer whose other rank proposes this rank's rows at half score on foreign keys."""

    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        other = t.clone()
        other[:, 0] *= 0.5
        other[:, 1] += float(1 << 40)
        return [t, other]

    return lambda local, k: two_round_reduce(local, k, 2, gather, lambda n: int(n))


def _count(run, n: int, steps: int = 3) -> list[SyncCounter]:
    """Counters of steps 1..steps-1 (step 0 also builds one-time device tables and fully trainable masks)."""
    counters = []
    for step in range(steps):
        _new_grads(run.grads, step)
        with SyncCounter() as m:
            run.step()
        if step:
            counters.append(m)
    return counters


class DenseRun:
    def __init__(self, n: int, reducer=None) -> None:
        self.id3, self.grads = _build(n, sim=True, reducer=reducer)

    def step(self) -> None:
        _dense_step(self.id3)


class SparseRun:
    def __init__(self, n: int, streamed: bool) -> None:
        id3, self.grads = _build(n, sim=True)
        self.core = SparseID3(id3, lr=1e-2, max_grad_norm=1.0, weight_decay=0.1, release=lambda: None)
        self.streamed = streamed

    def step(self) -> None:
        if not self.streamed:
            self.core.step()
            return
        stream = self.core.stream()
        for i, h in enumerate(self.core.id3.held):  # what a post-accumulate-grad hook does during backward
            stream.absorb(i, h.access.grad())
        self.core.step(streamed=stream)


def _describe(m: SyncCounter) -> str:
    return "; ".join(f"{kind} {what} @ {site} x{n}" for kind, what, site, n in m.table())


@pytest.mark.parametrize(
    ("mode", "many"),
    [("dense", 1000), ("sparse_streamed", 1000), ("dense_partitioned", 100), ("sparse_buffered", 100)],
)
def test_syncs_per_step_do_not_grow_with_tensors_or_chunks(mode: str, many: int) -> None:
    """10 tensors against `many` (1,000 for the two main steps; 100 keeps the variants' simulation short)."""
    per_size = {}
    for n in (10, many):
        if mode.startswith("dense"):
            run = DenseRun(n, _partitioned_reducer() if mode == "dense_partitioned" else None)
        else:
            run = SparseRun(n, streamed=mode == "sparse_streamed")
        counters = _count(run, n, steps=2 if n > 100 else 3)
        for m in counters:
            assert m.refused == 0, f"{mode}, {n} tensors: CUDA would refuse: {_describe(m)}"
            assert m.syncs <= MAX_SYNCS, f"{mode}, {n} tensors: {m.syncs} syncs per step: {_describe(m)}"
        per_size[n] = [m.syncs for m in counters]
    assert per_size[10][0] == per_size[many][0], f"{mode}: syncs per step grow with the tensors: {per_size}"


def test_the_counter_sees_host_reads() -> None:
    """The instrument itself: each kind of host read it must catch is caught, device-only work is not."""
    x = on_device(torch.arange(6, dtype=torch.float32))
    with SyncCounter() as quiet:
        y = (x * 2).index_fill_(0, on_device(torch.tensor([1])), 0.0)
        torch.topk(y, 2)
    assert quiet.syncs == 0 and quiet.refused == 0
    reads = [
        lambda: float(x.sum()),
        lambda: bool((x > 2).any()),
        lambda: (x > 2).nonzero(),
        lambda: x[x > 2],
        lambda: x.cpu(),
        lambda: x[torch.tensor([1, 2])],
        lambda: torch.tensor([1.0]).to(x.device),
    ]
    for read in reads:
        with SyncCounter() as m:
            read()
        assert m.syncs == 1, _describe(m)
    with SyncCounter() as m:
        x + torch.ones(6)
    assert m.refused == 1


@pytest.mark.parametrize("bias", ["shared", "per_entry"])
def test_the_device_path_chooses_what_the_cpu_path_chooses(bias: str) -> None:
    """Same gradients (NaN, heavy ties), same winners, masks and weights on the simulated device as on the CPU."""
    runs = [_build(30, sim=sim, bias=bias, seed=3) for sim in (False, True)]
    for step in range(STEPS):
        for id3, grads in runs:
            _new_grads(grads, step)
            if step % 4 == 1:  # all-equal scores: the whole order is the key order
                for t in grads:
                    t.fill_(1.0)
            with SyncCounter():
                _dense_step(id3)
    (cpu, _), (dev, _) = runs
    assert cpu.digest == dev.digest and cpu.chosen == dev.chosen == cpu.schedule.budget
    for a, b in zip(cpu.held, dev.held):
        assert torch.equal(a.mask.positions, b.mask.positions.elem)
        assert torch.equal(a.mask.chosen_at, b.mask.chosen_at.elem)
        assert torch.equal(a.access.value(), b.access.value().elem)

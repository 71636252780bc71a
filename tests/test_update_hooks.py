"""The training loop's update objects (id3_ds/update/) on a stand-in for a ZeRO-0 fp32 engine,
in one process: the FISH pass through them, the Fisher sums freed once the mask is chosen, the dense one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed")

from id3_ds import ID3Config  # noqa: E402
from id3_ds.methods import method_spec  # noqa: E402
from id3_ds.update import DeepSpeedID3, DenseUpdate, build_update  # noqa: E402


class Stage0Engine:
    """What the update objects and the FISH pass use of a DeepSpeed engine at ZeRO-0 in fp32, one rank."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
        self.lr_scheduler = None
        self.global_steps = self.global_samples = 7  # the FISH pass must wind these back to 0

    def fp16_enabled(self) -> bool:
        return False

    def zero_optimization_stage(self) -> int:
        return 0

    def __call__(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=self.module(x).pow(2).mean())

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return True

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()


def _engine() -> Stage0Engine:
    torch.manual_seed(0)
    return Stage0Engine(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)))


def _batch(sample: int, micro: int) -> dict:
    return {"x": torch.randn(4, 8, generator=torch.Generator().manual_seed(sample * 10 + micro))}


def test_fish_pass_trains_nothing_and_its_sums_are_freed_once_the_mask_is_chosen() -> None:
    engine = _engine()
    spec = method_spec("fish")
    update = build_update(engine, spec, ID3Config(budget=10), steps=3, weight_decay=0.0)
    assert isinstance(update, DeepSpeedID3) and update.wants_fisher_pass
    before = [p.detach().clone() for p in engine.module.parameters()]
    update.fisher_pass(_batch, batches=2, accum=1)
    assert all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))  # the optimizer never stepped
    assert engine.global_steps == 0 and engine.global_samples == 0
    assert spec.fisher.batches == 2 and spec.fisher.sums  # one fp32 sum per selectable entry

    engine.backward(engine(**_batch(99, 0)).loss)
    assert update.before_step() == 10 and update.chosen_total == update.budget == 10
    assert not spec.fisher.sums  # the static mask is chosen: an fp32 per entry for the rest of the run is waste
    assert not update.wants_fisher_pass
    assert update.progress(10) == {"chosen": 10, "budget": 10, "chosen_this_step": 10}


def test_dense_update_moves_every_trainable_entry_and_has_no_mask() -> None:
    engine = _engine()
    engine.module[0].bias.requires_grad_(False)
    update = build_update(engine, None, ID3Config(budget=10), steps=3, weight_decay=0.0)
    assert isinstance(update, DenseUpdate) and not update.masked and not update.wants_fisher_pass
    assert update.budget == update.chosen_total == 8 * 8 + 8 * 2 + 2
    assert update.before_step() == 0 and update.progress(0) == {} and update.steps is None

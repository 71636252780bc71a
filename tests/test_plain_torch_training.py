"""ID3 in a plain torch loop: exact budget, frozen entries bit-identical, chosen entries moved."""

from __future__ import annotations

import copy

import pytest
import torch

from id3_ds import ID3Config, from_module
from id3_ds.errors import ID3Error
from tests.assertions import assert_only_chosen_moved, chosen_indices
from tests.tiny import TinyNet, batches


def _train(config: ID3Config, steps: int, wd: float = 0.1, clip: float = 0.5, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyNet()
    base = copy.deepcopy(model.state_dict())
    id3 = from_module(model, config, steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=wd)
    id3.attach(opt)
    for x, y in batches(steps, seed):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        id3.select()
        id3.mask_grads()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model, base, id3


def _moved(model, base) -> dict[str, torch.Tensor]:
    return {n: (p.detach() != base[n]).reshape(-1) for n, p in model.named_parameters()}


@pytest.mark.parametrize("budget,steps", [(50, 10), (37, 7), (5, 9), (0.1, 4)])
@pytest.mark.parametrize("bias_correction", ["shared", "per_entry"])
def test_only_chosen_entries_move_with_adamw_decay_and_clipping(budget, steps, bias_correction) -> None:
    model, base, id3 = _train(ID3Config(budget=budget, bias_correction=bias_correction), steps)
    state = id3.mask_state()
    assert len(state) == id3.budget
    for name, pm in state.params.items():  # base values recorded at choice time are the pretrained weights
        assert torch.equal(pm.base, base[name].reshape(-1)[pm.indices]), name
    assert_only_chosen_moved(base, dict(model.named_parameters()), chosen_indices(state), chosen_must_move=True)


def test_fully_trainable_head_is_charged_to_the_budget() -> None:
    head = 16 * 3 + 3
    model, base, id3 = _train(ID3Config(budget=head + 20, fully_trainable=("head.*",)), steps=5)
    state = id3.mask_state()
    assert state.params["head.weight"].indices.numel() == 48
    assert len(state) == head + 20
    assert bool(_moved(model, base)["head.weight"].all())


def test_targets_freeze_everything_else() -> None:
    model, base, id3 = _train(ID3Config(budget=10, targets=("body.0.*",)), steps=3)
    state = id3.mask_state()
    assert set(state.params) <= {"body.0.weight", "body.0.bias"}
    assert_only_chosen_moved(base, dict(model.named_parameters()), chosen_indices(state))
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith("body.0."), name


class _TiedNet(torch.nn.Module):
    """An embedding tied to the output head, as SmolLM2's lm_head.weight is model.embed_tokens.weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed.weight


def test_a_tied_weight_is_selected_by_any_of_its_names() -> None:
    model = _TiedNet()
    id3 = from_module(model, ID3Config(budget=10, targets=("lm_head.*",)), steps=2)
    assert [(h.info.name, h.info.fully_trainable) for h in id3.held] == [("embed.weight", False)]  # charged once
    assert not model.norm.weight.requires_grad


def test_a_tied_weight_is_fully_trainable_by_any_of_its_names() -> None:
    id3 = from_module(_TiedNet(), ID3Config(budget=45, targets=("norm.*",), fully_trainable=("lm_head.*",)), steps=2)
    kinds = {h.info.name: h.info.fully_trainable for h in id3.held}
    assert kinds == {"norm.weight": False, "norm.bias": False, "embed.weight": True}


def test_budget_smaller_than_fully_trainable_is_refused() -> None:
    with pytest.raises(ID3Error, match="fully trainable"):
        from_module(TinyNet(), ID3Config(budget=10, fully_trainable=("head.*",)), steps=3)


def test_unmask_steps_spends_the_budget_early_and_then_trains_a_fixed_mask() -> None:
    """id3.unmask_steps=T: the whole budget is chosen by step T (T counts as the schedule's steps), nothing
    after, and the run's own length stays what checkpoints record."""
    model, base, id3 = _train(ID3Config(budget=37, unmask_steps=3), steps=7)
    assert id3.chosen == 37 and id3.steps == 7 and id3.state_meta()["steps"] == 7
    assert [id3.schedule.per_step(t) for t in range(7)] == [13, 12, 12, 0, 0, 0, 0]
    assert_only_chosen_moved(base, dict(model.named_parameters()), chosen_indices(id3.mask_state()))
    with pytest.raises(ID3Error, match=r"^id3.unmask_steps=8 exceeds the run's 7 optimizer steps"):
        from_module(TinyNet(), ID3Config(budget=37, unmask_steps=8), steps=7)


def test_select_must_follow_the_step_counter() -> None:
    id3 = from_module(TinyNet(), ID3Config(budget=10), steps=3)
    with pytest.raises(ID3Error, match="exactly once per"):
        id3.select(step=1)


def test_per_entry_bias_correction_shrinks_a_late_entry_first_step() -> None:
    """With a shared counter a late entry's first Adam step is ~3x lr; per-entry makes it ~lr."""
    steps = 2000  # entry t is chosen at step t; the last one's first step comes at t = 2000
    for mode, lo, hi in (("shared", 2.7, 3.2), ("per_entry", 0.95, 1.05)):
        w = torch.nn.Parameter(torch.zeros(steps))
        id3 = from_module(torch.nn.ParameterDict({"w": w}), ID3Config(budget=steps, bias_correction=mode), steps)
        opt = torch.optim.Adam([w], lr=1e-3)
        id3.attach(opt)
        grad = 1.0 + torch.arange(steps).flip(0) * 1e-3  # larger for lower index: chosen in index order
        for _ in range(steps):
            before = w.detach().clone()
            w.grad = grad.clone()
            id3.select()
            id3.mask_grads()
            opt.step()
        first = (w.detach() - before)[-1].abs().item() / 1e-3
        assert lo < first < hi, (mode, first)

"""ID3 over LoRA: the mask lies only inside LoRA A/B and fully trainable groups; the fold matches PEFT."""

from __future__ import annotations

import copy

import pytest
import torch

from id3_ds import ID3Config
from id3_ds.delta.lora import fold_lora
from id3_ds.methods import selector_for_module
from tests.assertions import assert_only_chosen_moved, chosen_indices
from tests.tiny import TinyNet, batches

peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0
HEAD = "*head.modules_to_save*"


def _lora_model():
    torch.manual_seed(0)
    base = TinyNet()
    pristine = copy.deepcopy(base.state_dict())
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["body.0", "body.2"], modules_to_save=["head"])
    return peft.get_peft_model(base, cfg), pristine


def _train_id3_over_lora(budget: int, steps: int = 6):
    model, pristine = _lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    id3, _ = selector_for_module(model, "id3", ID3Config(budget=budget, fully_trainable=(HEAD,)), steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    id3.attach(opt)
    for x, y in batches(steps, 1):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        id3.select()
        id3.mask_grads()
        opt.step()
    return model, pristine, before, id3


def test_chosen_entries_lie_only_in_lora_matrices_and_fully_trainable_groups() -> None:
    head = 16 * 3 + 3
    model, _, before, id3 = _train_id3_over_lora(head + 30)
    state = id3.mask_state()
    assert len(state) == head + 30
    for name in state.params:
        assert ".lora_A." in name or ".lora_B." in name or ".modules_to_save." in name, name
    assert sum(pm.indices.numel() for n, pm in state.params.items() if "lora_" in n) == 30
    assert_only_chosen_moved(before, dict(model.named_parameters()), chosen_indices(state))
    for name, p in model.named_parameters():
        if "lora_" not in name and "modules_to_save" not in name:
            assert not p.requires_grad, name


def test_folded_weights_reproduce_the_trained_peft_model() -> None:
    model, pristine, _, _ = _train_id3_over_lora(16 * 3 + 3 + 40)
    model.eval()
    state = {n: p.detach() for n, p in model.named_parameters()}
    plain = {k: v.clone() for k, v in pristine.items()}
    plain["head.weight"] = state["base_model.model.head.modules_to_save.default.weight"]
    plain["head.bias"] = state["base_model.model.head.modules_to_save.default.bias"]
    merged = TinyNet()
    merged.load_state_dict(fold_lora(plain, state, ALPHA, RANK))
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)
        untrained = TinyNet().eval()
        untrained.load_state_dict(pristine)
        assert not torch.allclose(untrained(x), model(x))  # it did train

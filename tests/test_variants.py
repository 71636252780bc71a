"""ID3 score variants (id3.grad_ema, id3.score_norm): what each chooses, and that the defaults stay the paper's."""

from __future__ import annotations

import pytest
import torch

from id3_ds import ID3Config
from id3_ds.algorithm.id3 import ID3, layout
from id3_ds.algorithm.slices import ParamSlice, TensorSliceAccess
from id3_ds.config import config_from_dict
from id3_ds.errors import ID3Error
from id3_ds.methods import method_spec, selector_for_module
from tests.tiny import TinyNet, batches


def _names_and_params(model):
    return [(n, p) for n, p in model.named_parameters()]


def _run(config: ID3Config, steps: int = 4, lr: float = 1e-2):
    """A plain-torch ID3 run on TinyNet; returns (selector, per step: (flat gradient, flat |theta|, chosen keys))."""
    torch.manual_seed(0)
    model = TinyNet()
    id3, _ = selector_for_module(model, "id3", config, steps)
    params = [p for _, p in _names_and_params(model)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    id3.attach(opt)
    seen = []
    for x, y in batches(steps, 0):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        theta = torch.cat([p.detach().reshape(-1) for p in params]).abs()
        before = {int(h.info.key_base) + int(i) for h in id3.held for i in h.mask.positions}
        id3.select()
        after = {int(h.info.key_base) + int(i) for h in id3.held for i in h.mask.positions}
        seen.append((g, theta, sorted(after - before)))
        id3.mask_grads()
        opt.step()
    return id3, seen, model


def _top(scores: torch.Tensor, k: int, exclude: set[int]) -> list[int]:
    """Brute force: the k best not excluded, by (score desc, key asc)."""
    order = sorted((i for i in range(scores.numel()) if i not in exclude), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def test_default_config_is_the_paper_score_with_no_scorer() -> None:
    assert method_spec("id3", 0, ID3Config()).scorer is None  # the mask core's own importance: the paper's choice
    assert method_spec("id3", 0, ID3Config(grad_ema=0.9)).scorer is not None


def test_grad_ema_chooses_the_top_of_the_moving_average() -> None:
    beta, budget, steps = 0.8, 60, 4
    _, seen, _ = _run(ID3Config(budget=budget, grad_ema=beta), steps)
    avg = torch.zeros_like(seen[0][0])
    chosen: set[int] = set()
    for g, theta, got in seen:
        avg = beta * avg + (1 - beta) * g
        want = _top(avg.abs() / (theta + 1e-3), len(got), chosen)
        assert got == want
        chosen |= set(got)
    assert len(chosen) == budget
    # and it is not what this step's gradient alone would choose (else the test could not fail)
    _, plain, _ = _run(ID3Config(budget=budget), steps)
    assert [s[2] for s in plain] != [s[2] for s in seen]


def test_score_norm_tensor_divides_by_each_tensors_mean_score() -> None:
    budget, steps = 60, 3
    id3, seen, model = _run(ID3Config(budget=budget, score_norm="tensor"), steps)
    sizes = [p.numel() for _, p in _names_and_params(model)]
    chosen: set[int] = set()
    for g, theta, got in seen:
        h = g.abs() / (theta + 1e-3)
        parts = torch.split(h, sizes)
        normed = torch.cat([p / p.mean() for p in parts])
        assert got == _top(normed, len(got), chosen)
        chosen |= set(got)


def test_score_norm_lets_a_tensor_with_small_scores_compete() -> None:
    """Two tensors of the same score shape, one 100x larger: the paper's score takes all of B from the large one,
    the normalised score about half from each."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.nn.Parameter(torch.ones(200)), torch.nn.Parameter(torch.ones(200))
    a.grad = torch.rand(200, generator=g) * 100
    b.grad = torch.rand(200, generator=g)

    def picks(cfg: ID3Config) -> tuple[int, int]:
        slices, selectable, _ = layout([("a", (200,)), ("b", (200,))], cfg)
        acc = {"a": TensorSliceAccess(a), "b": TensorSliceAccess(b)}
        id3 = ID3(
            [(s, acc[s.name]) for s in slices], cfg, 1, selectable=selectable, scorer=method_spec("id3", 0, cfg).scorer
        )
        id3.select()
        return tuple(len(h.mask) for h in id3.held)

    assert picks(ID3Config(budget=40)) == (40, 0)
    from_a, from_b = picks(ID3Config(budget=40, score_norm="tensor"))
    assert from_a + from_b == 40 and 10 <= from_b <= 30


def test_score_norm_refuses_a_tensor_split_across_ranks() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    cfg = ID3Config(budget=10, score_norm="tensor")
    slices, selectable, _ = layout([(n, tuple(p.shape)) for n, p in model.named_parameters()], cfg)
    params = dict(model.named_parameters())
    s = slices[0]
    half = ParamSlice(s.name, s.shape, s.key_base, 0, s.numel // 2)
    x, y = batches(1)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()

    class Half(TensorSliceAccess):
        def grad(self):
            return self.param.grad.view(-1)[: s.numel // 2]

        def value(self):
            return self.param.data.view(-1)[: s.numel // 2]

    id3 = ID3([(half, Half(params[s.name]))], cfg, 2, selectable=selectable, scorer=method_spec("id3", 0, cfg).scorer)
    with pytest.raises(ID3Error, match="score_norm='tensor' needs each tensor whole"):
        id3.select()


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"grad_ema": 1.0}, "grad_ema must be in"),
        ({"grad_ema": -0.1}, "grad_ema must be in"),
        ({"score_norm": "layer"}, "score_norm must be one of"),
        ({"grad_ema": 0.9, "state": "sparse"}, "not supported with id3.state=sparse"),
    ],
)
def test_variant_keys_are_validated(bad, match) -> None:
    with pytest.raises(ID3Error, match=match):
        ID3Config(**bad)


def test_variant_keys_reach_the_run_config() -> None:
    raw = {"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"path": "x.jsonl"}, "train": {"steps": 1}}
    cfg = config_from_dict({**raw, "id3": {"grad_ema": 0.5, "score_norm": "tensor"}})
    assert cfg.id3.grad_ema == 0.5 and cfg.id3.score_norm == "tensor"

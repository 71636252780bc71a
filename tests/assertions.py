"""Assertions shared by the tests: the one check every training path must pass, written once."""

from __future__ import annotations

from collections.abc import Mapping

import torch

_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of t, flat: NaN equals the same NaN and 0.0 differs from -0.0, as 'bit-identical' means."""
    t = t.detach().reshape(-1)
    return t.view(_SAME_SIZE_INT[t.element_size()]) if t.is_floating_point() else t


def chosen_indices(state) -> dict[str, torch.Tensor]:
    """{name: flat indices of the chosen entries} of a MaskState (the form assert_only_chosen_moved takes)."""
    return {name: pm.indices for name, pm in state.params.items()}


def assert_only_chosen_moved(
    base: Mapping[str, torch.Tensor],
    final: Mapping[str, torch.Tensor],
    chosen: Mapping[str, torch.Tensor],
    *,
    chosen_must_move: bool = False,
) -> None:
    """Every entry outside `chosen` is bit-identical in `final` and `base`; a tensor absent from `chosen` is
    bit-identical as a whole.

    `chosen` maps a tensor name to the flat indices (or a flat bool mask) of its chosen entries. With
    `chosen_must_move`, every chosen entry must also differ from its base value (a run that trained them).
    Compare like with like: cast `base` to the dtype the run trained in before calling.
    """
    assert set(chosen) <= set(base), f"chosen tensors missing from the base: {sorted(set(chosen) - set(base))}"
    for name, b in base.items():
        assert name in final, f"{name} is missing from the final weights"
        f = final[name]
        same = f.shape == b.shape and f.dtype == b.dtype
        assert same, f"{name}: final {f.dtype}{list(f.shape)} vs base {b.dtype}{list(b.shape)}"
        moved = _bits(f) != _bits(b)
        mask = torch.zeros_like(moved)
        if name in chosen:
            idx = chosen[name].reshape(-1)
            mask = idx.to(torch.bool) if idx.dtype == torch.bool else mask.index_fill(0, idx.to(torch.int64), True)
        wrong = (moved & ~mask).nonzero().reshape(-1)
        assert wrong.numel() == 0, f"{wrong.numel()} unchosen entries of {name} moved, first at {wrong[:5].tolist()}"
        if chosen_must_move:
            still = (~moved & mask).nonzero().reshape(-1)
            assert still.numel() == 0, f"{still.numel()} chosen entries of {name} never moved: {still[:5].tolist()}"

"""train.optimizer=adamw_8bit: bitsandbytes' AdamW8bit as DeepSpeed's client optimizer.

The trap it brings to ID3: 8-bit moments are re-quantized block by block (256 entries share one absmax),
and bitsandbytes' quantizer does not round an exact 0 to the zero code when the block holds a nonzero
moment, so an unchosen entry next to a chosen one gets a nonzero moment and moves. These tests pin the trap
and the fix (id3_ds/training/optimizers.py) in pure torch first.
"""

from __future__ import annotations

import pytest
import torch

from id3_ds.training.optimizers import BNB_BLOCK, build_client_optimizer

pytest.importorskip("bitsandbytes")

BLOCKS = 20  # 5,120 entries: above bitsandbytes' min_8bit_size (4096), so its moments are 8-bit
SMALL = 1000  # under min_8bit_size: bitsandbytes keeps fp32 moments for it


def _masks(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen from step 0, chosen from step 4): block 0 mixes chosen and unchosen entries, block 2 holds one
    chosen entry, block 5 none until step 4, and every other block is never chosen (absmax stays 0). Entries
    join at step 4 in blocks 0, 2 and 5."""
    first = torch.zeros(n, dtype=torch.bool)
    first[0:BNB_BLOCK:3] = True
    first[2 * BNB_BLOCK + 5] = True
    later = first.clone()
    later[5 * BNB_BLOCK + 7 : 5 * BNB_BLOCK + 40 : 4] = True
    later[1] = later[2 * BNB_BLOCK + 6] = True  # join blocks that already hold large moments
    return first, later


def _train(optimizer_name: str, steps: int = 9, lr: float = 1e-2) -> tuple[dict, dict, list[dict]]:
    """A big (8-bit) and a small (fp32-moment) tensor, masked gradients as ID3 leaves them; returns the start
    values, the masks of the last step, and the weights after every step."""
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(BLOCKS * BNB_BLOCK))
    small = torch.nn.Parameter(torch.randn(SMALL))
    params = {"big": big, "small": small}
    base = {k: p.detach().clone() for k, p in params.items()}
    every7 = torch.arange(SMALL) % 7 == 0
    masks = {"big": _masks(big.numel()), "small": (every7, every7 | (torch.arange(SMALL) % 5 == 0))}
    opt = build_client_optimizer(optimizer_name, list(params.values()), lr)
    history = []
    for step in range(steps):
        scale = 1e3 if step % 3 == 0 else 1e-3  # large chosen gradients, then tiny ones: wide absmax swings
        for k, p in params.items():
            mask = masks[k][0] if step < 4 else masks[k][1]
            p.grad = torch.randn(p.shape) * scale * mask
        opt.step()
        history.append({k: p.detach().clone() for k, p in params.items()})
    return base, {k: m[1] for k, m in masks.items()}, history


def test_plain_bitsandbytes_moves_unchosen_entries_in_mixed_blocks() -> None:
    """The trap, pinned: without the fix, entries of a block that also holds chosen ones drift (if this starts
    passing with unchanged weights, bitsandbytes fixed its quantizer and the workaround may go)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(BLOCKS * BNB_BLOCK))
    base = p.detach().clone()
    mask, _ = _masks(p.numel())
    opt = bnb.optim.AdamW8bit([p], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        p.grad = torch.randn(p.shape) * mask
        opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8
    moved = (p.detach() != base) & ~mask
    assert moved[:BNB_BLOCK].any() and moved[2 * BNB_BLOCK : 3 * BNB_BLOCK].any()  # the mixed blocks
    assert not moved[BNB_BLOCK : 2 * BNB_BLOCK].any()  # an all-unchosen block: absmax 0, no NaN, no move


def test_unchosen_entries_stay_bit_identical_with_8bit_moments() -> None:
    base, masks, history = _train("adamw_8bit")
    for after in history:
        for k, mask in masks.items():
            assert not torch.isnan(after[k]).any()
            # entries chosen only at step 4 count as unchosen before it
            assert torch.equal(after[k][~mask], base[k][~mask]), f"an unchosen entry of {k} moved"
    for k, mask in masks.items():
        assert (history[-1][k][mask] != base[k][mask]).all(), f"a chosen entry of {k} never moved"


def test_moments_are_8bit_and_unchosen_moments_exactly_zero() -> None:
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(BLOCKS * BNB_BLOCK))
    small = torch.nn.Parameter(torch.randn(SMALL))
    mask, _ = _masks(p.numel())
    opt = build_client_optimizer("adamw_8bit", [p, small], 1e-2)
    for _ in range(4):
        p.grad = torch.randn(p.shape) * mask
        small.grad = torch.randn(SMALL)
        opt.step()
    st = opt.state[p]
    assert st["state1"].dtype == torch.uint8 and st["state2"].dtype == torch.uint8
    assert opt.state[small]["state1"].dtype == torch.float32  # under min_8bit_size: fp32, bitsandbytes' default
    for s, a, q in (("state1", "absmax1", "qmap1"), ("state2", "absmax2", "qmap2")):
        moment = F.dequantize_blockwise(st[s], absmax=st[a], code=st[q], blocksize=BNB_BLOCK)
        assert (moment[~mask] == 0).all() and (moment[mask] != 0).any()


def test_an_entry_chosen_later_starts_from_zero_moments_as_in_fp32_adam() -> None:
    """At the step an entry joins, its moments were exactly 0, so its first update is fp32 Adam's (the update
    is computed in fp32 before re-quantization); a leftover quantization code in its second moment would
    shrink that step by orders of magnitude next to a block of large moments."""
    base8, masks, hist8 = _train("adamw_8bit", steps=5)
    base32, _, hist32 = _train("torch_adamw", steps=5)
    first, later = _masks(BLOCKS * BNB_BLOCK)
    joined = later & ~first
    step8 = hist8[4]["big"][joined] - hist8[3]["big"][joined]
    step32 = hist32[4]["big"][joined] - hist32[3]["big"][joined]
    assert torch.equal(base8["big"], base32["big"])
    torch.testing.assert_close(step8, step32, rtol=1e-4, atol=1e-7)


def test_unknown_optimizer_name_is_one_clear_line() -> None:
    from id3_ds.errors import ID3Error

    with pytest.raises(ID3Error, match="train.optimizer='sgd' is not one of deepspeed, torch_adamw, adamw_8bit"):
        build_client_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))], 1e-3)

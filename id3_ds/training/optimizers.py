"""The client optimizer a run hands DeepSpeed (`train.optimizer`): none (DeepSpeed's own Adam/AdamW), a
`torch.optim.AdamW`, or bitsandbytes' `AdamW8bit` (8-bit moments).

AdamW8bit keeps each Adam moment as one uint8 code per entry plus one fp32 absmax per block of 256 entries
(2 bytes per entry against torch AdamW's 8). Its re-quantization is not exact at zero: bitsandbytes 0.50's
CPU quantizer rounds an exact 0 inside a block holding a nonzero moment to a small nonzero code (2.1e-5 x
absmax for the first moment), so an entry whose gradient is always 0 (every unchosen ID3 entry) gets a
nonzero moment after its block's first update and its weight moves from the next step on: ID3's contract
(unchosen entries bit-identical to the base) breaks. `AdamW8bitExactZeros` restores what fp32 Adam does
exactly: a moment that is 0 and receives a 0 gradient stays 0. That needs no mask, so it works on whatever
tensors DeepSpeed hands the optimizer (whole parameters at stage 0, flat fp32 partitions at ZeRO 1-3).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from id3_ds.errors import ID3Error

OPTIMIZERS = ("deepspeed", "torch_adamw", "adamw_8bit")
BNB_BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer states (Optimizer2State.init_state)


def build_client_optimizer(name: str, groups: Iterable, lr: float) -> torch.optim.Optimizer | None:
    """The client optimizer for `train.optimizer` (None: DeepSpeed builds its own from the config).

    weight_decay is 0 by default: masked methods decay chosen entries themselves (an optimizer's decay would
    shrink unchosen ones too); dense methods' groups carry their own rate.
    """
    if name == "deepspeed":
        return None
    if name == "torch_adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    if name == "adamw_8bit":
        return make_adamw_8bit(groups, lr=lr, weight_decay=0.0)
    raise ID3Error(f"train.optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")


def make_adamw_8bit(params: Iterable, **kwargs) -> torch.optim.Optimizer:
    """An `AdamW8bitExactZeros` (bitsandbytes is imported only here: it is slow to import and prints a line)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ID3Error(
            f"train.optimizer=adamw_8bit needs bitsandbytes ({e}); pip install -c constraints.txt bitsandbytes"
        ) from None
    return _exact_zeros_class()(params, **kwargs)


def _exact_zeros_class() -> type:
    import bitsandbytes as bnb

    class AdamW8bitExactZeros(bnb.optim.AdamW8bit):
        """bitsandbytes' AdamW8bit, except that a moment which is exactly 0 and gets an exactly-0 gradient stays
        exactly 0 (as in fp32 Adam), so a weight whose gradient is always 0 never moves.

        Tensors under `min_8bit_size` entries (4096, bitsandbytes' default, kept) get fp32 moments and
        bitsandbytes' 32-bit update, which is exact at zero already. Transient cost of the fix per 8-bit
        tensor: about 3 bytes per entry (boolean masks) during its update.
        """

        @torch.no_grad()
        def update_step(self, group, p, gindex, pindex):
            state = self.state[p]
            if state["state1"].dtype != torch.uint8:
                return super().update_step(group, p, gindex, pindex)
            idle = p.grad.reshape(-1) == 0
            keep = []
            for s, a, q in (("state1", "absmax1", "qmap1"), ("state2", "absmax2", "qmap2")):
                code = zero_code(state[q])
                k = dequantizes_to_zero(state[s], state[a], code)
                k &= idle
                keep.append((state[s], k, code))
            del idle
            super().update_step(group, p, gindex, pindex)
            for codes, k, code in keep:
                codes.view(-1).masked_fill_(k, code)

    return AdamW8bitExactZeros


def zero_code(qmap: torch.Tensor) -> int:
    """The index of the exact 0 in a bitsandbytes quantization map (127 in the signed dynamic map, 0 in the
    unsigned one)."""
    hits = (qmap == 0).nonzero()
    if hits.numel() == 0:
        raise ID3Error("this bitsandbytes quantization map has no exact 0; pip install -c constraints.txt bitsandbytes")
    return int(hits[0, 0])


def dequantizes_to_zero(codes: torch.Tensor, absmax: torch.Tensor, code: int) -> torch.Tensor:
    """Boolean, one per entry: the 8-bit state dequantizes to exactly 0 (the zero code, or a block whose absmax
    is 0: an all-zero block, where any code times 0 is 0)."""
    flat = codes.view(-1)
    out = flat == code
    dead = absmax == 0
    if bool(dead.any()):
        out |= dead.repeat_interleave(BNB_BLOCK)[: flat.numel()]
    return out

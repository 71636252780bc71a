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

import functools
from collections.abc import Iterable

import torch

from id3_ds.errors import ID3Error

OPTIMIZERS = ("deepspeed", "torch_adamw", "adamw_8bit")
BNB_BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer states (Optimizer2State.init_state)
CHUNK = 1 << 22  # entries per 8-bit update call (a multiple of BNB_BLOCK): bounds its transient to ~50 MiB


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


@functools.cache  # one class: every optimizer built is an instance of the same type
def _exact_zeros_class() -> type:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    class AdamW8bitExactZeros(bnb.optim.AdamW8bit):
        """bitsandbytes' AdamW8bit, except that a moment which is exactly 0 and gets an exactly-0 gradient stays
        exactly 0 (as in fp32 Adam), so a weight whose gradient is always 0 never moves; and a tensor is updated
        in chunks of whole quantization blocks.

        Why chunks: bitsandbytes' CPU update dequantizes both moments of the whole tensor to fp32 first, and
        under ZeRO 1-3 the tensor is a rank's whole flat partition, so its transient equals the 8 bytes per
        entry of fp32 moments that 8-bit state is meant to save (also on a GPU machine with the optimizer
        offloaded to CPU). Blocks never straddle chunks, so the result is the unchunked update's, bit for bit.

        Tensors under `min_8bit_size` entries (4096, bitsandbytes' default, kept) get fp32 moments and
        bitsandbytes' 32-bit update, which is exact at zero already.
        """

        @torch.no_grad()
        def update_step(self, group, p, gindex, pindex):
            state = self.state[p]
            if state["state1"].dtype != torch.uint8:
                return super().update_step(group, p, gindex, pindex)
            config = self.get_config(gindex, pindex, group)
            state["step"] += 1
            p.data = p.data.contiguous()  # as bitsandbytes does: its kernels take flat contiguous memory
            p.grad = p.grad.contiguous()
            betas = config["betas"]
            params, grads = p.data.view(-1), p.grad.view(-1)
            s1, s2 = state["state1"].view(-1), state["state2"].view(-1)
            z1, z2 = zero_code(state["qmap1"]), zero_code(state["qmap2"])
            for lo in range(0, params.numel(), CHUNK):
                hi = min(lo + CHUNK, params.numel())
                blocks = slice(lo // BNB_BLOCK, -(-hi // BNB_BLOCK))
                a1, a2 = state["absmax1"][blocks], state["absmax2"][blocks]
                idle = grads[lo:hi] == 0
                keep1 = dequantizes_to_zero(s1[lo:hi], a1, z1) & idle
                keep2 = dequantizes_to_zero(s2[lo:hi], a2, z2) & idle
                del idle
                F.optimizer_update_8bit_blockwise(
                    self.optimizer_name,
                    grads[lo:hi],
                    params[lo:hi],
                    s1[lo:hi],
                    s2[lo:hi],
                    betas[0],
                    betas[1],
                    betas[2] if len(betas) >= 3 else 0.0,
                    config.get("alpha", 0.0),
                    config["eps"],
                    state["step"],
                    config["lr"],
                    state["qmap1"],
                    state["qmap2"],
                    a1,
                    a2,
                    config["weight_decay"],
                    gnorm_scale=1.0,
                    skip_zeros=config["skip_zeros"],
                )
                s1[lo:hi].masked_fill_(keep1, z1)
                s2[lo:hi].masked_fill_(keep2, z2)

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

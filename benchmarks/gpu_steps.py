"""ID3's step on one device against full fine-tuning and against QLoRA: time, host syncs, peak memory.

Two workers of benchmarks/gpu_check.py (phases `steps` and `nf4`), each run in its own process so that its
peak memory is its own; both also run on the CPU (the check's dry run), where syncs and memory are n/a.

steps: per model shape (SmolLM2-135M's and the check's ~1B LLaMA; random weights built on the device, no
download), plain torch, micro-batches of random tokens. Steps alternate "with" and "without" (the order
flipping every pair, as bench_step_overhead does) so drift cancels:
  dense   one fp32 model (bf16 autocast on a GPU), torch AdamW over every weight; "with" adds ID3's select
          + mask_grads between backward and clipping (B = 0.1 % over 1000 steps) = the dense-state step;
  sparse  two bf16 models: "without" = full fine-tuning with torch AdamW, "with" = sparse-state ID3
          (SparseID3: select, clip, Adam on chosen entries only).
  Host syncs per step come from torch.cuda.set_sync_debug_mode("warn") (each sync is one warning, counted
  over ID3's part of the step); select_ms is ID3's part alone, floor_ms one read of g and theta plus a write
  (g *= theta), the least memory traffic selection can need.
nf4: a LLaMA-3-8B-shaped model (random bf16 weights on the device) whose linear layers become nf4, trained a
  few steps two ways at the same trainable count: QLoRA (bitsandbytes Linear4bit + PEFT LoRA r=16 on every
  projection, torch AdamW) and sparse-state ID3 (id3_ds.models.quantized nf4 base, B = LoRA's count).
  Peak memory of each (torch.cuda.max_memory_allocated, building included and steps alone) and step time.
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab, tied head
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152, True),
    "llama-1b": (2048, 16, 32, 32, 5632, 32000, False),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256, False),
    "tiny": (64, 2, 4, 4, 172, 512, False),
}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(shape: str, dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> torch.nn.Module:
    """A LLaMA-style model of `shape` with random weights, built directly in `dtype` on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=2048,
    )
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)


def lora_count(shape: str, rank: int) -> int:
    """LoRA's trainable entries on every LINEAR projection: r x (in + out) per layer."""
    hidden, layers, heads, kv, inter, _, _ = SHAPES[shape]
    kv_dim = hidden // heads * kv
    per_layer = [(hidden, hidden), (hidden, kv_dim), (hidden, kv_dim), (hidden, hidden)]
    per_layer += [(hidden, inter), (hidden, inter), (inter, hidden)]
    return layers * sum(rank * (i + o) for i, o in per_layer)


class Syncs:
    """Host syncs inside `with counting():` windows, from torch.cuda.set_sync_debug_mode("warn")."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.counts: list[int] = []

    @contextlib.contextmanager
    def counting(self):
        if not self.cuda:
            yield
            return
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        self.counts.append(sum("synchroniz" in str(w.message) for w in seen))

    def per_step(self) -> float | None:
        return statistics.median(self.counts) if self.counts else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _tokens(vocab: int, micro: int, seq: int, i: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randint(0, vocab, (micro, seq), generator=g).to(device)


def _floor_ms(model: torch.nn.Module, device: torch.device) -> float:
    """One read of every gradient and weight and one write of the gradient (the gradients are spent)."""
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(p.data)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def dense_row(shape: str, device: torch.device, micro: int, seq: int, pairs: int) -> dict:
    """Full fine-tuning vs dense-state ID3, one fp32 model and one AdamW (bf16 autocast on a GPU)."""
    from id3_ds import ID3Config, from_module

    model = llama(shape, torch.float32, device)
    vocab = model.config.vocab_size
    id3 = from_module(model, ID3Config(budget=0.001), 1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    id3.attach(opt)
    cuda = device.type == "cuda"
    syncs = Syncs(cuda)
    times: dict[str, list[float]] = {"full": [], "id3": [], "select": [], "floor": []}
    peaks = {"full": 0, "id3": 0}
    for i in range(2 * pairs + 2):
        kind = ("id3", "full")[(i + i // 2) % 2]
        ids = _tokens(vocab, micro, seq, i, device)
        _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if kind == "id3":
            _sync(device)
            s0 = time.perf_counter()
            with syncs.counting() if i >= 2 else contextlib.nullcontext():
                id3.select()
                id3.mask_grads()
            _sync(device)
            select_s = time.perf_counter() - s0
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        _sync(device)
        if i >= 2:
            times[kind].append(time.perf_counter() - t0)
            peaks[kind] = max(peaks[kind], _peak(device) or 0)
            if kind == "id3":
                times["select"].append(select_s)
                times["floor"].append(_floor_ms(model, device) / 1e3)
    row = _row("dense", shape, model, times, syncs, peaks if cuda else None)
    del model, opt, id3
    return row


def sparse_row(shape: str, device: torch.device, micro: int, seq: int, pairs: int) -> dict:
    """Full fine-tuning of a bf16 model (torch AdamW) vs sparse-state ID3 on a second, identical bf16 model."""
    from id3_ds import ID3Config
    from id3_ds.algorithm import SparseID3

    full = llama(shape, torch.bfloat16, device)
    opt = torch.optim.AdamW(full.parameters(), lr=1e-4, weight_decay=0.0)
    model = llama(shape, torch.bfloat16, device)
    drv = SparseID3.from_module(model, ID3Config(budget=0.001), 1000, lr=1e-4, max_grad_norm=1.0)
    vocab = model.config.vocab_size
    cuda = device.type == "cuda"
    syncs = Syncs(cuda)
    times: dict[str, list[float]] = {"full": [], "id3": [], "select": [], "floor": []}
    peaks = {"full": 0, "id3": 0}
    for i in range(2 * pairs + 2):
        kind = ("id3", "full")[(i + i // 2) % 2]
        ids = _tokens(vocab, micro, seq, i, device)
        _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        if kind == "full":
            opt.zero_grad(set_to_none=True)
            full(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(full.parameters(), 1.0)
            opt.step()
        else:
            model(input_ids=ids, labels=ids).loss.backward()
            _sync(device)
            s0 = time.perf_counter()
            with syncs.counting() if i >= 2 else contextlib.nullcontext():
                drv.step()
            _sync(device)
            select_s = time.perf_counter() - s0
        _sync(device)
        if i >= 2:
            times[kind].append(time.perf_counter() - t0)
            peaks[kind] = max(peaks[kind], _peak(device) or 0)
            if kind == "id3":
                times["select"].append(select_s)
    row = _row("sparse", shape, model, times, syncs, peaks if cuda else None)
    row["sparse_state_bytes"] = drv.state_bytes
    del full, opt, model, drv
    return row


def _row(mode: str, shape: str, model, times: dict, syncs: Syncs, peaks: dict | None) -> dict:
    med = {k: statistics.median(v) * 1e3 if v else None for k, v in times.items()}
    return {
        "mode": mode,
        "shape": shape,
        "params": sum(p.numel() for p in model.parameters()),
        "full_ms": med["full"],
        "id3_ms": med["id3"],
        "ratio": med["id3"] / med["full"],
        "id3_part_ms": med["select"],
        "floor_ms": med["floor"],
        "syncs_per_step": syncs.per_step(),
        "peak_full_bytes": None if peaks is None else peaks["full"],
        "peak_id3_bytes": None if peaks is None else peaks["id3"],
    }


def run_steps(shapes: list[str], device: torch.device, micro: int, seq: int, pairs: int) -> list[dict]:
    rows = []
    for shape in shapes:
        for make in (dense_row, sparse_row):
            rows.append(make(shape, device, micro, seq, pairs))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# -- nf4: sparse-state ID3 vs QLoRA at the same trainable count ------------------------------------------------


def nf4_variant(variant: str, shape: str, device: torch.device, micro: int, seq: int, steps: int, rank: int) -> dict:
    """Build, quantize and train `variant` (qlora | id3_sparse) for `steps` steps; its peaks and step time."""
    from id3_ds import ID3Config
    from id3_ds.algorithm import SparseID3
    from id3_ds.models.load import wrap_lora
    from id3_ds.models.quantized import quantize_for_lora, quantize_selectable

    _reset_peak(device)
    t_build = time.perf_counter()
    model = llama(shape, torch.bfloat16, device)
    count = lora_count(shape, rank)
    if variant == "qlora":
        quantize_for_lora(model)
        model = wrap_lora(model, rank, 2 * rank, 0.0, LINEAR, classification=False)
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

        def step(ids: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

    else:
        names = [n for n, _ in model.named_parameters() if n.endswith("proj.weight")]
        for p in model.parameters():
            p.requires_grad_(False)
        quantize_selectable(model, names, "nf4")
        cfg = ID3Config(budget=count, targets=("*proj.weight",))
        drv = SparseID3.from_module(model, cfg, steps, lr=1e-4, max_grad_norm=1.0)
        trainable = drv.id3.budget

        def step(ids: torch.Tensor) -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            drv.step()

    _sync(device)
    build_s = time.perf_counter() - t_build
    build_peak = _peak(device)
    _reset_peak(device)
    vocab = SHAPES[shape][5]
    times = []
    for i in range(steps):
        ids = _tokens(vocab, micro, seq, i, device)
        _sync(device)
        t0 = time.perf_counter()
        step(ids)
        _sync(device)
        times.append(time.perf_counter() - t0)
    out = {
        "variant": variant,
        "shape": shape,
        "trainable": trainable,
        "lora_count": count,
        "build_s": build_s,
        "peak_build_bytes": build_peak,
        "peak_steps_bytes": _peak(device),
        "step_ms": statistics.median(times[1:] or times) * 1e3,
    }
    model = None  # free the variant before the next one is built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run_nf4(shape: str, device: torch.device, micro: int, seq: int, steps: int, rank: int = 16) -> list[dict]:
    return [nf4_variant(v, shape, device, micro, seq, steps, rank) for v in ("qlora", "id3_sparse")]


def projection_70b(rank: int = 16) -> dict:
    """Where nf4 sparse-state ID3 at LoRA r=16's count lands for a LLaMA-70B shape, from bytes per entry:
    nf4 base 0.5 B + 4 B per 64-block absmax; bf16 embeddings and head; 28 B per chosen entry (mask 16 +
    master and moments 12). Activations and the transient dense gradient of one layer come on top."""
    hidden, layers, inter, vocab, kv = 8192, 80, 28672, 128256, 1024
    linear = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    count = layers * rank * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + inter))
    base = linear * (0.5 + 4 / 64) + 2 * vocab * hidden * 2
    state = 28 * count
    return {
        "linear_entries": linear,
        "lora_r16_count": count,
        "nf4_base_gib": base / 2**30,
        "id3_state_gib": state / 2**30,
        "one_80gb_gpu_gib_before_activations": (base + state) / 2**30,
        "per_rank_of_8_zero3_gib_before_activations": (base + state) / 8 / 2**30,
    }


def worker(what: str, cpu: bool, out: Path, pairs: int) -> None:
    """Entry point of gpu_check's `steps` and `nf4` children."""
    device = torch.device("cpu" if cpu else "cuda")
    if what == "steps":
        shapes = ["tiny"] if cpu else ["smollm2-135m", "llama-1b"]
        micro, seq = (2, 32) if cpu else (8, 512)
        rows = run_steps(shapes, device, micro, seq, pairs)
    else:
        shape = "tiny" if cpu else "llama3-8b"
        micro, seq = (1, 32) if cpu else (1, 512)
        rows = run_nf4(shape, device, micro, seq, steps=3 if cpu else 4)
    out.write_text(json.dumps({"rows": rows, "projection_70b": projection_70b()}))

"""Shared builders for the delta tests: a tiny Llama base on disk, trained with ID3, checkpointed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from id3_ds import ID3Config, MaskState, from_module
from id3_ds.algorithm.mask import ParamMask
from id3_ds.checkpoint import checkpoint_dir, mark_complete, write_id3_shard
from id3_ds.delta.format import CONFIG_FILE, DELTA_FILE

LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def tokens(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, LLAMA["vocab_size"], (2, 16), generator=g) for _ in range(n)]


def train(model, budget: int, steps: int, fully_trainable: tuple[str, ...] = ()):
    id3 = from_module(model, ID3Config(budget=budget, fully_trainable=fully_trainable), steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    id3.attach(opt)
    model.train()
    for x in tokens(steps):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        id3.select()
        id3.mask_grads()
        opt.step()
    model.eval()
    return id3


def split(state: MaskState, world: int) -> list[MaskState]:
    """ZeRO-3 style shards: rank r holds the r-th contiguous flat range of every parameter."""
    out = []
    for r in range(world):
        params = {}
        for name, pm in state.params.items():
            per = -(-pm.numel // world)
            keep = (pm.indices >= r * per) & (pm.indices < (r + 1) * per)
            params[name] = ParamMask(pm.shape, pm.indices[keep], pm.chosen_at[keep], pm.base[keep], pm.value[keep])
        out.append(MaskState(params))
    return out


def write_checkpoint(run: Path, id3, world: int = 1, complete: dict | None = None) -> Path:
    ckpt = checkpoint_dir(run, id3.step)
    for r, shard in enumerate(split(id3.mask_state(with_values=True), world)):
        write_id3_shard(ckpt, r, world, shard, {**id3.state_meta(), "world_size": world})
    info = {"step": id3.step, "id3": {"budget": id3.budget, "eps": 1e-3, "exp": 1.0}, "model": {"name_or_path": "tiny"}}
    mark_complete(ckpt, complete if complete is not None else info)
    return ckpt


@dataclass
class Case:
    base: Path
    run: Path
    ckpt: Path
    model: torch.nn.Module  # the trained model


def make_case(tmp: Path, budget: int = 600, steps: int = 8, world: int = 1, full=("model.norm.weight",)) -> Case:
    model = tiny_llama()
    base = tmp / "base"
    model.save_pretrained(base, max_shard_size="100KB")
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    id3 = train(model, budget, steps, full)
    ckpt = write_checkpoint(tmp / "run", id3, world)
    return Case(base, tmp / "run", ckpt, model)


def rewrite(delta: Path, tensors=None, config=None) -> None:
    """Hand-break a delta: `tensors(dict)` / `config(dict)` edit the loaded contents in place."""
    if tensors is not None:
        with safe_open(str(delta / DELTA_FILE), "pt") as f:
            meta = f.metadata()  # the format/version record load_delta checks; kept so only `tensors` changes
        t = load_file(str(delta / DELTA_FILE))
        tensors(t)
        save_file(t, str(delta / DELTA_FILE), metadata=meta)
    if config is not None:
        c = json.loads((delta / CONFIG_FILE).read_text())
        config(c)
        (delta / CONFIG_FILE).write_text(json.dumps(c))


def two_deltas(tmp: Path) -> tuple[Case, Path, Path]:
    """Two deltas of one base (tiny_llama seed 0): budget 2000 over 10 steps with the norm fully trainable,
    and budget 900 over 6 steps without; their supports overlap in part."""
    from id3_ds.delta import export_delta

    c1 = make_case(tmp / "a", budget=2000, steps=10)
    export_delta(c1.run, c1.base, tmp / "d1")
    c2 = make_case(tmp / "b", budget=900, steps=6, full=())
    export_delta(c2.run, c1.base, tmp / "d2")
    return c1, tmp / "d1", tmp / "d2"

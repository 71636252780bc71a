"""Worker for test_delta_zero3_apply: load a base partitioned under ZeRO-3 (2 ranks), apply a delta, gather.

Writes, from rank 0, the gathered weights after apply_delta and after remove_delta as safetensors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from id3_ds import apply_delta, remove_delta
from id3_ds.integration.op_builds import use_per_environment_extensions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root
from id3_ds.runtime.launching import end_worker  # noqa: E402


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone().contiguous()
    return out


def main(base: str, delta: str, out: str) -> None:
    # the trainer's op folder: torch's shared default one would build DeepSpeed's shm op again (2 min on 2 cores)
    use_per_environment_extensions(os.environ.get("RANK", "0") == "0")
    deepspeed.init_distributed(dist_backend="gloo")
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    keep = HfDeepSpeedConfig(ds)  # noqa: F841  (from_pretrained builds the model partitioned)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()), "model is not partitioned"
    apply_delta(model, delta)
    applied = gathered(model)
    remove_delta(model, delta)
    removed = gathered(model)
    if dist.get_rank() == 0:
        save_file(applied, f"{out}/applied.safetensors")
        save_file(removed, f"{out}/removed.safetensors")
    end_worker()  # every process group released, gloo's threads joined: a clean normal exit


if __name__ == "__main__":
    main(*sys.argv[1:4])

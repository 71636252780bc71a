"""Fine-tune a Hugging Face causal LM or sequence classifier with ID3 (or a baseline) under DeepSpeed.

    deepspeed launch/train.py --config configs/llama7b_id3.json [train.lr=1e-4 id3.budget=0.001 ...]
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny_cpu.json method=pafi

The recipe ships in the package (id3_ds/recipe/train.py; `id3-ds train` runs it in one process):

    cfg = check(argv)   the config, its run plan and the files it names, before anything starts
    run = setup(cfg)    process group, data, model, DeepSpeed engine, the plan's update, resume
    train(run)          the loop: micro-batches, steps, logs, evaluation, checkpoints
    save(run)           the final model and the sparse delta when asked for, shutdown, the last line

Failures end with one `error:` line and exit code 2 (a user error) or 3 (a rank failed or hung).
"""

from __future__ import annotations

import sys

from id3_ds.recipe.train import exit_code, parse_args

__all__ = ["parse_args"]  # `--help` lists the config sections

if __name__ == "__main__" and (code := exit_code(sys.argv[1:])):  # a success returns: runpy callers go on
    sys.exit(code)

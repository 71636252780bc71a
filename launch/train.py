"""Fine-tune a Hugging Face causal LM or sequence classifier with ID3 (or a baseline) under DeepSpeed.

    deepspeed launch/train.py --config configs/llama7b_id3.json [train.lr=1e-4 id3.budget=0.001 ...]
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny_cpu.json method=pafi

Read top to bottom: config, process group, data, model (+ LoRA), DeepSpeed engine, the method's update (ID3 or a
static baseline's mask hook, or dense), resume, loop with evaluation, checkpoints. Every step's examples and
random seed are functions of the step number, so a resumed run continues exactly where the interrupted
one was.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import timedelta

import torch

CONFIG_SECTIONS = """config sections (one JSON file; every key and its default: README.md, "Training" table):
  model      the model to fine-tune: a local HF directory, builtin:tiny-llama or package:...; dtype
  data       training/eval files, format (alpaca, messages, text, classification), max_length, labels
  id3        the budget B of trained entries, eps and exp of the score, target/fully trainable globs
  train      steps or epochs, lr and schedule, batch sizes, output_dir, save/log/eval steps, resume
  lora       LoRA rank (0 = off), alpha, dropout, target modules
  deepspeed  an inline DeepSpeed config or a path to one ("auto" values are filled from train)
  method     id3 (default), random, pafi, fish, bitfit, full or lora

Two jobs on one machine need their own port: deepspeed --master_port N ... (torchrun --master_port N ...).
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, epilog=CONFIG_SECTIONS, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="run config JSON (model, data, id3, train, deepspeed)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 id3.budget=0.001")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    from id3_ds import checkpoint as checkpoints
    from id3_ds.config import load_config
    from id3_ds.errors import ID3Error, SameOnEveryRank
    from id3_ds.training.preflight import preflight
    from id3_ds.training.startup import quiet_third_party_noise

    quiet_third_party_noise()  # third-party warnings nobody can act on; transformers' reports once, on rank 0
    args = parse_args(argv)
    try:  # the config and the files it names, before any process group, model load or folder exists
        cfg = load_config(args.config, args.overrides)
        notes = preflight(cfg)
        finished = checkpoints.already_finished(cfg)  # a finished run says so; changed settings are refused
    except ID3Error as e:  # every rank finds it alike: rank 0 says it (see __main__)
        raise SameOnEveryRank(str(e)) from None
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"note: {note}", flush=True)
    if finished:
        return

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from id3_ds.algorithm.decay import decay_groups
    from id3_ds.algorithm.slices import tied_aliases
    from id3_ds.data import cached_dataset, collate
    from id3_ds.data.evaluate import evaluate
    from id3_ds.integration.ds_config import build_ds_config
    from id3_ds.integration.hook import build_update, freeze_outside, trainable_layout
    from id3_ds.integration.op_builds import clear_stale_build_locks, use_per_environment_extensions
    from id3_ds.integration.params import full_shape
    from id3_ds.integration.start_costs import avoid_start_costs
    from id3_ds.methods import MASKED, method_spec
    from id3_ds.models import load_model, resolve_model, wrap_lora
    from id3_ds.processes import free_port
    from id3_ds.resources import cache_dir
    from id3_ds.training.batches import micro_batch_indices, total_steps
    from id3_ds.training.faults import maybe_hang, maybe_kill, maybe_poison
    from id3_ds.training.guards import stop_if_nonfinite
    from id3_ds.training.loss import step_loss
    from id3_ds.training.lr_schedule import lr_scheduler
    from id3_ds.training.optimizers import build_client_optimizer
    from id3_ds.training.run_log import RunLogger, print_final_line, save_resolved_config
    from id3_ds.training.startup import check_rendezvous_port

    # -- processes ----------------------------------------------------------------------------------
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)  # `python launch/train.py` alone runs one process
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    check_rendezvous_port()  # a port another job holds: one line naming --master_port, not EADDRINUSE later
    use_per_environment_extensions(os.environ["RANK"] == "0")  # ops built once per venv; rank 0 says when
    clear_stale_build_locks()  # before DeepSpeed builds its CPU ops: a dead build's lock would hang us forever
    avoid_start_costs()  # no torch.compile import for DeepSpeed's Muon, one CPU query per rank (its docstring)
    accel = get_accelerator()
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    # a hung rank ends the job instead of hanging: the progress watchdog (train.collective_timeout_s, started at
    # resume) speaks first with a clear line; the backend's own collective timeout is only the backstop
    timeout = timedelta(seconds=cfg.train.collective_timeout_s + 60)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    torch.manual_seed(cfg.train.seed)

    # -- model and data -----------------------------------------------------------------------------
    if is_main:
        model_dir = resolve_model(cfg.model.name_or_path)
    dist.barrier()
    model_dir = resolve_model(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    d = cfg.data
    classification = d.format == "classification"
    cache_root = d.cache_dir or cache_dir()
    dataset, label_names = cached_dataset(d.spec(), tokenizer, model_dir, cache_root, is_main)  # rank 0 builds
    eval_set = ranked = None
    if d.eval_path and d.labels and not classification:  # generative, responses are class names: label ranking
        from id3_ds.data import load_records
        from id3_ds.data.label_ranking import rank_labels, ranking_set

        ranked = ranking_set(load_records(d.eval_path), d.format, tokenizer, d.max_length, list(d.labels))
        if is_main:
            print(f"label ranking: {len(ranked)} eval records, {ranked.dropped} dropped", flush=True)
    elif d.eval_path:  # classification eval uses the training label ids
        eval_labels = tuple(label_names) if label_names else None
        eval_spec = d.spec(path=d.eval_path, packing=False, labels=eval_labels)
        eval_set, _ = cached_dataset(eval_spec, tokenizer, model_dir, cache_root, is_main)
    # the output folder once the data is known to be good: a bad record leaves no folder behind
    checkpoints.check_output_dir(cfg.train.output_dir, is_main)
    save_resolved_config(cfg, is_main)  # output_dir/config.json: what ran, overrides included
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t = cfg.train
    masked = cfg.method in MASKED
    steps = total_steps(len(dataset), t.global_batch(world), t.steps, t.epochs, t.micro_batch_size)

    ds_config, weight_decay = build_ds_config(cfg, world)
    dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (kept alive: makes from_pretrained use zero.Init at stage 3)
    model = load_model(model_dir, classification, dtype, label_names, pad_id)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.method == "lora" and cfg.model.quantization == "nf4":  # QLoRA: PEFT's LoRA over bnb Linear4bit layers
        from id3_ds.models.quantized import quantize_for_lora

        n = quantize_for_lora(model)
        if is_main:
            print(f"model.quantization=nf4: {n} linear layers as bitsandbytes Linear4bit (QLoRA)", flush=True)
    if cfg.lora.rank:
        lo = cfg.lora
        model = wrap_lora(model, lo.rank, lo.alpha, lo.dropout, lo.target_modules, classification)
    method = method_spec(cfg.method, t.seed, cfg.id3) if masked else None  # None: a dense method (full, lora)
    if masked:
        freeze_outside(model, cfg.id3, method.keep)
    if masked and cfg.model.quantization != "none":  # selectable linear weights -> bitsandbytes-packed base + overlay
        from id3_ds.models.quantized import packed_bytes, quantize_selectable

        selectable = [s.name for s in trainable_layout(model, cfg.id3, method.keep)[0] if not s.fully_trainable]
        quantized = quantize_selectable(model, selectable, cfg.model.quantization)
        if is_main:
            print(
                f"model.quantization={cfg.model.quantization}: {len(quantized)} linear weights packed into "
                f"{packed_bytes(model) / 2**20:.1f} MiB",
                flush=True,
            )

    # -- DeepSpeed engine and the method's update (the mask hook, dense, or sparse state) -------------------
    sparse = masked and cfg.id3.state == "sparse"  # no DeepSpeed optimizer: the update holds Adam for B entries
    trainable = [p for p in model.parameters() if p.requires_grad]
    # ID3 applies decay itself (the optimizer's own stays 0); dense methods: no decay on biases and norms
    if masked:
        groups = trainable
    else:  # a tied weight's no_decay pattern may name it by any of its names
        groups = decay_groups(model.named_parameters(), weight_decay, cfg.id3.no_decay, full_shape, tied_aliases(model))
    # None: DeepSpeed's own; torch AdamW or 8-bit AdamW (each dense group carries its own weight_decay)
    client_optimizer = None if sparse else build_client_optimizer(t.optimizer, groups, t.lr)

    def schedule(optimizer):
        return lr_scheduler(t.lr_scheduler, optimizer, t.warmup_steps, steps)  # HF's schedules, without its import

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=None if sparse else groups,
        optimizer=client_optimizer,
        config=ds_config,
        lr_scheduler=None if sparse else schedule,
    )
    update = build_update(  # DeepSpeedID3, DenseUpdate or SparseDeepSpeedID3
        engine, method, cfg.id3, steps, weight_decay, lr=t.lr, max_grad_norm=t.max_grad_norm, make_scheduler=schedule
    )
    device = accel.current_device_name()

    def micro_batch(step: int, micro: int) -> dict:
        idx = micro_batch_indices(len(dataset), t.seed, step, micro, rank, world, t.micro_batch_size, t.grad_accum)
        return {k: v.to(device) for k, v in collate([dataset[i] for i in idx], pad_id).items()}

    # -- resume ---------------------------------------------------------------------------------------
    start = checkpoints.resume(engine, update, cfg, world)
    engine.train()  # from_pretrained returns eval mode (dropout off); an eval pass would otherwise flip it mid-run
    if update.wants_fisher_pass:  # fish: g^2 of sample batches before step 0
        update.fisher_pass(micro_batch, cfg.id3.fish_batches, t.grad_accum)
    logger = RunLogger(t.output_dir, is_main, steps, start, t.progress_bar, t.tensorboard)
    if is_main:
        logger.log(
            {
                "event": "start",
                "method": cfg.method,
                "step": start,
                "steps": steps,
                "world_size": world,
                "budget": update.budget,
                "examples": len(dataset),
                "zero_stage": engine.zero_optimization_stage(),
            }
        )

    def run_eval(done: int) -> None:
        if eval_set is None and ranked is None:
            return
        engine.eval()

        def reduce(sums: torch.Tensor) -> None:
            _all_reduce_cpu(sums, device)

        if ranked is not None:  # its forward passes give the gold responses' eval_loss too: no second pass
            metrics = rank_labels(engine, ranked, pad_id, t.micro_batch_size, device, rank, world, reduce)
        else:
            n_labels = len(label_names) if classification else None
            metrics = evaluate(engine, eval_set, pad_id, t.micro_batch_size, device, rank, world, n_labels, reduce)
        engine.train()
        logger.log({"step": done, **metrics})

    # -- the loop -------------------------------------------------------------------------------------
    window_loss, window_items, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    for step in range(start, steps):
        torch.manual_seed(cfg.train.seed * 1_000_003 + step * world + rank)  # dropout etc.: a function of step
        chosen, nonfinite = 0, False
        maybe_hang(step, rank)
        batches = [micro_batch(step, micro) for micro in range(t.grad_accum)]
        norm = step_loss(batches, world, dist.all_reduce)  # loss items of the whole step: each weighs the same
        for micro, batch in enumerate(batches):
            mean = maybe_poison(update.forward(batch).loss, step, rank)
            value = mean.item()
            nonfinite |= not math.isfinite(value)
            update.backward(norm.scale(micro, mean))
            window_loss += value * norm.items[micro]  # sum of item losses: the log is the item-weighted mean
            window_items += norm.items[micro]
            window_tokens += int(batch["attention_mask"].sum())
        stop_if_nonfinite(nonfinite, step, t.output_dir, device)  # before the step: weights and mask untouched
        chosen = update.step()
        logger.advance()
        done = step + 1
        if done % t.log_steps == 0 or done == steps:
            stats = torch.tensor([window_loss, window_items, window_tokens], dtype=torch.float64, device=device)
            dist.all_reduce(stats)
            elapsed = time.perf_counter() - window_start
            record = {
                "step": done,
                "loss": stats[0].item() / max(stats[1].item(), 1.0),
                "lr": update.lr,
                "grad_norm": update.grad_norm,
                "tokens_per_s": stats[2].item() / elapsed,
            }
            record.update(update.progress(chosen))
            logger.log(record)
            window_loss, window_items, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        if (t.eval_steps and done % t.eval_steps == 0) or done == steps:
            run_eval(done)
        if (t.save_steps and done % t.save_steps == 0) or done == steps:
            checkpoints.save(engine, update, cfg, done, model_dir)
        maybe_kill("kill_after_step", done, rank)
    logger.log({"event": "done", "step": steps})
    logger.close()
    if t.save_final_model:
        checkpoints.save_final_model(engine, model_dir, os.path.join(t.output_dir, "final_model"))
    if t.export_delta and update.masked and is_main:
        from id3_ds.delta.export import export_delta

        out = os.path.join(t.output_dir, "delta")
        export_delta(checkpoints.checkpoint_dir(t.output_dir, steps), model_dir, out, overwrite=True)
        print(f"sparse delta written to {out}", flush=True)
    from id3_ds.integration.shutdown import shutdown

    shutdown()  # barrier, then every process group released now: a clean, quick interpreter exit (its docstring)
    print_final_line(cfg, is_main)  # the last line: output folder, checkpoint, next command


def _all_reduce_cpu(x: torch.Tensor, device: str) -> None:
    """Sum a CPU tensor over ranks through the accelerator's backend (NCCL needs device tensors)."""
    import torch.distributed as dist

    y = x.to(device)
    dist.all_reduce(y)
    x.copy_(y.cpu())


if __name__ == "__main__":
    from id3_ds.errors import ID3Error, SameOnEveryRank

    rank = int(os.environ.get("RANK", "0"))
    try:
        main(sys.argv[1:])
    except ID3Error as e:
        if rank == 0 or not isinstance(e, SameOnEveryRank):  # a config error: once, not once per rank
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RuntimeError as e:  # gloo/NCCL report a hung or dead peer as a RuntimeError subclass
        text = str(e)
        if "timed out" in text.lower() or "timeout" in text.lower() or "connection" in text.lower():
            if rank > 0:  # the failed rank (or rank 0, for a hang) says why; repeating it per rank misleads
                print(f"rank {rank}: stopping because another rank failed", file=sys.stderr, flush=True)
                sys.exit(3)
            print(
                "error: a collective operation failed or timed out: another rank hung or died "
                f"(train.collective_timeout_s bounds the wait); resume with train.resume=auto. [{text[:200]}]",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(3)
        raise

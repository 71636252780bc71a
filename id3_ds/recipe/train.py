"""The training recipe, in named phases: check, setup, train, save.

    check(argv)   the config, its plan and its files, before any process group, model or folder exists
    setup(cfg)    process group, data, model (+ LoRA, a quantized base), DeepSpeed engine, the update, resume
    train(run)    the loop: micro-batches, the update's step, logs, evaluation, checkpoints
    save(run)     the final model and the sparse delta when asked for, shutdown, the last line

launch/train.py (under deepspeed or torchrun) and `id3-ds train` both run `main`. Whatever the mode (method,
optimizer state, quantization, LoRA), the phases ask the run plan (id3_ds/plan.py) and drive the update
through its contract (id3_ds/update/contract.py); they never branch on which update runs. Every step's
examples and random seed are functions of the step number, so a resumed run continues exactly where the
interrupted one was.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from id3_ds import checkpoint as checkpoints
from id3_ds.algorithm.decay import decay_groups
from id3_ds.algorithm.slices import tied_aliases
from id3_ds.config import RunConfig, load_config
from id3_ds.data import cached_dataset, collate, load_records
from id3_ds.data.evaluate import evaluate
from id3_ds.data.label_ranking import rank_labels, ranking_set
from id3_ds.delta.export import export_delta
from id3_ds.errors import ID3Error, SameOnEveryRank
from id3_ds.integration.ds_config import build_ds_config
from id3_ds.integration.engine import all_reduce_cpu, hf_deepspeed_config, init_process_group, initialize
from id3_ds.integration.op_builds import clear_stale_build_locks, use_per_environment_extensions
from id3_ds.integration.params import full_shape
from id3_ds.integration.shutdown import shutdown
from id3_ds.integration.start_costs import avoid_start_costs
from id3_ds.methods import method_spec
from id3_ds.models import load_model, load_tokenizer, resolve_model, wrap_lora
from id3_ds.models.quantized import packed_bytes, quantize_for_lora, quantize_selectable
from id3_ds.plan import RunPlan
from id3_ds.processes import free_port
from id3_ds.recipe.preflight import preflight
from id3_ds.resources import cache_dir
from id3_ds.runtime.faults import maybe_hang, maybe_kill, maybe_poison
from id3_ds.training.batches import micro_batch_indices, total_steps
from id3_ds.training.guards import stop_if_nonfinite
from id3_ds.training.loss import step_loss
from id3_ds.training.lr_schedule import lr_scheduler
from id3_ds.training.optimizers import build_client_optimizer
from id3_ds.training.run_log import RunLogger, print_final_line, save_resolved_config
from id3_ds.training.startup import check_rendezvous_port, quiet_third_party_noise, share_cpu_threads
from id3_ds.update import Update, freeze_outside, trainable_layout, update_for

USAGE = """Fine-tune a Hugging Face causal LM or sequence classifier with ID3 (or a baseline) under DeepSpeed.

    deepspeed launch/train.py --config configs/llama7b_id3.json [train.lr=1e-4 id3.budget=0.001 ...]
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny_cpu.json method=pafi
    id3-ds train --config configs/tiny_cpu.json (one process)
"""

CONFIG_SECTIONS = """config sections (one JSON file; every key and its default: docs/training.md, from README.md):
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
        description=USAGE, epilog=CONFIG_SECTIONS, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="run config JSON (model, data, id3, train, deepspeed)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 id3.budget=0.001")
    return p.parse_args(argv)


@dataclass
class Run:
    """What setup built and the later phases use."""

    cfg: RunConfig
    plan: RunPlan
    rank: int
    world: int
    device: str
    model_dir: str
    dataset: object
    pad_id: int
    steps: int
    engine: object
    update: Update
    start: int
    logger: RunLogger | None = None  # opened once the run is resumed (and a Fisher pass ran)
    label_names: list[str] | None = None
    eval_set: object = None
    ranked: object = None
    keep_alive: list = field(default_factory=list)  # objects DeepSpeed and transformers hold weak references to

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def micro_batch(self, step: int, micro: int) -> dict:
        """The examples of one micro-batch of one step on this rank: a function of the step, so resumes agree."""
        t = self.cfg.train
        idx = micro_batch_indices(
            len(self.dataset), t.seed, step, micro, self.rank, self.world, t.micro_batch_size, t.grad_accum
        )
        return {k: v.to(self.device) for k, v in collate([self.dataset[i] for i in idx], self.pad_id).items()}


# -- check ----------------------------------------------------------------------------------------------


def check(argv: list[str]) -> RunConfig | None:
    """The config, checked against itself, its plan and the files it names; None: a finished run, nothing to do.

    Every rank finds a problem alike, so it is raised as SameOnEveryRank: rank 0 alone says it.
    """
    quiet_third_party_noise()  # third-party warnings nobody can act on; transformers' reports once, on rank 0
    args = parse_args(argv)
    try:  # the config and the files it names, before any process group, model load or folder exists
        cfg = load_config(args.config, args.overrides)
        notes = preflight(cfg)
        finished = checkpoints.already_finished(cfg)  # a finished run says so; changed settings are refused
    except ID3Error as e:
        raise SameOnEveryRank(str(e)) from None
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"note: {note}", flush=True)
    return None if finished else cfg


# -- setup ----------------------------------------------------------------------------------------------


def start_processes(cfg: RunConfig) -> tuple[int, int, str]:
    """(rank, world size, device): the process group, with the start-up costs and hazards dealt with first."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)  # `python launch/train.py` alone runs one process
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    check_rendezvous_port()  # a port another job holds: one line naming --master_port, not EADDRINUSE later
    use_per_environment_extensions(os.environ["RANK"] == "0")  # ops built once per venv; rank 0 says when
    clear_stale_build_locks()  # before DeepSpeed builds its CPU ops: a dead build's lock would hang us forever
    share_cpu_threads()  # the deepspeed launcher leaves OMP_NUM_THREADS unset: N ranks x all cores each
    avoid_start_costs()  # no torch.compile import for DeepSpeed's Muon, one CPU query per rank (its docstring)
    rank, world, device = init_process_group(cfg.train.collective_timeout_s)
    torch.manual_seed(cfg.train.seed)
    return rank, world, device


def load_data(cfg: RunConfig, plan: RunPlan, tokenizer, model_dir: str, is_main: bool):
    """(training set, label names, classification eval set or None, label-ranking eval set or None)."""
    d = cfg.data
    cache_root = d.cache_dir or cache_dir()
    dataset, label_names = cached_dataset(d.spec(), tokenizer, model_dir, cache_root, is_main)  # rank 0 builds
    eval_set = ranked = None
    if d.eval_path and d.labels and not plan.classification:  # generative, responses are class names: ranking
        ranked = ranking_set(load_records(d.eval_path), d.format, tokenizer, d.max_length, list(d.labels))
        if is_main:
            print(f"label ranking: {len(ranked)} eval records, {ranked.dropped} dropped", flush=True)
    elif d.eval_path:  # classification eval uses the training label ids
        eval_labels = tuple(label_names) if label_names else None
        eval_spec = d.spec(path=d.eval_path, packing=False, labels=eval_labels)
        eval_set, _ = cached_dataset(eval_spec, tokenizer, model_dir, cache_root, is_main)
    return dataset, label_names, eval_set, ranked


def build_model(cfg: RunConfig, plan: RunPlan, model_dir: str, label_names, pad_id: int, is_main: bool):
    """The model as the plan trains it: loaded, LoRA-wrapped, frozen outside the mask's reach, quantized."""
    dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    model = load_model(model_dir, plan.classification, dtype, label_names, pad_id)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if plan.qlora:  # QLoRA: PEFT's LoRA over bnb Linear4bit layers
        n = quantize_for_lora(model)
        if is_main:
            print(f"model.quantization=nf4: {n} linear layers as bitsandbytes Linear4bit (QLoRA)", flush=True)
    if plan.lora:
        lo = cfg.lora
        model = wrap_lora(model, lo.rank, lo.alpha, lo.dropout, lo.target_modules, plan.classification)
    keep = method_spec(plan.method, cfg.train.seed, cfg.id3).keep if plan.masked else None  # selectable tensors
    if plan.masked:
        freeze_outside(model, cfg.id3, keep)
    if plan.quantized_base:  # selectable linear weights -> bitsandbytes-packed base + overlay
        selectable = [s.name for s in trainable_layout(model, cfg.id3, keep)[0] if not s.fully_trainable]
        quantized = quantize_selectable(model, selectable, cfg.model.quantization)
        if is_main:
            print(
                f"model.quantization={cfg.model.quantization}: {len(quantized)} linear weights packed into "
                f"{packed_bytes(model) / 2**20:.1f} MiB",
                flush=True,
            )
    return model


def build_engine(cfg: RunConfig, plan: RunPlan, model, ds_config: dict, weight_decay: float, steps: int):
    """(engine, LR schedule maker): DeepSpeed over the model, with the optimizer the plan asks for (none for
    sparse state, whose update holds Adam for the chosen entries)."""
    t = cfg.train
    trainable = [p for p in model.parameters() if p.requires_grad]
    # ID3 applies decay itself (the optimizer's own stays 0); dense methods: no decay on biases and norms
    if plan.masked:
        groups = trainable
    else:  # a tied weight's no_decay pattern may name it by any of its names
        groups = decay_groups(model.named_parameters(), weight_decay, cfg.id3.no_decay, full_shape, tied_aliases(model))

    def schedule(optimizer):
        return lr_scheduler(t.lr_scheduler, optimizer, t.warmup_steps, steps)  # HF's schedules, without its import

    if not plan.engine_optimizer:
        return initialize(model, ds_config, None, None, None), schedule
    # None: DeepSpeed's own; torch AdamW or 8-bit AdamW (each dense group carries its own weight_decay)
    client_optimizer = build_client_optimizer(t.optimizer, groups, t.lr)
    return initialize(model, ds_config, groups, client_optimizer, schedule), schedule


def setup(cfg: RunConfig) -> Run:
    """Everything the loop needs, resumed where the last complete checkpoint left off."""
    plan = cfg.plan
    rank, world, device = start_processes(cfg)
    is_main = rank == 0
    if is_main:
        model_dir = resolve_model(cfg.model.name_or_path)
    dist.barrier()
    model_dir = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(model_dir)
    dataset, label_names, eval_set, ranked = load_data(cfg, plan, tokenizer, model_dir, is_main)
    # the output folder once the data is known to be good: a bad record leaves no folder behind
    checkpoints.check_output_dir(cfg.train.output_dir, is_main)
    save_resolved_config(cfg, is_main)  # output_dir/config.json: what ran, overrides included
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t = cfg.train
    steps = total_steps(len(dataset), t.global_batch(world), t.steps, t.epochs, t.micro_batch_size)

    ds_config, weight_decay = build_ds_config(cfg, world)
    hf_ds = hf_deepspeed_config(ds_config)  # kept alive: makes from_pretrained use zero.Init at stage 3
    model = build_model(cfg, plan, model_dir, label_names, pad_id, is_main)
    engine, schedule = build_engine(cfg, plan, model, ds_config, weight_decay, steps)
    update = update_for(
        plan,
        engine,
        cfg.id3,
        steps,
        weight_decay,
        seed=t.seed,
        lr=t.lr,
        max_grad_norm=t.max_grad_norm,
        make_scheduler=schedule,
    )
    start = checkpoints.resume(engine, update, cfg, world)
    engine.train()  # from_pretrained returns eval mode (dropout off); an eval pass would otherwise flip it mid-run
    run = Run(
        cfg=cfg,
        plan=plan,
        rank=rank,
        world=world,
        device=device,
        model_dir=model_dir,
        dataset=dataset,
        pad_id=pad_id,
        steps=steps,
        engine=engine,
        update=update,
        start=start,
        label_names=label_names,
        eval_set=eval_set,
        ranked=ranked,
        keep_alive=[hf_ds],
    )
    if update.wants_fisher_pass:  # fish: g^2 of sample batches before step 0
        update.fisher_pass(run.micro_batch, cfg.id3.fish_batches, t.grad_accum)
    run.logger = RunLogger(t.output_dir, is_main, steps, start, t.progress_bar, t.tensorboard)
    if is_main:
        run.logger.log(
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
    return run


# -- train ----------------------------------------------------------------------------------------------


def evaluate_now(run: Run, done: int) -> None:
    """The eval set's metrics after `done` steps, logged (classification accuracy, or label ranking)."""
    if run.eval_set is None and run.ranked is None:
        return
    engine, t = run.engine, run.cfg.train
    engine.eval()

    def reduce(sums: torch.Tensor) -> None:
        all_reduce_cpu(sums, run.device)

    if run.ranked is not None:  # its forward passes give the gold responses' eval_loss too: no second pass
        metrics = rank_labels(
            engine, run.ranked, run.pad_id, t.micro_batch_size, run.device, run.rank, run.world, reduce
        )
    else:
        n_labels = len(run.label_names) if run.plan.classification else None
        metrics = evaluate(
            engine, run.eval_set, run.pad_id, t.micro_batch_size, run.device, run.rank, run.world, n_labels, reduce
        )
    engine.train()
    run.logger.log({"step": done, **metrics})


def train(run: Run) -> None:
    """From the resumed step to the last: each step's micro-batches through the update, then its step."""
    cfg, t, update, rank, world = run.cfg, run.cfg.train, run.update, run.rank, run.world
    window_loss, window_items, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    for step in range(run.start, run.steps):
        torch.manual_seed(cfg.train.seed * 1_000_003 + step * world + rank)  # dropout etc.: a function of step
        chosen, nonfinite = 0, False
        maybe_hang(step, rank)
        batches = [run.micro_batch(step, micro) for micro in range(t.grad_accum)]
        norm = step_loss(batches, world, dist.all_reduce)  # loss items of the whole step: each weighs the same
        for micro, batch in enumerate(batches):
            mean = maybe_poison(update.forward(batch).loss, step, rank)
            value = mean.item()
            nonfinite |= not math.isfinite(value)
            update.backward(norm.scale(micro, mean))
            window_loss += value * norm.items[micro]  # sum of item losses: the log is the item-weighted mean
            window_items += norm.items[micro]
            window_tokens += int(batch["attention_mask"].sum())
        stop_if_nonfinite(nonfinite, step, t.output_dir, run.device)  # before the step: weights and mask untouched
        chosen = update.step()
        run.logger.advance()
        done = step + 1
        if done % t.log_steps == 0 or done == run.steps:
            stats = torch.tensor([window_loss, window_items, window_tokens], dtype=torch.float64, device=run.device)
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
            run.logger.log(record)
            window_loss, window_items, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        if (t.eval_steps and done % t.eval_steps == 0) or done == run.steps:
            evaluate_now(run, done)
        if (t.save_steps and done % t.save_steps == 0) or done == run.steps:
            checkpoints.save(run.engine, update, cfg, done, run.model_dir)
        maybe_kill("kill_after_step", done, rank)
    run.logger.log({"event": "done", "step": run.steps})
    run.logger.close()


# -- save -----------------------------------------------------------------------------------------------


def save(run: Run) -> None:
    """What the run was asked to leave besides its checkpoints, then a clean exit and the last line."""
    t = run.cfg.train
    if t.save_final_model:
        checkpoints.save_final_model(run.engine, run.model_dir, os.path.join(t.output_dir, "final_model"))
    if t.export_delta and run.plan.has_delta and run.is_main:
        out = os.path.join(t.output_dir, "delta")
        export_delta(checkpoints.checkpoint_dir(t.output_dir, run.steps), run.model_dir, out, overwrite=True)
        print(f"sparse delta written to {out}", flush=True)
    shutdown()  # barrier, then every process group released now: a clean, quick interpreter exit (its docstring)
    print_final_line(run.cfg, run.is_main)  # the last line: output folder, checkpoint, next command


def main(argv: list[str]) -> None:
    """The recipe: check, setup, train, save."""
    cfg = check(argv)
    if cfg is None:
        return
    run = setup(cfg)
    train(run)
    save(run)


def exit_code(argv: list[str]) -> int:
    """`main` with its failures as one `error:` line each and an exit code: 0 done, 2 a user error, 3 a rank
    that failed or hung (the others stop with a line saying so)."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        main(argv)
    except ID3Error as e:
        if rank == 0 or not isinstance(e, SameOnEveryRank):  # a config error: once, not once per rank
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:  # gloo/NCCL report a hung or dead peer as a RuntimeError subclass
        text = str(e)
        if "timed out" in text.lower() or "timeout" in text.lower() or "connection" in text.lower():
            if rank > 0:  # the failed rank (or rank 0, for a hang) says why; repeating it per rank misleads
                print(f"rank {rank}: stopping because another rank failed", file=sys.stderr, flush=True)
                return 3
            print(
                "error: a collective operation failed or timed out: another rank hung or died "
                f"(train.collective_timeout_s bounds the wait); resume with train.resume=auto. [{text[:200]}]",
                file=sys.stderr,
                flush=True,
            )
            return 3
        raise
    return 0

"""What an ID3 step costs against the same step without ID3: plain torch, DeepSpeed ZeRO-2 and ZeRO-3.

    python benchmarks/bench_step_overhead.py            # ~100M-parameter LLaMA-style model, 2 CPU ranks
    python benchmarks/bench_step_overhead.py --quick    # ~10M parameters, a minute or two

One model, one engine per mode; optimizer steps alternate between "with ID3" (select + mask between
backward and step) and "without" (a plain step), the order flipping every pair so drift and warm-up
cancel. Reported: median step time of each, their ratio and the range of the per-pair ratios (the noise
on a shared machine), the ID3 phases per step (score + local top-k, cross-rank merge, mask growth, gradient
masking), mask bytes per rank and all-gather bytes per step. The plain-torch row also times the memory
floor of ID3's per-step work, one pass that reads every gradient and weight and writes the gradient
(g *= theta, after the step, outside the timed region), and ID3's extra time as a multiple of it.
The budget is 0.1 % of the model over 1000 steps (k = B/T entries chosen per step).

The sparse-state row (`id3.state: sparse`) cannot share an engine with the plain step: its engine has no
DeepSpeed optimizer. So that worker builds two ZeRO-3 engines of the same model, the plain one (DeepSpeed
AdamW, every weight trained: full fine-tuning) and a sparse-state one (DeepSpeed config from
id3_ds.integration.ds_config, update from build_update, as launch/train.py builds them), and alternates
their steps in the same way. Its phase columns stay empty: the scoring runs inside backward's hooks.

The 8-bit row (`--modes 8bit`, not in the default run) compares optimizers, not ID3 against none: two
ZeRO-2 engines with dense-state ID3, one with a client torch AdamW ("without ID3" column) and one with
bitsandbytes' 8-bit AdamW ("with ID3" column; train.optimizer=adamw_8bit), steps alternating likewise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import record_results  # noqa: E402
from id3_ds.integration.op_builds import use_per_environment_extensions  # noqa: E402
from id3_ds.runtime.launching import end_worker, launch_command  # noqa: E402

SIZES = {  # hidden, layers, intermediate, vocab
    "100M": (768, 12, 2048, 8192),
    "10M": (256, 6, 688, 4096),
}


def build_model(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, n, inter, vocab = SIZES[size]
    cfg = LlamaConfig(
        hidden_size=h,
        num_hidden_layers=n,
        intermediate_size=inter,
        vocab_size=vocab,
        num_attention_heads=h // 64,
        num_key_value_heads=h // 64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def batch(vocab: int, step: int, rank: int, micro: int = 2, seq: int = 128) -> dict:
    g = torch.Generator().manual_seed(step * 1000 + rank)
    ids = torch.randint(0, vocab, (micro, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def summarize(times: dict[str, list[float]], id3, pairs: int, world: int, k: int) -> dict:
    phases = {p: s / pairs * 1e3 for p, s in id3.timer.seconds.items()}
    local_chosen = sum(len(h.mask) for h in id3.held)
    pair_ratios = [a / b for a, b in zip(times["id3"], times["full"])]  # the j-th of each ran in pair j
    return {
        "full_ms": statistics.median(times["full"]) * 1e3,
        "id3_ms": statistics.median(times["id3"]) * 1e3,
        "ratio": statistics.median(times["id3"]) / statistics.median(times["full"]),
        "pair_ratio_min": min(pair_ratios),
        "pair_ratio_max": max(pair_ratios),
        "floor_ms": statistics.median(times["floor"]) * 1e3 if times.get("floor") else None,
        "phases_ms": phases,
        "mask_bytes_per_rank": 16 * local_chosen,
        "allgather_bytes_per_step": 16 * k * world if world > 1 else 0,
        "params": sum(h.info.numel for h in id3.held),
    }


def floor_pass(model: torch.nn.Module) -> float:
    """Seconds of one read of every gradient and weight plus one write of the gradient (g *= theta): the
    least memory traffic ID3's scoring and masking can need. Run after the step: the gradients are spent."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(p.data)
    return time.perf_counter() - t0


def run_plain(size: str, pairs: int) -> dict:
    """Single process, torch AdamW: the plain-torch path of id3_ds.algorithm."""
    from id3_ds import ID3Config, from_module

    model = build_model(size)
    steps = 1000
    id3 = from_module(model, ID3Config(budget=0.001), steps)
    id3.timer.enabled = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    id3.attach(opt)
    times = {"full": [], "id3": [], "floor": []}
    vocab = model.config.vocab_size
    for i in range(2 * pairs + 2):
        kind = ("id3", "full")[(i + i // 2) % 2]
        t0 = time.perf_counter()
        opt.zero_grad()
        model(**batch(vocab, i, 0)).loss.backward()
        if kind == "id3":
            id3.select()
            id3.mask_grads()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= 2:  # the first pair warms up
            times[kind].append(time.perf_counter() - t0)
            if kind == "id3":
                times["floor"].append(floor_pass(model))
        else:
            id3.timer.seconds.clear()
    return summarize(times, id3, pairs, 1, id3.schedule.per_step(0))


def deepspeed_llama(size: str, stage: int):
    """(engine, model): the benchmark model under DeepSpeed AdamW at `stage` (built partitioned at stage 3)."""
    import deepspeed

    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}},
    }
    if stage == 3:
        import transformers.models.llama.modeling_llama  # noqa: F401  (import torch._dynamo outside zero.Init)

        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = build_model(size)
    else:
        model = build_model(size)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    return engine, model


def interleaved_times(pairs: int, step, timer) -> dict[str, list[float]]:
    """Seconds of `step(kind, i)` per kind, id3 and full alternating (id3, full, full, id3, ...) between
    barriers so every rank times the same step; the first two steps warm up and reset ID3's phase timer."""
    import torch.distributed as dist

    times: dict[str, list[float]] = {"full": [], "id3": []}
    for i in range(2 * pairs + 2):
        kind = ("id3", "full")[(i + i // 2) % 2]
        dist.barrier()
        t0 = time.perf_counter()
        step(kind, i)
        dist.barrier()
        if i >= 2:
            times[kind].append(time.perf_counter() - t0)
        else:
            timer.seconds.clear()
    return times


def run_deepspeed_worker(size: str, pairs: int, stage: int, out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from id3_ds import ID3Config
    from id3_ds.update import DeepSpeedID3

    use_per_environment_extensions(os.environ.get("RANK", "0") == "0")  # the trainer's op folder
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    engine, model = deepspeed_llama(size, stage)
    hook = DeepSpeedID3(engine, ID3Config(budget=0.001), steps=1000, weight_decay=0.0)
    hook.id3.timer.enabled = True
    vocab = model.config.vocab_size

    def step(kind: str, i: int) -> None:
        engine.backward(engine(**batch(vocab, i, rank)).loss)
        if kind == "id3":
            hook.before_step()
        engine.step()

    times = interleaved_times(pairs, step, hook.id3.timer)
    result = summarize(times, hook.id3, pairs, world, hook.id3.schedule.per_step(0))
    result["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    end_worker()  # every process group released, gloo's threads joined: a clean normal exit


def sparse_engine(size: str, world: int):
    """(update, model): the benchmark model with sparse-state ID3 at ZeRO-3, built as launch/train.py does."""
    import deepspeed

    from id3_ds.config import config_from_dict
    from id3_ds.integration.ds_config import build_ds_config
    from id3_ds.methods import method_spec
    from id3_ds.update import build_update, freeze_outside

    raw = {
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "fp32"},  # only the config's rules are used
        "data": {"path": str(ROOT / "id3_ds" / "resources" / "tiny_alpaca.jsonl")},
        "id3": {"budget": 0.001, "state": "sparse"},
        "train": {"steps": 1000, "lr": 1e-4, "weight_decay": 0.0, "micro_batch_size": 2, "max_grad_norm": 1.0},
        "deepspeed": {"zero_optimization": {"stage": 3}, "steps_per_print": 10**9},
    }
    cfg = config_from_dict(raw)
    ds, weight_decay = build_ds_config(cfg, world)
    import transformers.models.llama.modeling_llama  # noqa: F401  (import torch._dynamo outside zero.Init)

    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = build_model(size)
    method = method_spec("id3")
    freeze_outside(model, cfg.id3, method.keep)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=None, config=ds)
    update = build_update(
        engine, method, cfg.id3, 1000, weight_decay, lr=cfg.train.lr, max_grad_norm=cfg.train.max_grad_norm
    )
    return update, model


def run_sparse_worker(size: str, pairs: int, out: str) -> None:
    """Full fine-tuning (DeepSpeed AdamW) against sparse-state ID3, both ZeRO-3, steps interleaved."""
    import deepspeed
    import torch.distributed as dist

    use_per_environment_extensions(os.environ.get("RANK", "0") == "0")  # the trainer's op folder
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    engine, model = deepspeed_llama(size, 3)
    update, _ = sparse_engine(size, world)
    update.id3.timer.enabled = True
    vocab = model.config.vocab_size

    def step(kind: str, i: int) -> None:
        b = batch(vocab, i, rank)
        if kind == "id3":
            update.backward(update.forward(b).loss)
            update.step()
        else:
            engine.backward(engine(**b).loss)
            engine.step()

    times = interleaved_times(pairs, step, update.id3.timer)
    result = summarize(times, update.id3, pairs, world, update.id3.schedule.per_step(0))
    result["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    result["chosen"] = update.chosen_total
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    end_worker()


def client_optimizer_engine(size: str, optimizer: str):
    """(ID3 hook, model): dense-state ID3 at ZeRO-2 with a client optimizer built as launch/train.py builds it
    (train.optimizer: torch_adamw or adamw_8bit)."""
    import deepspeed

    from id3_ds import ID3Config
    from id3_ds.training.optimizers import build_client_optimizer
    from id3_ds.update import DeepSpeedID3

    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,  # what ds_config sets for a client optimizer
        "steps_per_print": 10**9,
    }
    model = build_model(size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_client_optimizer(optimizer, params, 1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return DeepSpeedID3(engine, ID3Config(budget=0.001), steps=1000, weight_decay=0.0), model


def run_8bit_worker(size: str, pairs: int, out: str) -> None:
    """ID3 with torch AdamW against ID3 with 8-bit AdamW, both ZeRO-2 (two engines), steps interleaved: the
    "without" column is torch AdamW, the "with" column 8-bit AdamW, the phases the 8-bit engine's ID3 work."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    hooks = {"full": client_optimizer_engine(size, "torch_adamw")[0]}
    hooks["id3"], model = client_optimizer_engine(size, "adamw_8bit")
    hooks["id3"].id3.timer.enabled = True
    vocab = model.config.vocab_size

    def step(kind: str, i: int) -> None:
        hook = hooks[kind]
        hook.engine.backward(hook.engine(**batch(vocab, i, rank)).loss)
        hook.step()

    times = interleaved_times(pairs, step, hooks["id3"].id3.timer)
    result = summarize(times, hooks["id3"].id3, pairs, world, hooks["id3"].id3.schedule.per_step(0))
    result["params"] = sum(p.numel() for p in model.parameters())
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    end_worker()


def run_deepspeed(size: str, pairs: int, stage: int, sparse: bool = False, eight_bit: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        flags = ["--size", size, "--pairs", str(pairs), "--stage", str(stage), "--out", out]
        flags += ["--sparse"] if sparse else []
        flags += ["--eight-bit"] if eight_bit else []
        cmd = launch_command(2, __file__, "--worker", *flags)
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"ZeRO-{stage} worker failed:\n{proc.stdout[-4000:]}")
        return json.loads(Path(out).read_text())


def phase(phases: dict[str, float], name: str, digits: int) -> str:
    """A phase's ms per step, or '-' where it was not timed (sparse state scores inside backward's hooks)."""
    return f"{phases[name]:.{digits}f} ms" if name in phases else "-"


def table(rows: list[tuple[str, dict]]) -> str:
    lines = [
        "| mode | params | without ID3 (ms) | with ID3 (ms) | ratio | pair ratios (min-max) | score+topk | merge "
        "| grow | mask | floor pass (ms) | ID3 extra / floor | mask bytes/rank | all-gather bytes/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows:
        p = r["phases_ms"]
        floor = r.get("floor_ms")
        floor_cells = "- | -" if not floor else f"{floor:.0f} | {(r['id3_ms'] - r['full_ms']) / floor:.1f}"
        lines.append(
            f"| {name} | {r['params'] / 1e6:.1f}M | {r['full_ms']:.0f} | {r['id3_ms']:.0f} | {r['ratio']:.3f} "
            f"| {r['pair_ratio_min']:.3f}-{r['pair_ratio_max']:.3f} "
            f"| {phase(p, 'score_topk', 1)} | {phase(p, 'merge', 2)} | {phase(p, 'grow', 2)} "
            f"| {phase(p, 'mask', 1)} | {floor_cells} | {r['mask_bytes_per_rank']:,} "
            f"| {r['allgather_bytes_per_step']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~10M parameters, 3 pairs: under 2 minutes")
    ap.add_argument("--no-record", action="store_true", help="do not record this run in benchmarks/RESULTS.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=int, default=None, help="step pairs timed per mode (default 8; quick 3)")
    ap.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--sparse", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--eight-bit", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--modes",
        default="plain,2,3,sparse",
        help="modes to run, comma separated (plain,2,3,sparse; 8bit: ID3 at ZeRO-2 with torch AdamW vs 8-bit AdamW)",
    )
    args = ap.parse_args()
    size = args.size or ("10M" if args.quick else "100M")
    pairs = args.pairs or (3 if args.quick else 8)
    if args.worker:
        if args.sparse:
            run_sparse_worker(size, pairs, args.out)
        elif args.eight_bit:
            run_8bit_worker(size, pairs, args.out)
        else:
            run_deepspeed_worker(size, pairs, args.stage, args.out)
        return
    modes = args.modes.split(",")
    if not modes or set(modes) - {"plain", "2", "3", "sparse", "8bit"}:
        raise SystemExit(f"--modes {args.modes!r}: choose from plain, 2, 3, sparse, 8bit")
    rows = []
    if "plain" in modes:
        rows.append(("plain torch, 1 process", run_plain(size, pairs)))
    for stage in (2, 3):
        if str(stage) in modes:
            rows.append((f"DeepSpeed ZeRO-{stage}, 2 ranks", run_deepspeed(size, pairs, stage)))
    if "sparse" in modes:  # against full fine-tuning in the same worker (two engines)
        rows.append(("DeepSpeed ZeRO-3, sparse state vs full, 2 ranks", run_deepspeed(size, pairs, 3, sparse=True)))
    if "8bit" in modes:  # ID3 both sides: torch AdamW ("without") vs 8-bit AdamW ("with"), two engines
        row = "DeepSpeed ZeRO-2, ID3: 8-bit AdamW vs torch AdamW, 2 ranks"
        rows.append((row, run_deepspeed(size, pairs, 2, eight_bit=True)))
    text = table(rows)
    print(text)
    if not args.no_record:
        details = "fp32, micro-batch 2x128 tokens, budget 0.1 % over 1000 steps"
        flag = " --quick" if args.quick else ""
        flag += f" --pairs {args.pairs}" if args.pairs else ""
        title = "Step overhead"  # a run of some modes only gets its own section: the full table stays
        if args.modes != ap.get_default("modes"):
            flag += f" --modes {args.modes}"
            title += f", modes {args.modes}"
        record_results(title, details, f"python benchmarks/bench_step_overhead.py{flag}", text)


if __name__ == "__main__":
    main()

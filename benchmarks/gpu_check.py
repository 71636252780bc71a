"""One prepared script that proves id3-ds on a real GPU inside a short lease (issue 17).

    python3 benchmarks/gpu_check.py --out gpu_check/                 # one CUDA GPU: ~1.1B LLaMA, bf16, NCCL
    python3 benchmarks/gpu_check.py --cpu-dry-run --out /tmp/dry/    # the same code path, tiny model, gloo, CPU
    python3 benchmarks/gpu_check.py --only steps,nf4 --out gpu_steps/  # phases 7-8 alone (one short lease)

Phases, each with its own time budget (a phase past it stops the script with one line, never a hang):

1. requirements: CUDA visible, deepspeed/datasets/pydantic importable, ninja and nvcc for FusedAdam.
2. fused_adam: JIT-builds the accelerator's FusedAdam once (the op DeepSpeed's "AdamW" runs on).
3. base: a LLaMA-style model from a config (no download; 2048 hidden, 16 layers, 5632 intermediate, 32000
   vocab: 953.2M parameters), saved as bf16 with save_pretrained, and a synthetic `text` JSONL.
4. train: the real trainer (`launch/train.py`, world size 1) runs ID3 for 20 steps at B = 0.1 % under ZeRO-3,
   bf16, gradient accumulation 2, weight decay 0.1, clipping 1.0, and saves the final model.
5. verify: B exactly (the run's log and the exported delta), no weight moved outside the delta, and
   base + delta (id3_ds merge) equals the trained model in bf16.
6. overhead: per ZeRO stage (2, 3) one engine whose steps alternate with and without ID3 (the order flipping
   every pair, as benchmarks/bench_step_overhead.py does): median step time of each and the peak GPU memory
   (torch.cuda.max_memory_allocated) of an ID3 step vs a plain dense step, i.e. what method `full` runs.
   On a machine with N GPUs the engines run on all N (torchrun, NCCL).
7. steps: plain torch on one device (benchmarks/gpu_steps.py): dense- and sparse-state ID3 against full
   fine-tuning at SmolLM2-135M's shape and the ~1B shape, host syncs per ID3 step from
   torch.cuda.set_sync_debug_mode("warn"), ID3's part of the step against the read-g-and-theta floor, peaks.
8. nf4: a LLaMA-3-8B-shaped nf4 model, sparse-state ID3 against QLoRA r=16 at the same trainable count:
   peak memory and step time; plus the 70B projection from bytes per entry.

Writes OUT/gpu_check.json and OUT/gpu_check.md and prints the table. Exit 0 only when every check passes;
a failure prints one `gpu_check: error: ...` line and exits 2 (the JSON keeps the phases done so far).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGET = 0.001  # B as a fraction of the model's entries: 0.1 %
GIB = 2**30


@dataclass(frozen=True)
class Plan:
    """What one mode runs: the model's shape, the run's size and each phase's time budget (seconds)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    steps: int
    micro: int
    seq: int
    pairs: int
    budgets: dict[str, int] = field(default_factory=dict)

    def llama_config(self, vocab: int, **token_ids: int):
        """The LLaMA-style model of this plan (untied head), for the trained run and the overhead workers alike."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=max(2 * self.seq, 128),
            tie_word_embeddings=False,
            **token_ids,
        )


GPU = Plan(2048, 16, 5632, 32000, 32, steps=20, micro=4, seq=256, pairs=6, budgets=dict(
    requirements=60, fused_adam=300, base=180, train=480, verify=300, overhead=240, steps=240, nf4=300))  # fmt: skip
CPU = Plan(64, 2, 172, 512, 4, steps=4, micro=2, seq=32, pairs=2, budgets=dict(
    requirements=60, fused_adam=300, base=60, train=300, verify=60, overhead=150, steps=150, nf4=150))  # fmt: skip
PHASES = ("requirements", "fused_adam", "base", "train", "verify", "overhead", "steps", "nf4")


class CheckError(Exception):
    """A failed check or a missing requirement: its message is the one line the script prints."""


# -- phases and child processes ------------------------------------------------------------------------


@contextlib.contextmanager
def phase(name: str, seconds: int, timings: dict[str, float]):
    """Run an in-process phase under a SIGALRM budget, so a stuck phase ends with one line, not a hang."""

    def expired(*_: object) -> None:
        raise CheckError(f"phase {name} ran past its {seconds} s budget")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        timings[name] = round(time.perf_counter() - t0, 1)


def child_env(cpu: bool) -> dict[str, str]:
    """The environment of every child: this checkout first on the path; a dry run on DeepSpeed's CPU accelerator."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if cpu:  # even on a GPU machine the dry run stays on CPU/gloo
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def run_child(what: str, cmd: list[str], seconds: int, env: dict[str, str], log: Path) -> None:
    """Run `cmd` in its own process group with its output in `log`; past `seconds` the whole group is killed."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise CheckError(f"phase {what} ran past its {seconds} s budget (killed); its output: {log}") from None
    if rc != 0:
        raise CheckError(f"phase {what} failed (exit {rc}): {last_line(log)} (whole output: {log})")


def last_line(log: Path) -> str:
    """The most telling line of a failed child's output: its `error:` line, else its last non-empty one."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "ID3Error", "RuntimeError", "Error"))]
    return (errors or lines or ["(no output)"])[-1][:400]


# -- 1. requirements -----------------------------------------------------------------------------------


def check_requirements(cpu: bool) -> dict:
    """What the GPU image must have, each missing piece named with its fix."""
    import importlib

    import torch

    found = {"torch": torch.__version__}
    for mod in ("deepspeed", "datasets", "pydantic", "transformers"):
        try:
            found[mod] = importlib.import_module(mod).__version__
        except ImportError:
            raise CheckError(
                f"{mod} is not installed: build the wheels with benchmarks/gpu_wheels.sh and install .whl/*.whl "
                "(docs/gpu-runs.md, 'GPU check')"
            ) from None
    if cpu:
        return {**found, "device": "CPU (DeepSpeed CPU accelerator, gloo)"}
    if not torch.cuda.is_available():
        raise CheckError("no CUDA device visible to torch: run on a GPU machine, or pass --cpu-dry-run")
    if not (shutil.which("ninja") or importlib.util.find_spec("ninja")):
        raise CheckError("ninja not found: DeepSpeed JIT-builds FusedAdam with it; pip install ninja")
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
    if not (nvcc.is_file() or shutil.which("nvcc")):
        raise CheckError(
            f"nvcc not found (CUDA_HOME={CUDA_HOME}): DeepSpeed JIT-builds FusedAdam with it; "
            "set CUDA_HOME to the CUDA toolkit"
        )
    return {**found, "device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}


BUILD_FUSED_ADAM = (
    "from id3_ds.integration.op_builds import use_per_environment_extensions as u; u(True); "
    "from deepspeed.accelerator import get_accelerator as g; "
    "g().create_op_builder('FusedAdamBuilder').load(); print('FusedAdam built for', g().device_name())"
)


# -- 3. base model and data ----------------------------------------------------------------------------


def write_base(plan: Plan, base_dir: Path) -> int:
    """A LLaMA-style model from `plan`'s config, saved in bf16 with the tiny built-in tokenizer; its entry count."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from id3_ds.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama"))
    cfg = plan.llama_config(
        max(plan.vocab, len(tok)),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    return sum(p.numel() for p in model.parameters())


def write_data(path: Path, plan: Plan, records: int = 256) -> None:
    """Synthetic `text` records, each long enough to fill `plan.seq` tokens."""
    rng = random.Random(0)
    words = "the a model weight sparse delta step mask budget train rank gradient token update base merge".split()
    with open(path, "w") as f:
        for _ in range(records):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(plan.seq))}) + "\n")


def run_config(plan: Plan, base_dir: Path, data: Path, run_dir: Path, cache: Path) -> dict:
    """The trainer's config: ID3 at B = 0.1 %, ZeRO-3, bf16, grad_accum 2, weight decay 0.1, clipping 1.0."""
    return {
        "model": {"name_or_path": str(base_dir), "dtype": "bf16"},
        "data": {"path": str(data), "format": "text", "max_length": plan.seq, "cache_dir": str(cache)},
        "id3": {"budget": BUDGET},
        "train": {
            "steps": plan.steps,
            "lr": 1e-3,  # large enough that most chosen bf16 weights visibly move in a few steps
            "weight_decay": 0.1,
            "max_grad_norm": 1.0,
            "micro_batch_size": plan.micro,
            "grad_accum": 2,
            "seed": 0,
            "output_dir": str(run_dir),
            "save_steps": plan.steps,
            "log_steps": 1,
            "resume": "auto",
            "export_delta": False,  # exported below, from the checkpoint, by the library call
            "save_final_model": True,
            "progress_bar": False,
        },
        "deepspeed": {"zero_optimization": {"stage": 3}, "steps_per_print": 10**9},
    }


# -- 5. verification -----------------------------------------------------------------------------------


def load_weights(model_dir: Path) -> dict:
    """Every tensor of a save_pretrained directory (one or several safetensors shards)."""
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    if not out:
        raise CheckError(f"no safetensors weights in {model_dir}")
    return out


def verify(run_dir: Path, base_dir: Path, work: Path, entries: int) -> dict:
    """B exactly; the trained model moved nothing outside the delta; base + delta equals the trained model."""
    import torch

    from id3_ds.algorithm.schedule import resolve_budget
    from id3_ds.delta.export import export_delta
    from id3_ds.delta.format import load_delta
    from id3_ds.delta.merge import merge

    records = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines() if ln.strip()]
    start = next(r for r in records if r.get("event") == "start")
    chosen = [r["chosen"] for r in records if "chosen" in r][-1]
    expected = resolve_budget(BUDGET, entries)
    delta_dir = export_delta(run_dir, base_dir, work / "delta")
    delta = load_delta(delta_dir)
    base, final = load_weights(base_dir), load_weights(run_dir / "final_model")
    if set(base) != set(final):
        raise CheckError(f"trained model's tensors differ from the base's: {sorted(set(base) ^ set(final))[:3]}")
    moved = outside = 0
    for name, b in base.items():
        changed = (final[name] != b).reshape(-1).nonzero().flatten()
        moved += changed.numel()
        p = delta.params.get(name)
        allowed = p.indices.to(torch.int64) if p is not None else torch.empty(0, dtype=torch.int64)
        outside += int((~torch.isin(changed, allowed)).sum())
    merge(base_dir, delta_dir, work / "merged")
    merged = load_weights(work / "merged")
    mismatch = sum(int((merged[n].to(torch.bfloat16) != t.to(torch.bfloat16)).sum()) for n, t in final.items())
    result = {
        "params": entries,
        "budget_expected": expected,
        "budget_logged": start["budget"],
        "chosen_logged": chosen,
        "delta_entries": delta.total_entries,
        "moved_entries": moved,
        "moved_outside_delta": outside,
        "merged_mismatch": mismatch,
        "steps": start["steps"],
    }
    result["passed"] = (
        start["budget"] == chosen == delta.total_entries == expected and outside == 0 and mismatch == 0 and moved > 0
    )
    return result


# -- 6. step overhead and peak memory (a child per ZeRO stage) -----------------------------------------


def overhead_worker(plan: Plan, stage: int, out: Path) -> None:
    """One engine, world size 1, bf16, DeepSpeed AdamW; steps alternate with and without ID3."""
    import statistics

    import deepspeed
    import torch
    import torch.distributed as dist
    import transformers.models.llama.modeling_llama  # noqa: F401  (import torch._dynamo outside zero.Init)
    from deepspeed.accelerator import get_accelerator
    from transformers import LlamaForCausalLM

    from benchmarks.bench_step_overhead import summarize
    from id3_ds import ID3Config
    from id3_ds.integration.op_builds import use_per_environment_extensions
    from id3_ds.runtime.launching import end_worker
    from id3_ds.update import DeepSpeedID3

    use_per_environment_extensions(True)
    accel = get_accelerator()
    cpu = accel.device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if cpu else accel.communication_backend_name())
    if not cpu:
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    ds = {
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}},
    }
    cfg = plan.llama_config(plan.vocab)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds) if stage == 3 else contextlib.nullcontext():
        model = LlamaForCausalLM(cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    hook = DeepSpeedID3(engine, ID3Config(budget=BUDGET), steps=1000, weight_decay=0.1)
    hook.id3.timer.enabled = True
    device = accel.current_device_name()
    times: dict[str, list[float]] = {"full": [], "id3": []}
    peaks: dict[str, int] = {"full": 0, "id3": 0}
    for i in range(2 * plan.pairs + 2):
        kind = ("id3", "full")[(i + i // 2) % 2]
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, plan.vocab, (plan.micro, plan.seq), generator=g).to(device)
        accel.synchronize()
        if not cpu:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        if kind == "id3":
            hook.before_step()
        engine.step()
        accel.synchronize()
        if i >= 2:  # the first pair warms up
            times[kind].append(time.perf_counter() - t0)
            if not cpu:
                peaks[kind] = max(peaks[kind], torch.cuda.max_memory_allocated())
        else:
            hook.id3.timer.seconds.clear()
    result = summarize(times, hook.id3, plan.pairs, dist.get_world_size(), hook.id3.schedule.per_step(0))
    result.update(
        stage=stage,
        optimizer=type(getattr(engine, "basic_optimizer", None) or engine.optimizer).__name__,
        peak_full_bytes=peaks["full"] if not cpu else None,
        peak_id3_bytes=peaks["id3"] if not cpu else None,
        full_ms_all=[round(t * 1e3, 2) for t in times["full"]],
        id3_ms_all=[round(t * 1e3, 2) for t in times["id3"]],
        ratio_of_medians=statistics.median(times["id3"]) / statistics.median(times["full"]),
    )
    result["world"] = dist.get_world_size()
    if dist.get_rank() == 0:
        out.write_text(json.dumps(result))
    end_worker()


def run_device_phase(what: str, cpu: bool, pairs: int, work: Path, seconds: Callable[[str], int]) -> dict:
    """Phase `steps` or `nf4` (benchmarks/gpu_steps.py) in a child of its own: its peak memory is its own."""
    out = work / f"{what}.json"
    cmd = [sys.executable, __file__, "--device-worker", what, "--out", str(out), "--pairs", str(pairs)]
    cmd += ["--cpu-dry-run"] if cpu else []
    run_child(what, cmd, seconds(what), child_env(cpu), work / f"{what}.log")
    return json.loads(out.read_text())


def run_overhead(plan: Plan, cpu: bool, work: Path, seconds: Callable[[str], int]) -> list[dict]:
    """One child per ZeRO stage, each within `seconds("overhead")` (its budget, clipped to the time left)."""
    import torch

    from id3_ds.processes import free_port
    from id3_ds.runtime.launching import launch_command

    world = 1 if cpu else max(1, torch.cuda.device_count())
    rows = []
    for stage in (2, 3):
        out = work / f"overhead_zero{stage}.json"
        env = child_env(cpu)
        if world == 1:
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        cmd = launch_command(world, __file__, "--overhead-worker", str(stage), "--out", str(out))
        cmd += ["--cpu-dry-run"] if cpu else []
        run_child(f"overhead (ZeRO-{stage})", cmd, seconds("overhead"), env, work / f"overhead_zero{stage}.log")
        rows.append(json.loads(out.read_text()))
    return rows


# -- report --------------------------------------------------------------------------------------------


def gib(b: int | None) -> str:
    return "n/a (CPU)" if b is None else f"{b / GIB:.2f}"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "n/a" if x is None else format(x, fmt)


def device_tables(report: dict) -> list[str]:
    """Phases 7 (steps) and 8 (nf4) as markdown tables."""
    lines: list[str] = []
    steps = report.get("steps", {}).get("rows", [])
    if steps:
        lines += [
            "",
            "| plain torch, one device | params | full FT (ms) | with ID3 (ms) | ratio | ID3 part (ms) | floor (ms) "
            "| host syncs / ID3 step | peak full (GiB) | peak ID3 (GiB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in steps:
            lines.append(
                f"| {r['mode']} ID3, {r['shape']} | {r['params'] / 1e6:.1f}M | {r['full_ms']:.1f} | {r['id3_ms']:.1f} "
                f"| {r['ratio']:.3f} | {_num(r['id3_part_ms'])} | {_num(r['floor_ms'], '.2f')} "
                f"| {_num(r['syncs_per_step'], '.0f')} | {gib(r['peak_full_bytes'])} | {gib(r['peak_id3_bytes'])} |"
            )
    nf4 = report.get("nf4", {})
    if nf4.get("rows"):
        lines += [
            "",
            "| nf4 base | trainable | step (ms) | peak, steps (GiB) | peak, build + steps (GiB) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in nf4["rows"]:
            lines.append(
                f"| {r['variant']}, {r['shape']} | {r['trainable']} | {r['step_ms']:.1f} "
                f"| {gib(r['peak_steps_bytes'])} | {gib(r['peak_build_bytes'])} |"
            )
        p = nf4["projection_70b"]
        lines.append(
            f"\n70B projection (nf4 sparse-state ID3 at LoRA r=16's {p['lora_r16_count']} entries, before "
            f"activations): one GPU {p['one_80gb_gpu_gib_before_activations']:.1f} GiB; per rank of an 8-GPU "
            f"ZeRO-3 node {p['per_rank_of_8_zero3_gib_before_activations']:.1f} GiB"
        )
    return lines


def markdown(report: dict) -> str:
    env, v = report["environment"], report.get("verify", {})
    ok = "PASS" if v.get("passed") else "FAIL"
    lines = [
        f"GPU check ({report['mode']}): {env.get('device')}, torch {env.get('torch')}, "
        f"deepspeed {env.get('deepspeed')}, transformers {env.get('transformers')}",
        "",
        "| check | result |",
        "| --- | --- |",
    ]
    if v:
        lines += [
            f"| model | LLaMA-style, {v.get('params', 0) / 1e6:.1f}M parameters, bf16, ZeRO-3, "
            f"{v.get('steps')} ID3 steps, grad_accum 2, weight decay 0.1, clipping 1.0 |",
            f"| budget B = 0.1 % | expected {v.get('budget_expected')}, logged {v.get('budget_logged')}, "
            f"chosen {v.get('chosen_logged')}, delta entries {v.get('delta_entries')} |",
            f"| moved entries outside the delta | {v.get('moved_outside_delta')} (of {v.get('moved_entries')} moved) |",
            f"| merged (base + delta) vs trained, bf16 | {v.get('merged_mismatch')} entries differ |",
            f"| verdict | {ok} |",
        ]
    lines.append("| phase times (s) | " + ", ".join(f"{k} {s}" for k, s in report["timings"].items()) + " |")
    rows = report.get("overhead", [])
    if rows:
        lines += [
            "",
            "| engine (world size 1, bf16) | optimizer | without ID3 (ms) | with ID3 (ms) | ratio "
            "| peak mem without (GiB) | peak mem with (GiB) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            lines.append(
                f"| ZeRO-{r['stage']} | {r['optimizer']} | {r['full_ms']:.1f} | {r['id3_ms']:.1f} | {r['ratio']:.3f} "
                f"| {gib(r['peak_full_bytes'])} | {gib(r['peak_id3_bytes'])} |"
            )
    return "\n".join(lines + device_tables(report))


def run_check(plan: Plan, cpu: bool, out: Path, keep: bool, limit: int, only: tuple[str, ...] = PHASES) -> dict:
    """The phases in `only`, in order, within `limit` seconds; the report (written even on failure, with what
    was done). base, train and verify go together (verify reads train's run, train base's model)."""
    from id3_ds.runtime.launching import launch_command  # plain python here; the tests' fork server under pytest

    deadline = time.monotonic() + limit

    def left(name: str) -> int:
        """The phase's budget, clipped to the time left: the whole check ends inside a lease's command limit."""
        seconds = min(plan.budgets[name], int(deadline - time.monotonic()))
        if seconds < 5:
            raise CheckError(f"no time left for phase {name} within --time-limit {limit} s")
        return seconds

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=out if keep else None))
    report: dict = {"mode": "cpu-dry-run" if cpu else "gpu", "plan": asdict(plan), "timings": {}, "environment": {}}
    t = report["timings"]
    try:
        with phase("requirements", left("requirements"), t):
            report["environment"] = check_requirements(cpu)
        if "fused_adam" in only:
            t0 = time.perf_counter()
            cmd = [sys.executable, "-c", BUILD_FUSED_ADAM]
            run_child("fused_adam", cmd, left("fused_adam"), child_env(cpu), out / "fused_adam.log")
            t["fused_adam"] = round(time.perf_counter() - t0, 1)
        if {"base", "train", "verify"} & set(only):
            base_dir, data, run_dir = work / "base", work / "data.jsonl", work / "run"
            with phase("base", left("base"), t):
                entries = write_base(plan, base_dir)
                write_data(data, plan)
            cfg_path = work / "run_config.json"
            cfg_path.write_text(json.dumps(run_config(plan, base_dir, data, run_dir, work / "cache"), indent=1))
            t0 = time.perf_counter()
            cmd = launch_command(1, ROOT / "launch" / "train.py", "--config", str(cfg_path))
            run_child("train", cmd, left("train"), child_env(cpu), out / "train.log")
            t["train"] = round(time.perf_counter() - t0, 1)
            with phase("verify", left("verify"), t):
                report["verify"] = verify(run_dir, base_dir, work, entries)
            if not report["verify"]["passed"]:
                raise CheckError(f"verification failed: {json.dumps(report['verify'])}")
        if "overhead" in only:
            t0 = time.perf_counter()
            report["overhead"] = run_overhead(plan, cpu, work, left)
            t["overhead"] = round(time.perf_counter() - t0, 1)
        for what in ("steps", "nf4"):
            if what in only:
                t0 = time.perf_counter()
                report[what] = run_device_phase(what, cpu, plan.pairs, work, left)
                t[what] = round(time.perf_counter() - t0, 1)
    except CheckError as e:
        report["error"] = str(e)
        raise
    finally:
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json, gpu_check.md and logs")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny model, gloo, DeepSpeed's CPU accelerator")
    ap.add_argument(
        "--time-limit", type=int, default=570, help="seconds for the whole check (570: inside a 600 s command limit)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the base, run, delta and merged model under --out")
    ap.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases to run (of {','.join(PHASES)})")
    ap.add_argument("--overhead-worker", type=int, default=None, help=argparse.SUPPRESS)  # ZeRO stage
    ap.add_argument("--device-worker", default=None, help=argparse.SUPPRESS)  # steps | nf4
    ap.add_argument("--pairs", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    plan = CPU if args.cpu_dry_run else GPU
    if args.overhead_worker is not None:
        overhead_worker(plan, args.overhead_worker, args.out)
        return
    if args.device_worker is not None:
        from benchmarks.gpu_steps import worker

        worker(args.device_worker, args.cpu_dry_run, args.out, args.pairs or plan.pairs)
        return
    only = tuple(p.strip() for p in args.only.split(",") if p.strip())
    if set(only) - set(PHASES):
        print(f"gpu_check: error: --only {args.only!r}: choose phases from {', '.join(PHASES)}", file=sys.stderr)
        sys.exit(2)
    try:
        report = run_check(plan, args.cpu_dry_run, args.out, args.keep, args.time_limit, ("requirements", *only))
    except CheckError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    text = markdown(report)
    (args.out / "gpu_check.md").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()

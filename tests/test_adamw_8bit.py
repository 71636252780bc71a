"""train.optimizer=adamw_8bit: bitsandbytes' AdamW8bit as DeepSpeed's client optimizer.

The trap it brings to ID3: 8-bit moments are re-quantized block by block (256 entries share one absmax),
and bitsandbytes' quantizer does not round an exact 0 to the zero code when the block holds a nonzero
moment, so an unchosen entry next to a chosen one gets a nonzero moment and moves. These tests pin the trap
and the fix (id3_ds/training/optimizers.py) in pure torch first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from id3_ds.checkpoint import checkpoint_dir, read_id3_state
from id3_ds.config import load_config
from id3_ds.errors import ID3Error
from id3_ds.recipe.preflight import preflight
from id3_ds.training.optimizers import BNB_BLOCK, build_client_optimizer
from tests.assertions import assert_only_chosen_moved, chosen_indices
from tests.launcher import TINY_CONFIG, ok, train, weights

pytest.importorskip("bitsandbytes")

BLOCKS = 20  # 5,120 entries: above bitsandbytes' min_8bit_size (4096), so its moments are 8-bit
SMALL = 1000  # under min_8bit_size: bitsandbytes keeps fp32 moments for it


def _masks(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen from step 0, chosen from step 4): block 0 mixes chosen and unchosen entries, block 2 holds one
    chosen entry, block 5 none until step 4, and every other block is never chosen (absmax stays 0). Entries
    join at step 4 in blocks 0, 2 and 5."""
    first = torch.zeros(n, dtype=torch.bool)
    first[0:BNB_BLOCK:3] = True
    first[2 * BNB_BLOCK + 5] = True
    later = first.clone()
    later[5 * BNB_BLOCK + 7 : 5 * BNB_BLOCK + 40 : 4] = True
    later[1] = later[2 * BNB_BLOCK + 6] = True  # join blocks that already hold large moments
    return first, later


def _train(optimizer_name: str, steps: int = 9, lr: float = 1e-2) -> tuple[dict, dict, list[dict]]:
    """A big (8-bit) and a small (fp32-moment) tensor, masked gradients as ID3 leaves them; returns the start
    values, the masks of the last step, and the weights after every step."""
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(BLOCKS * BNB_BLOCK))
    small = torch.nn.Parameter(torch.randn(SMALL))
    params = {"big": big, "small": small}
    base = {k: p.detach().clone() for k, p in params.items()}
    every7 = torch.arange(SMALL) % 7 == 0
    masks = {"big": _masks(big.numel()), "small": (every7, every7 | (torch.arange(SMALL) % 5 == 0))}
    opt = build_client_optimizer(optimizer_name, list(params.values()), lr)
    history = []
    for step in range(steps):
        scale = 1e3 if step % 3 == 0 else 1e-3  # large chosen gradients, then tiny ones: wide absmax swings
        for k, p in params.items():
            mask = masks[k][0] if step < 4 else masks[k][1]
            p.grad = torch.randn(p.shape) * scale * mask
        opt.step()
        history.append({k: p.detach().clone() for k, p in params.items()})
    return base, {k: m[1] for k, m in masks.items()}, history


def test_plain_bitsandbytes_moves_unchosen_entries_in_mixed_blocks() -> None:
    """The trap, pinned: without the fix, entries of a block that also holds chosen ones drift (if this starts
    passing with unchanged weights, bitsandbytes fixed its quantizer and the workaround may go)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(BLOCKS * BNB_BLOCK))
    base = p.detach().clone()
    mask, _ = _masks(p.numel())
    opt = bnb.optim.AdamW8bit([p], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        p.grad = torch.randn(p.shape) * mask
        opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8
    moved = (p.detach() != base) & ~mask
    assert moved[:BNB_BLOCK].any() and moved[2 * BNB_BLOCK : 3 * BNB_BLOCK].any()  # the mixed blocks
    assert not moved[BNB_BLOCK : 2 * BNB_BLOCK].any()  # an all-unchosen block: absmax 0, no NaN, no move


@pytest.mark.parametrize("chunk", [None, 3 * BNB_BLOCK], ids=["one-chunk", "chunks-of-3-blocks"])
def test_unchosen_entries_stay_bit_identical_with_8bit_moments(chunk, monkeypatch) -> None:
    if chunk:
        monkeypatch.setattr("id3_ds.training.optimizers.CHUNK", chunk)
    base, masks, history = _train("adamw_8bit")
    for after in history:
        for k, mask in masks.items():
            assert not torch.isnan(after[k]).any()
            # entries chosen only at step 4 count as unchosen before it
            assert torch.equal(after[k][~mask], base[k][~mask]), f"an unchosen entry of {k} moved"
    for k, mask in masks.items():
        assert (history[-1][k][mask] != base[k][mask]).all(), f"a chosen entry of {k} never moved"


def test_moments_are_8bit_and_unchosen_moments_exactly_zero() -> None:
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(BLOCKS * BNB_BLOCK))
    small = torch.nn.Parameter(torch.randn(SMALL))
    mask, _ = _masks(p.numel())
    opt = build_client_optimizer("adamw_8bit", [p, small], 1e-2)
    for _ in range(4):
        p.grad = torch.randn(p.shape) * mask
        small.grad = torch.randn(SMALL)
        opt.step()
    st = opt.state[p]
    assert st["state1"].dtype == torch.uint8 and st["state2"].dtype == torch.uint8
    assert opt.state[small]["state1"].dtype == torch.float32  # under min_8bit_size: fp32, bitsandbytes' default
    for s, a, q in (("state1", "absmax1", "qmap1"), ("state2", "absmax2", "qmap2")):
        moment = F.dequantize_blockwise(st[s], absmax=st[a], code=st[q], blocksize=BNB_BLOCK)
        assert (moment[~mask] == 0).all() and (moment[mask] != 0).any()


def test_an_entry_chosen_later_starts_from_zero_moments_as_in_fp32_adam() -> None:
    """At the step an entry joins, its moments were exactly 0, so its first update is fp32 Adam's (the update
    is computed in fp32 before re-quantization); a leftover quantization code in its second moment would
    shrink that step by orders of magnitude next to a block of large moments."""
    base8, masks, hist8 = _train("adamw_8bit", steps=5)
    base32, _, hist32 = _train("torch_adamw", steps=5)
    first, later = _masks(BLOCKS * BNB_BLOCK)
    joined = later & ~first
    step8 = hist8[4]["big"][joined] - hist8[3]["big"][joined]
    step32 = hist32[4]["big"][joined] - hist32[3]["big"][joined]
    assert torch.equal(base8["big"], base32["big"])
    torch.testing.assert_close(step8, step32, rtol=1e-4, atol=1e-7)


def test_chunked_update_is_bitsandbytes_own_bit_for_bit(monkeypatch) -> None:
    """Updating a tensor a few blocks at a time (to bound the CPU kernel's fp32 scratch) changes nothing: with
    dense gradients (no zero to keep) and weight decay, weights, codes and absmax equal bitsandbytes' own
    whole-tensor update exactly; a partial last block included. Also pins the kernel call we make."""
    import bitsandbytes as bnb

    from id3_ds.training import optimizers

    monkeypatch.setattr(optimizers, "CHUNK", 2 * BNB_BLOCK)
    torch.manual_seed(0)
    start = torch.randn(BLOCKS * BNB_BLOCK + 100)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opts = [
        optimizers.make_adamw_8bit([ours], lr=1e-2, weight_decay=0.1),
        bnb.optim.AdamW8bit([theirs], lr=1e-2, weight_decay=0.1),
    ]
    for step in range(4):
        g = torch.randn(start.shape) * (1e3 if step % 2 else 1e-2)
        for p, opt in zip((ours, theirs), opts):
            p.grad = g.clone()
            opt.step()
    assert torch.equal(ours.detach(), theirs.detach()) and not torch.equal(ours.detach(), start)
    for key in ("state1", "state2", "absmax1", "absmax2", "step"):
        a, b = opts[0].state[ours][key], opts[1].state[theirs][key]
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, key


def test_unknown_optimizer_name_is_one_clear_line() -> None:
    with pytest.raises(ID3Error, match="train.optimizer='sgd' is not one of deepspeed, torch_adamw, adamw_8bit"):
        build_client_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))], 1e-3)


# -- config: what is refused before anything starts ------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["id3.state=sparse", "deepspeed.zero_optimization.stage=3"],
            "id3.state=sparse keeps its own fp32 Adam for the chosen entries only, so train.optimizer=adamw_8bit "
            "does not apply: drop train.optimizer or use id3.state=dense",
        ),
        (
            ["deepspeed.zero_optimization.stage=3", 'deepspeed.zero_optimization.offload_optimizer={"device": "nvme"}'],
            "train.optimizer=adamw_8bit cannot be swapped to NVMe",
        ),
        (['deepspeed.optimizer={"type": "AdamW"}'], "train.optimizer=adamw_8bit conflicts with a deepspeed.optimizer"),
    ],
    ids=["sparse-state", "nvme-offload", "deepspeed-optimizer-block"],
)
def test_what_8bit_cannot_run_with_is_one_line_before_anything_starts(overrides, message, tmp_path) -> None:
    out = f"train.output_dir={tmp_path / 'out'}"
    with pytest.raises(ID3Error) as e:
        preflight(load_config(TINY_CONFIG, [out, "train.optimizer=adamw_8bit", *overrides]))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_sparse_state_refuses_torch_adamw_too(tmp_path) -> None:
    """Sparse state's Adam is its own: a client optimizer asked for would be silently ignored."""
    overrides = [f"train.output_dir={tmp_path}", "id3.state=sparse", "train.optimizer=torch_adamw"]
    with pytest.raises(ID3Error, match="train.optimizer=torch_adamw does not apply"):
        preflight(load_config(TINY_CONFIG, overrides))


def test_resume_mismatch_allow_cannot_cross_8bit_and_fp32_optimizer_state(tmp_path) -> None:
    from id3_ds.checkpoint.compat import check_resume
    from tests.test_resume_rules import _cfg, _checkpoint

    ckpt = _checkpoint(_cfg(tmp_path, "train.optimizer=adamw_8bit"), 20, 40)
    allow = "train.resume_mismatch=allow"
    with pytest.raises(ID3Error) as e:
        check_resume(_cfg(tmp_path, "train.optimizer=torch_adamw", allow))
    assert str(e.value) == (
        f"{ckpt} holds train.optimizer=adamw_8bit state, which train.optimizer=torch_adamw cannot load (8-bit and "
        "fp32 Adam moments do not convert): set train.optimizer=adamw_8bit, or a new train.output_dir"
    )
    with pytest.raises(ID3Error, match="train.resume_mismatch=allow"):  # without allow: the usual mismatch line
        check_resume(_cfg(tmp_path, "train.optimizer=deepspeed"))
    assert check_resume(_cfg(tmp_path, "train.optimizer=adamw_8bit", "train.lr=0.001", allow)).step == 20


@pytest.mark.parametrize(
    "optimizer, now_stage, now_world, why",
    [
        ("adamw_8bit", 2, 1, "8-bit optimizer states (train.optimizer=adamw_8bit) do not re-partition"),
        # fp32 too: ZeRO-2 -> ZeRO-3 has no universal path, and the run used to go on from the base weights
        ("deepspeed", 3, 2, "DeepSpeed's universal checkpoint does not load across ZeRO-2 -> ZeRO-3"),
    ],
)
def test_a_dense_run_resumes_only_where_deepspeed_can_load_its_weights(
    tmp_path, monkeypatch, optimizer, now_stage, now_world, why
) -> None:
    """full/lora have no ID3 shards to restore weights from: where DeepSpeed's files do not load (8-bit moments,
    which do not re-partition, or a stage change with no universal path), one line instead of base weights."""
    from types import SimpleNamespace

    from id3_ds.checkpoint import resuming
    from id3_ds.update import DenseUpdate
    from tests.test_resume_rules import _cfg, _checkpoint

    monkeypatch.setattr(resuming, "start_watchdog", lambda timeout_s: None)  # no thread in the test process
    cfg = _cfg(tmp_path, "method=full", f"train.optimizer={optimizer}", "train.export_delta=false")
    ckpt = _checkpoint(cfg, 20, 40, world=2)  # saved by 2 ranks at ZeRO-2
    engine, update = (
        SimpleNamespace(zero_optimization_stage=lambda: now_stage),
        SimpleNamespace(parts=DenseUpdate.parts),
    )
    with pytest.raises(ID3Error) as e:
        resuming.resume(engine, update, cfg, world=now_world)
    assert str(e.value) == (
        f"{ckpt} was saved by 2 ranks at ZeRO-2; a method full run resumes only there ({why}): resume on 2 ranks "
        "at ZeRO-2"
    )


# -- under DeepSpeed, 2 CPU ranks ------------------------------------------------------------------------

BUDGET, STEPS = 600, 6
COMMON = [
    f"id3.budget={BUDGET}",
    f"train.steps={STEPS}",
    "train.grad_accum=2",
    "train.micro_batch_size=2",
    "train.lr=3e-3",
    "train.weight_decay=0.01",
    "train.save_steps=3",
    "train.log_steps=1",
    "train.save_final_model=true",
    "train.optimizer=adamw_8bit",
]
ZERO2 = [*COMMON, "deepspeed.zero_optimization.stage=2", "model.dtype=fp32"]


def _state_entries(ckpt: Path) -> dict[torch.dtype, int]:
    """Entries of the optimizer's moments (bitsandbytes' state1/state2) in a checkpoint's DeepSpeed files, by
    dtype: what the run really kept."""
    out: dict[torch.dtype, int] = {}

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("state1", "state2") and torch.is_tensor(value):
                    out[value.dtype] = out.get(value.dtype, 0) + value.numel()
                else:
                    walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    for f in sorted((ckpt / "ds").rglob("*.pt")):
        walk(torch.load(f, map_location="cpu", weights_only=False))
    return out


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def _check_id3_run(run: Path, base_dir: str) -> dict[str, torch.Tensor]:
    """Exact budget, unchosen entries bit-identical to the base, the loss went down; returns the final weights."""
    state, meta = read_id3_state(checkpoint_dir(run, STEPS))
    assert len(state) == BUDGET and meta["chosen"] == BUDGET
    final = weights(run / "final_model")
    base = {n: b.to(final[n].dtype) for n, b in weights(base_dir).items()}  # bf16 trains the bf16 rounding
    assert_only_chosen_moved(base, final, chosen_indices(state))
    moved = sum(
        int((final[n].reshape(-1)[pm.indices] != base[n].reshape(-1)[pm.indices]).sum())
        for n, pm in state.params.items()
    )
    assert moved > 0.9 * BUDGET  # chosen entries trained (bf16 rounding can hide a few tiny updates)
    losses = _losses(run)
    assert len(losses) >= STEPS and losses[-1] < losses[0]  # a resumed run appends to the log
    return final


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, env) -> Path:
    """One uninterrupted ID3 run, ZeRO-2 fp32 on 2 ranks, checkpoints at steps 3 and 6 (shared below)."""
    out = tmp_path_factory.mktemp("zero2-8bit")
    ok(train([*ZERO2, f"train.output_dir={out}"], env=env))
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_id3_under_zero2_keeps_8bit_moments_and_unchosen_entries_bit_identical(zero2, base_dir) -> None:
    _check_id3_run(zero2, base_dir)
    entries = _state_entries(checkpoint_dir(zero2, STEPS))
    # both moments of every trainable entry (flat ZeRO partitions, each above min_8bit_size) in uint8
    assert set(entries) == {torch.uint8} and entries[torch.uint8] >= 2 * sum(
        t.numel() for t in weights(base_dir).values()
    )


def _continue_from_step_3(src: Path, dst: Path) -> None:
    """A copy of the run as a kill after step 3 would leave it: checkpoint 3 only."""
    shutil.copytree(src, dst)
    shutil.rmtree(checkpoint_dir(dst, STEPS))
    shutil.rmtree(dst / "final_model")


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_on_the_same_ranks_continues_the_8bit_run_bit_for_bit(zero2, tmp_path, env) -> None:
    """DeepSpeed saves and reloads the client optimizer's state_dict: bitsandbytes' codes and absmax included."""
    run = tmp_path / "resumed"
    _continue_from_step_3(zero2, run)
    proc = ok(
        train([*COMMON, "deepspeed.zero_optimization.stage=2", "model.dtype=fp32", f"train.output_dir={run}"], env=env)
    )
    assert "at step 3 of 6" in proc.stdout and "restart" not in proc.stdout
    want, got = weights(zero2 / "final_model"), weights(run / "final_model")
    assert all(torch.equal(want[n], got[n]) for n in want), "the resumed run differs from the uninterrupted one"


@pytest.mark.slow
def test_resume_on_another_world_size_restarts_8bit_moments_and_keeps_the_contract(
    zero2, tmp_path, env, base_dir
) -> None:
    """8-bit moments have no universal (re-partitionable) form: weights and mask come back exactly from the ID3
    shards, the moments restart, and the line says so."""
    run = tmp_path / "one-rank"
    _continue_from_step_3(zero2, run)
    proc = ok(train([*ZERO2, "train.grad_accum=4", f"train.output_dir={run}"], nproc=1, env=env))
    assert "optimizer moments restart (8-bit optimizer states (train.optimizer=adamw_8bit) do not re-partition)" in (
        proc.stdout
    )
    _check_id3_run(run, base_dir)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        # ZeRO-3 sub-group partitions, fp32 masters on the CPU-offload path, bf16 weights
        ["deepspeed.zero_optimization.stage=3", 'deepspeed.zero_optimization.offload_optimizer={"device": "cpu"}'],
        # stage 0: whole parameters (FP16_UnfusedOptimizer's fp32 copies in bf16); dense method: bnb decays itself
        ["deepspeed.zero_optimization.stage=0", "method=full", "train.export_delta=false"],
    ],
    ids=["zero3-bf16-offload-id3", "zero0-bf16-full"],
)
def test_other_stages_train_with_8bit_moments(variant, tmp_path, env, base_dir) -> None:
    ok(train([*COMMON, "model.dtype=bf16", *variant, f"train.output_dir={tmp_path}"], env=env))
    entries = _state_entries(checkpoint_dir(tmp_path, STEPS))
    assert entries.get(torch.uint8, 0) > 0.9 * sum(entries.values())
    if "method=full" in variant:
        # at stage 0 bitsandbytes sees whole tensors: those under min_8bit_size (norm scales) keep fp32 moments
        assert entries.get(torch.float32, 0) > 0
        final, base = weights(tmp_path / "final_model"), weights(base_dir)
        assert sum(int((final[n] != base[n].to(final[n].dtype)).sum()) for n in final) > 0.5 * sum(
            t.numel() for t in final.values()
        )
        losses = _losses(tmp_path)
        assert losses[-1] < losses[0]
    else:
        _check_id3_run(tmp_path, base_dir)


# -- the benchmarks' 8-bit variants (no launch) --------------------------------------------------------------


def test_memory_bench_8bit_variants_predict_6_bytes_less_per_weight_and_compare_by_pair() -> None:
    from benchmarks import bench_memory as bm
    from id3_ds.config import parse_override

    for name, overrides in bm.OPTIMIZER_VARIANTS.items():
        assert name not in bm.VARIANTS  # not in the default run (nor its CI quick test)
        assert {parse_override(o)[0][0] for o in overrides} == {"method", "train"}
    params = 97_536_768  # bench_step_overhead's 100M LLaMA
    saved = (8 - (2 + 8 / 256)) * params / 2
    for method in ("full", "id3 dense"):
        fp32 = bm.predicted_state(f"{method} (torch AdamW)", "100M", 1, 3)
        assert bm.predicted_state(f"{method} (8-bit AdamW)", "100M", 1, 3) == pytest.approx(fp32 - saved)
    assert bm.predicted_state("full (torch AdamW)", "100M", 1, 3) == bm.predicted_state("full", "100M", 1, 3)
    mib = 2**20
    rows = [
        {"variant": v, "grad_accum": 1, "rank": 0, "baseline": 100 * mib, "above_baseline": above * mib}
        | {"steps_peak": (100 + above) * mib, "predicted_state": bm.predicted_state(v, "100M", 1, 3)}
        for v, above in (("full (torch AdamW)", 1000), ("full (8-bit AdamW)", 750))
    ]
    (line,) = bm.optimizer_lines(rows)
    assert line.startswith("- full, grad_accum 1, rank 0: 8-bit AdamW peak 750 MiB = 0.75 x torch AdamW's 1000 MiB")
    assert f"250 MiB less (predicted {saved / mib:.0f}); steps peak 0.75 x" in line


def test_quality_bench_runs_each_cell_once_per_optimizer_and_tables_them_apart() -> None:
    import argparse

    from benchmarks import bench_quality as bq

    a = argparse.Namespace(
        model="minilm", phase="grid", budgets=["0.1%"], methods=["id3"], seeds=[42], lrs=[1e-3], optimizers=None
    )
    assert [r.optimizer for r in bq.plan(a)] == [None]
    a.optimizers = ["torch_adamw", "adamw_8bit"]
    runs = bq.plan(a)
    assert [(r.method, r.lr, r.optimizer) for r in runs] == [("id3", 1e-3, "torch_adamw"), ("id3", 1e-3, "adamw_8bit")]
    assert runs[1].key.endswith("optimizer=adamw_8bit")
    row = {"model": "minilm", "phase": "grid", "group": "0.1%", "method": "id3", "steps": 100, "budget": 31_874}
    rows = [
        {**row, "optimizer": o, "lr": 1e-3, "accuracy": acc} for o, acc in (("torch_adamw", 0.7), ("adamw_8bit", 0.6))
    ]
    assert len({bq._order(r) for r in rows}) == 2  # two table rows, not one cell of both
    assert [bq._name(r) for r in rows] == ["id3, torch_adamw", "id3, adamw_8bit"]

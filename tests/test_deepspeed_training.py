"""ID3 under DeepSpeed with 2 CPU processes: exact budget, frozen entries, agreement with plain torch,
resume after a kill, resume on another world size, and fast config errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from id3_ds import ID3Config, from_module
from id3_ds.checkpoint import checkpoint_dir, is_complete, read_id3_state
from id3_ds.data import collate, load_records, tokenize_records
from id3_ds.training.batches import micro_batch_indices
from id3_ds.training.loss import loss_items
from tests.assertions import assert_only_chosen_moved, chosen_indices
from tests.launcher import ok, train, weights

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BUDGET, STEPS, ACCUM, MICRO, LR, WD = 600, 6, 2, 2, 3e-3, 0.01
COMMON = [
    f"id3.budget={BUDGET}",
    f"train.steps={STEPS}",
    f"train.grad_accum={ACCUM}",
    f"train.micro_batch_size={MICRO}",
    f"train.lr={LR}",
    f"train.weight_decay={WD}",
    "train.save_steps=3",
    "train.log_steps=1",
    "train.save_final_model=true",
    "model.dtype=fp32",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env, base_dir) -> dict:
    """One uninterrupted 2-rank run per ZeRO stage (shared by the tests below). The ZeRO-3 run starts through
    torchrun itself, the users' launcher (its agent hosts the rendezvous store); the others fork their ranks."""
    out = {}
    for stage in (0, 2, 3):
        d = tmp_path_factory.mktemp(f"stage{stage}")
        args = [*COMMON, f"deepspeed.zero_optimization.stage={stage}", f"train.output_dir={d}"]
        ok(train(args, env=env, torchrun=stage == 3))
        out[stage] = d
    return out


def _check_frozen_and_budget(run_dir, base_dir) -> tuple[dict, dict]:
    state, meta = read_id3_state(checkpoint_dir(run_dir, STEPS))  # also checks every rank's winners digest agrees
    assert len(state) == BUDGET and meta["chosen"] == BUDGET
    final = weights(run_dir / "final_model")
    # a bf16 run trains the bf16 rounding of an fp32 base
    base = {n: b.to(final[n].dtype) for n, b in weights(base_dir).items()}
    for name, pm in state.params.items():
        assert torch.equal(pm.base, base[name].reshape(-1)[pm.indices].float())
    assert_only_chosen_moved(base, final, chosen_indices(state))
    return state, final


def _plain_torch_reference(base_dir: str, world: int = 2):
    """The same run in one process on the plain-torch path: the mean over the step's loss tokens."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir)
    data = tokenize_records(load_records("id3_ds/resources/tiny_alpaca.jsonl"), "alpaca", tok, 128)
    config = ID3Config(budget=BUDGET, no_decay=("*bias", "*norm*"))
    id3 = from_module(model, config, STEPS)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    id3.attach(opt, id3.decay_rates(WD))
    for step in range(STEPS):
        opt.zero_grad()
        idx = [
            micro_batch_indices(len(data), 42, step, m, r, world, MICRO, ACCUM)
            for m in range(ACCUM)
            for r in range(world)
        ]
        batches = [collate([data[i] for i in ix], tok.pad_token_id) for ix in idx]
        total = sum(loss_items(b["labels"]) for b in batches)
        for b in batches:
            (model(**b).loss * loss_items(b["labels"]) / total).backward()
        id3.select()
        id3.mask_grads()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return id3.mask_state(), {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_stage_budget_frozen_entries_and_plain_torch_agreement(stage, runs, base_dir) -> None:
    state, final = _check_frozen_and_budget(runs[stage], base_dir)
    ref_state, ref_weights = _plain_torch_reference(base_dir)
    assert set(state.params) == set(ref_state.params)
    for name, pm in state.params.items():
        assert torch.equal(pm.indices, ref_state.params[name].indices), f"mask of {name} differs from plain torch"
        torch.testing.assert_close(final[name], ref_weights[name], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "variant",
    [
        ["deepspeed.zero_optimization.stage=3", "train.optimizer=torch_adamw", "model.gradient_checkpointing=true"],
        # FP16_Optimizer in bf16: masters apart from the weights; per-entry bias correction in its inner hooks
        ["deepspeed.zero_optimization.stage=0", "id3.bias_correction=per_entry"],
    ],
    ids=["zero3-client-adamw-checkpointing", "zero0-deepspeed-adamw-per-entry"],
)
def test_bf16_keeps_unchosen_entries_bit_identical(variant, tmp_path, env, base_dir) -> None:
    ok(train([*COMMON, "model.dtype=bf16", *variant, f"train.output_dir={tmp_path}"], env=env))
    state, final = _check_frozen_and_budget(tmp_path, base_dir)
    base = weights(base_dir)
    moved = sum(
        int((final[n].reshape(-1)[pm.indices] != base[n].to(torch.bfloat16).reshape(-1)[pm.indices]).sum())
        for n, pm in state.params.items()
    )
    assert moved > 0.9 * BUDGET  # chosen entries did train (bf16 rounding can hide a few tiny updates)


def test_cpu_offload_matches_plain_torch(tmp_path, env, base_dir) -> None:
    """Offloaded ZeRO-2 clips by norms cached in backward: they must be the masked gradients' norms."""
    offload = 'deepspeed.zero_optimization.offload_optimizer={"device": "cpu"}'
    ok(train([*COMMON, "deepspeed.zero_optimization.stage=2", offload, f"train.output_dir={tmp_path}"], env=env))
    state, final = _check_frozen_and_budget(tmp_path, base_dir)
    ref_state, ref_weights = _plain_torch_reference(base_dir)
    for name, pm in state.params.items():
        assert torch.equal(pm.indices, ref_state.params[name].indices)
        torch.testing.assert_close(final[name], ref_weights[name], atol=2e-5, rtol=1e-4)


def test_evaluation_does_not_change_training_dropout_is_on_throughout(tmp_path, env, base_dir) -> None:
    """from_pretrained hands back a model in eval mode: training must switch dropout on from step 1, so a run
    that evaluates every step ends with the same weights as one that never evaluates."""
    import json
    import shutil

    model = tmp_path / "dropout-model"
    shutil.copytree(base_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    finals = []
    evaluate_every_step = ["data.eval_path=id3_ds/resources/tiny_alpaca.jsonl", "train.eval_steps=1"]
    for name, extra in (("plain", []), ("eval", evaluate_every_step)):
        out = tmp_path / name
        args = [*COMMON, f"model.name_or_path={model}", "train.steps=3", *extra]
        ok(train([*args, "train.save_steps=0", f"train.output_dir={out}"], nproc=1, env=env))
        finals.append(weights(out / "final_model"))
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key


def test_kills_during_a_save_and_after_a_step_both_end_in_the_uninterrupted_run(tmp_path, env, runs) -> None:
    """One chain of 3 launches: a kill while checkpoint 3 is written leaves it incomplete, so the next run
    starts over (removing the leftover); that run's rank 1 is killed after step 4, and the last run resumes
    from the now complete checkpoint 3. Bit-identical to the uninterrupted run only if the restarted steps
    and the resumed ones both were."""
    args = [*COMMON, "deepspeed.zero_optimization.stage=2", f"train.output_dir={tmp_path}"]
    assert train(args, env={**env, "ID3_DS_FAULT": "kill_during_save:3:0"}).returncode != 0
    assert checkpoint_dir(tmp_path, 3).exists() and not is_complete(checkpoint_dir(tmp_path, 3))
    restarted = train(args, env={**env, "ID3_DS_FAULT": "kill_after_step:4:1"})
    assert restarted.returncode != 0 and "resumed from" not in restarted.stdout, restarted.stdout[-3000:]
    assert is_complete(checkpoint_dir(tmp_path, 3)) and not checkpoint_dir(tmp_path, 6).exists()
    log = ok(train(args, env=env)).stdout
    assert "resumed from" in log and "at step 3 of 6" in log, log[-3000:]
    want, got = weights(runs[2] / "final_model"), weights(tmp_path / "final_model")
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after resume"
    assert read_id3_state(checkpoint_dir(tmp_path, STEPS))[1] == read_id3_state(checkpoint_dir(runs[2], STEPS))[1]


def _assert_close_to(reference_dir, run_dir, atol: float) -> float:
    """Every weight within atol of the reference run's; returns the largest difference."""
    want, got = weights(reference_dir / "final_model"), weights(run_dir / "final_model")
    worst = max(float((want[n] - got[n]).abs().max()) for n in want)
    assert worst <= atol, f"final weights differ from the uninterrupted run by up to {worst:.3g}"
    return worst


def test_resume_on_a_different_world_size_keeps_mask_and_adam_moments(tmp_path, env, base_dir, runs) -> None:
    """ZeRO-3, killed at step 3 on 2 ranks, resumed on 1 rank with the same global batch (grad_accum x2):
    DeepSpeed's universal checkpoint brings Adam's moments along, so the run ends where the uninterrupted
    one does (restarted moments would miss it by ~lr)."""
    args = [*COMMON, "deepspeed.zero_optimization.stage=3", f"train.output_dir={tmp_path}"]
    assert train(args, env={**env, "ID3_DS_FAULT": "kill_after_step:3:0"}).returncode != 0
    at3, _ = read_id3_state(checkpoint_dir(tmp_path, 3))
    log = ok(train([*args, f"train.grad_accum={2 * ACCUM}"], nproc=1, env=env)).stdout
    assert "weights, mask and optimizer moments restored" in log, log[-3000:]
    assert "global batch was" not in log  # grad_accum doubled on half the ranks: the same run
    assert (checkpoint_dir(tmp_path, 3) / "ds_universal" / "latest_universal").is_file()
    final, _ = _check_frozen_and_budget(tmp_path, base_dir)
    for name, pm in at3.params.items():  # every entry chosen before the stop is still chosen
        assert bool(torch.isin(pm.indices, final.params[name].indices).all())
    want, _ = read_id3_state(checkpoint_dir(runs[3], STEPS))
    assert all(torch.equal(final.params[n].indices, want.params[n].indices) for n in want.params)
    _assert_close_to(runs[3], tmp_path, atol=1e-5)


def test_resume_from_1_rank_on_2_ranks_and_another_zero_stage(tmp_path, env, base_dir, runs) -> None:
    """ZeRO-2 on 1 rank -> ZeRO-1 on 2 ranks keeps the moments (universal checkpoint); from the same
    checkpoint, ZeRO-3 cannot load it: weights and mask are still exact, the moments restart (and the run
    visibly leaves the uninterrupted one: the check above would catch lost moments)."""
    killed = tmp_path / "killed"
    args = [*COMMON, f"train.output_dir={killed}"]
    one_rank = [*args, "deepspeed.zero_optimization.stage=2", f"train.grad_accum={2 * ACCUM}"]
    assert train(one_rank, nproc=1, env={**env, "ID3_DS_FAULT": "kill_after_step:3:0"}).returncode != 0
    log = ok(train([*args, "deepspeed.zero_optimization.stage=1"], env=env)).stdout
    assert "weights, mask and optimizer moments restored" in log, log[-3000:]
    _check_frozen_and_budget(killed, base_dir)
    _assert_close_to(runs[2], killed, atol=1e-5)

    restarted = tmp_path / "restarted"
    at3 = f"train.resume={checkpoint_dir(killed, 3)}"
    zero3 = [*COMMON, at3, "deepspeed.zero_optimization.stage=3", f"train.grad_accum={2 * ACCUM}"]
    log = ok(train([*zero3, f"train.output_dir={restarted}"], nproc=1, env=env)).stdout
    assert "optimizer moments restart (DeepSpeed's universal checkpoint does not load across ZeRO-2 -> ZeRO-3)" in log
    _check_frozen_and_budget(restarted, base_dir)
    with pytest.raises(AssertionError, match="differ from the uninterrupted run"):
        _assert_close_to(runs[2], restarted, atol=1e-4)


def test_unmask_steps_under_zero3_fills_the_budget_early_and_resumes_past_it(tmp_path, env, base_dir) -> None:
    """id3.unmask_steps=3 of 6 steps on 2 ZeRO-3 ranks: the budget is complete after step 3, no entry joins
    later, and a run killed after step 4 resumes on the fixed mask to the exact budget, frozen entries intact."""
    args = [*COMMON, "id3.unmask_steps=3", "deepspeed.zero_optimization.stage=3", f"train.output_dir={tmp_path}"]
    assert train(args, env={**env, "ID3_DS_FAULT": "kill_after_step:4:0"}).returncode != 0
    ok(train(args, env=env))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    chosen = {r["step"]: (r["chosen"], r["chosen_this_step"]) for r in records if "chosen" in r}
    assert chosen[3] == (BUDGET, BUDGET // 3) and all(chosen[s] == (BUDGET, 0) for s in (4, 5, 6)), chosen
    _check_frozen_and_budget(tmp_path, base_dir)


def test_resume_with_another_global_batch_says_so_and_how_to_match() -> None:
    from id3_ds.checkpoint import global_batch_note
    from id3_ds.config import config_from_dict

    raw = {"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"path": "x.jsonl"}}
    cfg = config_from_dict({**raw, "train": {"steps": 6, "micro_batch_size": 2, "grad_accum": 2}})
    saved = {"train": {"global_batch": 8}}  # 2 x 2 x 2 ranks
    assert global_batch_note(saved, cfg, world=2) is None
    note = global_batch_note(saved, cfg, world=1)
    assert "global batch was 8 examples per step, this run's is 4" in note
    assert note.endswith("set train.grad_accum=4 to match")
    assert global_batch_note({"train": {}}, cfg, world=1) is None  # older checkpoints: nothing to compare


def test_a_config_error_found_after_the_model_loaded_fails_with_one_clear_line(tmp_path, env) -> None:
    """The budget is checked against the loaded model, past the config checks: it still ends in one line and
    exit code 2. Errors the config checks find are launched in test_preflight.py (exit 2, one line, before
    any process group) and their messages are checked in-process in test_config.py and test_preflight.py."""
    args = ["id3.budget=100000000", "deepspeed.zero_optimization.stage=2", f"train.output_dir={tmp_path}"]
    proc = train(args, nproc=1, env=env)
    assert proc.returncode == 2
    assert "id3.budget=100000000 exceeds" in proc.stdout and "Traceback" not in proc.stdout, proc.stdout[-3000:]


def test_delta_from_zero3_checkpoint_of_2_ranks_equals_the_stage0_delta(runs, base_dir, tmp_path) -> None:
    """export-delta reads each rank's shard: ZeRO-3 partitions give the same delta as replicated stage 0."""
    from id3_ds.delta import export_delta, load_delta

    deltas = {}
    for stage in (0, 3):
        export_delta(runs[stage], base_dir, tmp_path / f"delta{stage}")
        deltas[stage] = load_delta(tmp_path / f"delta{stage}")
    assert set(deltas[0].params) == set(deltas[3].params)
    assert deltas[0].total_entries == deltas[3].total_entries == BUDGET
    for name, d0 in deltas[0].params.items():
        d3 = deltas[3].params[name]
        assert torch.equal(d0.indices, d3.indices), f"{name}: the two stages chose different entries"
        torch.testing.assert_close(d0.values, d3.values, atol=2e-5, rtol=1e-4)  # fp32 reduction order differs

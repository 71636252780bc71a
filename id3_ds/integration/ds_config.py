"""The DeepSpeed config of a run: the user's block, its "auto" values filled from the train section.

ID3 takes over weight decay (DeepSpeed's optimizers decay every entry, masked ones too), so the
optimizer's own weight_decay is set to 0 here and the rate travels to the hook instead.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from id3_ds.errors import ID3Error
from id3_ds.plan import fp16_refused, zero_stage

if TYPE_CHECKING:
    from id3_ds.config import RunConfig

SUPPORTED_OPTIMIZERS = ("adam", "adamw")
SPARSE_BUCKET = 1_000_000  # sparse state: DeepSpeed reduces nothing, so its reduce buffer stays small


def build_ds_config(cfg: RunConfig, world_size: int) -> tuple[dict, float]:
    """(DeepSpeed config dict, weight decay for ID3 to apply to chosen entries)."""
    ds: dict[str, Any] = copy.deepcopy(cfg.deepspeed) if isinstance(cfg.deepspeed, dict) else {}
    t, plan = cfg.train, cfg.plan
    auto = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.global_batch(world_size),
        "gradient_clipping": t.max_grad_norm,
    }
    for key, value in auto.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif key != "train_batch_size" and ds[key] != value:
            raise ID3Error(f'deepspeed.{key}={ds[key]} disagrees with the train section ({value}); set it to "auto"')
    if ds["train_batch_size"] != auto["train_batch_size"]:
        raise ID3Error(
            f"deepspeed.train_batch_size={ds['train_batch_size']} is not micro_batch_size * grad_accum * world "
            f'size = {auto["train_batch_size"]}; set it to "auto"'
        )
    if ds.get("fp16", {}).get("enabled") is True:
        raise fp16_refused()
    bf16 = cfg.model.dtype == "bf16"
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") not in ("auto", bf16):
        raise ID3Error(f'deepspeed.bf16.enabled disagrees with model.dtype={cfg.model.dtype}; set it to "auto"')
    ds["bf16"]["enabled"] = bf16
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.setdefault("stage", zero_stage(zero))
    if zero.get("offload_param", {}).get("device", "none") not in ("none", None) and stage != 3:
        raise ID3Error("deepspeed offload_param needs zero_optimization.stage 3")

    if plan.sparse_state:
        return _sparse_state(ds, zero), t.weight_decay
    if plan.client_optimizer:  # a client optimizer, built by the recipe (training/optimizers.py)
        if "optimizer" in ds:
            raise ID3Error(f"train.optimizer={t.optimizer} conflicts with a deepspeed.optimizer block; drop one")
        ds.setdefault("zero_allow_untested_optimizer", True)
        if zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None):
            ds.setdefault("zero_force_ds_cpu_optimizer", False)
        _no_auto_left(ds, "deepspeed")
        return ds, t.weight_decay
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in SUPPORTED_OPTIMIZERS:
        raise ID3Error(f"deepspeed.optimizer.type {opt.get('type')!r} is not supported; use Adam or AdamW")
    params = opt.setdefault("params", {})
    if params.get("lr", "auto") == "auto":
        params["lr"] = t.lr
    wd = params.get("weight_decay", "auto")
    wd = t.weight_decay if wd == "auto" else float(wd)
    if str(opt["type"]).lower() == "adam" and wd:
        params["adam_w_mode"] = True  # decoupled decay, as AdamW: ID3 applies it to chosen entries only
    if plan.masked:  # the mask core applies decay to chosen entries only
        params["weight_decay"] = 0.0
    else:
        params["weight_decay"] = wd
    _no_auto_left(ds, "deepspeed")
    return ds, wd


def _sparse_state(ds: dict, zero: dict) -> dict:
    """id3.state=sparse: DeepSpeed only partitions and gathers parameters; the update holds Adam itself.

    ZeRO stage 1 and 2 partition optimizer state and gradients, and sparse state has neither in DeepSpeed
    (deepspeed.initialize even asserts "zero stage 2 requires an optimizer" without one): they run as stage
    0, each rank holding the whole model, gradients all-reduced as they arrive, the O(B) state replicated.

    No optimizer or scheduler block (deepspeed.initialize then builds no ZeRO optimizer: no fp32 masters,
    moments or gradient partitions); a small reduce bucket (the default 5e8 entries would be allocated
    for nothing); and no persistent parameters (stage3_param_persistence_threshold 0): a parameter kept
    gathered would keep a stale whole copy after the update writes its partition.
    """
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    if zero.get("stage") in (1, 2):  # nothing to partition without an optimizer: DeepSpeed's stage 0 (below)
        zero["stage"] = 0
    bucket = zero.get("reduce_bucket_size")
    zero["reduce_bucket_size"] = min(int(bucket), SPARSE_BUCKET) if isinstance(bucket, (int, float)) else SPARSE_BUCKET
    if zero.get("stage") == 3:
        zero["stage3_param_persistence_threshold"] = 0
    else:  # stage 0: bf16 without an optimizer would make DeepSpeed wrap the model in BF16_Optimizer (fp32
        ds["bf16"]["enabled"] = False  # masters of every weight); the model is loaded in bf16 already
    _no_auto_left(ds, "deepspeed")
    return ds


def _no_auto_left(node: Any, where: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _no_auto_left(v, f"{where}.{k}")
    elif node == "auto":
        raise ID3Error(f'{where} is "auto" but id3-ds has no value to fill it with; set it explicitly')

"""What a run is, decided once from its config: the plan every other module asks instead of re-deriving it.

A run is one point in method x optimizer state x quantization x LoRA x ZeRO stage. `RunPlan` names that
point (`plan_of(cfg)`, immutable), and this module holds every check of a combination that cannot run, each
with its one-line refusal, so one rule is worded in one place:

- `check_modes(cfg)`: what the config alone contradicts (method against LoRA, what may be exported); the
  config runs it at load.
- `check_engine(cfg, stage, zero, ds)`: what the DeepSpeed block adds (sparse state, a quantized base,
  8-bit moments, the ZeRO features masking cannot run with); preflight runs it before any process starts.

Nothing here reads a file, imports DeepSpeed or builds a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from id3_ds.errors import ID3Error
from id3_ds.methods.registry import DENSE, MASKED

if TYPE_CHECKING:
    from id3_ds.config import RunConfig

CLIENT_OPTIMIZERS = ("torch_adamw", "adamw_8bit")  # train.optimizer values the recipe builds itself
BF16_OPTIMIZER_ACCUM = ("fp32", "float32", "float")  # data_types.grad_accum_dtype values that pick it


@dataclass(frozen=True)
class RunPlan:
    """What runs: the answers every module needs, each decided here once."""

    method: str
    masked: bool  # a mask over entries (id3 and the static baselines); False: dense (full, lora)
    sparse_state: bool  # masked with id3.state=sparse: the update keeps Adam for the chosen entries itself
    quantization: str  # model.quantization: none, nf4 or int8
    lora: bool  # PEFT LoRA wraps the model (lora.rank > 0)
    fisher_pass: bool  # method fish: sample gradients summed before step 0
    zero_stage: int  # the stage DeepSpeed runs (sparse state runs stages 1 and 2 as 0)
    classification: bool  # a sequence classifier (data.format classification)
    client_optimizer: str | None  # torch_adamw / adamw_8bit built by the recipe; None: DeepSpeed's or none

    @property
    def quantized_base(self) -> bool:
        """Selectable linear weights held bitsandbytes-packed, trained through an overlay (qID3)."""
        return self.masked and self.quantization != "none"

    @property
    def qlora(self) -> bool:
        """PEFT's LoRA over bitsandbytes Linear4bit layers."""
        return not self.masked and self.quantization == "nf4"

    @property
    def sparse_state_fits(self) -> bool:
        """Whether id3.state=sparse would run this method (masked, no Fisher pass, no LoRA): what the dense
        checkpoint's size note may suggest."""
        return self.masked and not self.fisher_pass and not self.lora

    @property
    def engine_optimizer(self) -> bool:
        """Whether DeepSpeed's engine holds an optimizer (and an LR scheduler); sparse state keeps its own."""
        return not self.sparse_state

    @property
    def has_delta(self) -> bool:
        """Whether the run's result is a sparse delta against its base: masked methods, except a classifier
        under LoRA, whose fresh head is PEFT's trainable copy that a delta cannot carry."""
        return self.masked and not (self.lora and self.classification)

    @property
    def strict_load(self) -> bool:
        """Whether DeepSpeed's checkpoint loads back strictly (bitsandbytes' quantization constants do not)."""
        return self.quantization == "none"


def zero_stage(zero: dict) -> int:
    """deepspeed.zero_optimization.stage as configured (0 when absent), refused unless 0, 1, 2 or 3."""
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ID3Error(f"deepspeed.zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def plan_of(cfg: RunConfig) -> RunPlan:
    """The plan of a validated config (config.RunConfig.plan)."""
    masked = cfg.method in MASKED
    sparse = masked and cfg.id3.state == "sparse"
    ds = cfg.deepspeed if isinstance(cfg.deepspeed, dict) else {}
    zero = ds.get("zero_optimization", {})
    stage = zero_stage(zero) if isinstance(zero, dict) else 0  # not an object: preflight says so
    if sparse and stage in (1, 2):  # nothing for ZeRO-1/2 to partition without a DeepSpeed optimizer
        stage = 0
    client = cfg.train.optimizer if cfg.train.optimizer in CLIENT_OPTIMIZERS and not sparse else None
    return RunPlan(
        method=cfg.method,
        masked=masked,
        sparse_state=sparse,
        quantization=cfg.model.quantization,
        lora=cfg.lora.rank > 0,
        fisher_pass=cfg.method == "fish",
        zero_stage=stage,
        classification=cfg.data.format == "classification",
        client_optimizer=client,
    )


def fp16_refused() -> ID3Error:
    """fp16 with any method: DeepSpeed's loss scaler skips overflowing steps, which the unmasking counts."""
    return ID3Error("fp16 training is not supported (loss scaling skips steps the mask would count); use bf16")


def round_robin_refused() -> ID3Error:
    """ZeRO's round-robin gradient partitioning moves entries between ranks' partitions under the mask."""
    return ID3Error("deepspeed.zero_optimization.round_robin_gradients=true is not supported by ID3; set it to false")


def bf16_optimizer_refused() -> ID3Error:
    """DeepSpeed's BF16_Optimizer keeps fp32 gradients apart from where the mask reads and zeroes them."""
    return ID3Error(
        "DeepSpeed's BF16_Optimizer (ZeRO-1 + bf16 + data_types.grad_accum_dtype=fp32) is not supported by "
        "ID3: drop grad_accum_dtype or use zero_optimization.stage 2"
    )


def fish_with_sparse_state() -> ID3Error:
    """Method fish with id3.state=sparse (preflight; the update factory for callers that skip it)."""
    return ID3Error(
        "id3.state=sparse does not support method 'fish' (its Fisher pass needs DeepSpeed's "
        "optimizer); use id3.state=dense or another method"
    )


# -- what the config alone contradicts ----------------------------------------------------------------


def check_modes(cfg: RunConfig) -> None:
    """Method against LoRA and what a run may export, refused at config load."""
    lora, t = cfg.lora, cfg.train
    if cfg.method == "lora" and lora.rank == 0:
        raise ID3Error("method 'lora' needs lora.rank > 0 (e.g. lora.rank=8)")
    if cfg.method == "full" and lora.rank > 0:
        raise ID3Error("method 'full' trains every weight and ignores LoRA; set lora.rank=0 or use method 'lora'")
    if t.export_delta and cfg.method in DENSE:
        raise ID3Error(
            f"train.export_delta: method '{cfg.method}' trains densely, so there is no sparse delta to export; "
            "set train.export_delta=false and keep the model with train.save_final_model=true"
        )
    # a plain classification run exports its fresh head whole (id3.fully_trainable); under LoRA it is PEFT's
    # trainable copy, which a delta cannot carry
    if t.export_delta and cfg.data.format == "classification" and lora.rank:
        raise ID3Error(
            "train.export_delta: this run trains a fresh classification head, which the base model does not "
            "hold, so a sparse delta against it cannot be written; set train.export_delta=false "
            "(train.save_final_model=true keeps the model)"
        )


# -- what the DeepSpeed block adds --------------------------------------------------------------------


def check_engine(cfg: RunConfig, stage: int, zero: dict, ds: dict) -> None:
    """The combinations of modes and DeepSpeed settings that cannot run, from the config alone."""
    check_quantization(cfg, stage)  # first: its lines name the quantization, not sparse state's own fixes
    check_sparse_state(cfg, zero)
    check_adamw_8bit(cfg, zero)
    check_masking(cfg, stage, zero, ds)


def check_masking(cfg: RunConfig, stage: int, zero: dict, ds: dict) -> None:
    """DeepSpeed features that masked gradients cannot run with (integration/zero_slices.check_supported
    refuses the same once the engine exists)."""
    if cfg.method not in MASKED:
        return
    if zero.get("round_robin_gradients") is True:
        raise round_robin_refused()
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if stage == 1 and cfg.model.dtype == "bf16" and accum in BF16_OPTIMIZER_ACCUM and not offloaded:
        raise bf16_optimizer_refused()


def check_sparse_state(cfg: RunConfig, zero: dict) -> None:
    """id3.state=sparse: what it cannot run with (one line each, before any model loads).

    Sparse state writes chosen entries straight into each rank's ZeRO-3 partition (or the whole weight at
    stage 0) and keeps no DeepSpeed optimizer: anything that moves, re-partitions or quantizes those
    partitions, or a method that needs a dense optimizer or DeepSpeed's backward, cannot work with it.
    """
    if cfg.id3.state != "sparse":
        return
    if cfg.method in DENSE:
        raise ID3Error(
            f"id3.state=sparse needs a masked method, but method '{cfg.method}' trains densely; use id3.state=dense"
        )
    if cfg.method == "fish":
        raise fish_with_sparse_state()
    if cfg.train.optimizer != "deepspeed":  # ignoring it would leave a user who asked for 8-bit moments with fp32
        raise ID3Error(
            f"id3.state=sparse keeps its own fp32 Adam for the chosen entries only, so train.optimizer="
            f"{cfg.train.optimizer} does not apply: drop train.optimizer or use id3.state=dense"
        )
    if cfg.lora.rank:
        raise ID3Error(
            "id3.state=sparse does not support ID3 over LoRA (lora.rank > 0); set lora.rank=0 or use id3.state=dense"
        )
    for name in ("offload_optimizer", "offload_param"):
        if zero.get(name, {}).get("device", "none") not in ("none", None):
            raise ID3Error(
                f"id3.state=sparse does not support deepspeed.zero_optimization.{name} (no offload): "
                f"drop {name} or use id3.state=dense"
            )
    if (zero.get("zero_hpz_partition_size") or 1) > 1:
        raise ID3Error(
            "id3.state=sparse does not support hpZ (deepspeed.zero_optimization.zero_hpz_partition_size"
            " > 1); set it to 1"
        )
    for name in ("zero_quantized_weights", "zero_quantized_nontrainable_weights"):
        if zero.get(name):
            raise ID3Error(f"id3.state=sparse does not support deepspeed.zero_optimization.{name}; set it to false")


def quantization_at_zero3(quantization: str) -> ID3Error:
    """The refusal of a quantized base at ZeRO-3 (preflight; the sparse update if built around it)."""
    return ID3Error(
        f"model.quantization={quantization} does not work with ZeRO stage 3 (ZeRO-3 partitions nn.Parameters, "
        "and a bitsandbytes-packed base is none: every rank holds it whole); use deepspeed.zero_optimization.stage 2"
    )


def check_quantization(cfg: RunConfig, stage: int) -> None:
    """model.quantization (nf4/int8): the selectable linear weights become a bitsandbytes-packed base plus an
    overlay of chosen entries (models/quantized.py), which only the sparse-state update can train."""
    q = cfg.model.quantization
    if q == "none":
        return
    if stage == 3:
        raise quantization_at_zero3(q)
    if cfg.train.save_final_model:
        raise ID3Error(
            f"train.save_final_model=true with model.quantization={q}: the trained model has no dense weights to "
            "save; set it to false (sparse ID3: merge its delta into the unquantized base)"
        )
    if cfg.method == "lora":  # QLoRA: PEFT's LoRA layers over bnb Linear4bit
        if q != "nf4" or cfg.data.format == "classification":
            raise ID3Error(
                f"method lora with model.quantization={q} supports nf4 on a causal LM (QLoRA) only; use "
                "model.quantization=nf4, or none"
            )
        return
    if cfg.lora.rank:
        raise ID3Error(
            f"model.quantization={q} does not support ID3 over LoRA (lora.rank > 0); set lora.rank=0 (sparse ID3 on "
            "the quantized base) or method=lora (QLoRA)"
        )
    if cfg.method in ("full", "fish", "bitfit"):
        why = {
            "full": "trains every weight densely",
            "fish": "needs DeepSpeed's optimizer for its Fisher pass",
            "bitfit": "trains biases and norms only, so no linear weight is selectable",
        }[cfg.method]
        raise ID3Error(f"model.quantization={q} does not support method '{cfg.method}' (it {why}); use method id3")
    if cfg.id3.state != "sparse":
        raise ID3Error(
            f"model.quantization={q} needs id3.state=sparse (a quantized base has no dense fp32 master for "
            "DeepSpeed's optimizer to update); set id3.state=sparse"
        )


def check_adamw_8bit(cfg: RunConfig, zero: dict) -> None:
    """train.optimizer=adamw_8bit: the one DeepSpeed set-up that cannot hold its 8-bit state.

    DeepSpeed's NVMe optimizer swapper (runtime/swap_tensor) swaps every state tensor through fp32 buffers of
    the partition's size; bitsandbytes' uint8 codes and per-block absmax are neither (read in its code, not run:
    NVMe needs libaio). Every stage 0-3 x fp32/bf16 x CPU offload combination trains (tests/test_adamw_8bit.py).
    """
    if cfg.train.optimizer != "adamw_8bit":
        return
    if zero.get("offload_optimizer", {}).get("device") == "nvme":
        raise ID3Error(
            "train.optimizer=adamw_8bit cannot be swapped to NVMe (DeepSpeed's optimizer swapper holds fp32 state "
            "only): set deepspeed.zero_optimization.offload_optimizer.device to cpu or none"
        )

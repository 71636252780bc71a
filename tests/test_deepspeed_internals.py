"""A canary for the DeepSpeed internals id3_ds/integration/ reads (zero_slices.py, params.py, engine_state.py,
universal.py); tests/test_integration_seam.py keeps every other module off them.

The distributed tests prove the hook works on the pinned DeepSpeed; this file fails loudly, naming the
attribute, as soon as a DeepSpeed upgrade renames one of them, before a confusing failure mid-training.
"""

from __future__ import annotations

import inspect

import pytest

deepspeed = pytest.importorskip("deepspeed")


def _source(obj) -> str:
    return inspect.getsource(obj)


CANARIES = [
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3",
        [
            "__param_id_to_grad_partition",
            "grad_position",
            "fp32_partitioned_groups_flat",
            "def get_param_id",
            "norm_for_param_grads",
            "offload_optimizer",
        ],
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2",
        "DeepSpeedZeroOptimizer",
        ["_hp_mapping", "norm_for_param_grads", "def get_param_id", "cpu_offload", "round_robin_gradients"],
    ),
    ("deepspeed.utils.mixed_precision_linkage", None, ["_hp_mapping", "_index_in_param_group"]),
    ("deepspeed.runtime.fp16.fused_optimizer", "FP16_Optimizer", ["fp32_groups_flat", "fp16_groups"]),
    ("deepspeed.runtime.fp16.unfused_optimizer", "FP16_UnfusedOptimizer", ["fp32_groups", "fp16_groups"]),
]


@pytest.mark.parametrize("module,cls,needles", CANARIES)
def test_optimizer_internals_still_exist(module, cls, needles) -> None:
    import importlib

    mod = importlib.import_module(module)
    src = _source(getattr(mod, cls) if cls else mod)
    for needle in needles:
        assert needle in src, (
            f"DeepSpeed {deepspeed.__version__}: {cls or module} lost '{needle}'; update id3_ds/integration/"
        )


def test_tensor_fragment_api_still_exists() -> None:
    from deepspeed.utils import tensor_fragment

    for name in ("get_hp_fragment", "get_lp_grad_fragment", "lp_fragment_address"):
        assert name in _source(tensor_fragment), f"tensor_fragment lost '{name}'; update id3_ds/integration/"


def test_pinned_version_is_accepted_and_others_refused(monkeypatch) -> None:
    from id3_ds.errors import ID3Error
    from id3_ds.integration.zero_slices import check_deepspeed_version

    check_deepspeed_version()
    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    with pytest.raises(ID3Error, match="not supported"):
        check_deepspeed_version()


# The internals id3_ds/integration/params.py, engine_state.py and universal.py touch outside the optimizers.
SEAM_CANARIES = [
    ("deepspeed.runtime.zero.partition_parameters", None, ["ds_tensor", "ds_shape", "ds_numel", "ds_id"]),
    ("deepspeed.runtime.zero.partition_parameters", "GatheredParameters", ["modifier_rank"]),
    (
        "deepspeed.runtime.engine",
        "DeepSpeedEngine",
        ["self.global_steps", "self.global_samples", "self._config", "load_universal_checkpoint", "lr_scheduler"],
    ),
    ("deepspeed.checkpoint.ds_to_universal", None, ["def main", "inject_missing_state", "num_extract_workers"]),
]


@pytest.mark.parametrize("module,cls,needles", SEAM_CANARIES)
def test_seam_internals_still_exist(module, cls, needles) -> None:
    import importlib

    mod = importlib.import_module(module)
    src = _source(getattr(mod, cls) if cls else mod)
    for needle in needles:
        assert needle in src, f"DeepSpeed {deepspeed.__version__}: {cls or module} lost '{needle}'; update integration/"

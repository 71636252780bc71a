"""A canary for the DeepSpeed internals the ID3 hook reads (see id3_ds/integration/zero_slices.py).

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
            f"DeepSpeed {deepspeed.__version__}: {cls or module} lost '{needle}'; update zero_slices.py"
        )


def test_tensor_fragment_api_still_exists() -> None:
    from deepspeed.utils import tensor_fragment

    for name in ("get_hp_fragment", "get_lp_grad_fragment", "lp_fragment_address"):
        assert name in _source(tensor_fragment), f"tensor_fragment lost '{name}'; update zero_slices.py"


def test_pinned_version_is_accepted_and_others_refused(monkeypatch) -> None:
    from id3_ds.errors import ID3Error
    from id3_ds.integration.zero_slices import check_deepspeed_version

    check_deepspeed_version()
    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    with pytest.raises(ID3Error, match="not supported"):
        check_deepspeed_version()

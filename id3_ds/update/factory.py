"""The one place that decides which update runs: dense, masked with dense state, or masked with sparse state."""

from __future__ import annotations

from collections.abc import Callable

from id3_ds.algorithm.config import ID3Config
from id3_ds.methods.registry import MethodSpec, method_spec
from id3_ds.plan import RunPlan, fish_with_sparse_state
from id3_ds.update.contract import Update
from id3_ds.update.engine import DenseUpdate
from id3_ds.update.masked import DeepSpeedID3
from id3_ds.update.sparse import SparseDeepSpeedID3


def update_for(
    plan: RunPlan,
    engine,
    config: ID3Config,
    steps: int,
    weight_decay: float,
    *,
    seed: int = 0,
    lr: float = 0.0,
    max_grad_norm: float | None = None,
    make_scheduler: Callable | None = None,
) -> Update:
    """The update the plan says runs, on `engine` (built as integration/ds_config configured it)."""
    method = method_spec(plan.method, seed, config) if plan.masked else None
    return build_update(
        engine, method, config, steps, weight_decay, lr=lr, max_grad_norm=max_grad_norm, make_scheduler=make_scheduler
    )


def build_update(
    engine,
    method: MethodSpec | None,
    config: ID3Config,
    steps: int,
    weight_decay: float,
    *,
    lr: float = 0.0,
    max_grad_norm: float | None = None,
    make_scheduler: Callable | None = None,
) -> Update:
    """`DeepSpeedID3` for a masked method's spec, `DenseUpdate` for a dense method (spec None), and
    `SparseDeepSpeedID3` for a masked method with id3.state=sparse (engine built without an optimizer; lr,
    max_grad_norm and make_scheduler, optimizer -> LR scheduler, are then its own)."""
    if method is None:
        return DenseUpdate(engine)
    if config.state == "sparse":
        if method.fisher is not None:
            raise fish_with_sparse_state()
        return SparseDeepSpeedID3(engine, config, steps, weight_decay, lr, max_grad_norm, make_scheduler, method)
    return DeepSpeedID3(engine, config, steps, weight_decay, method)

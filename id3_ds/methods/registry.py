"""method name -> how the shared mask core is configured for it."""

from __future__ import annotations

from dataclasses import dataclass

from id3_ds.algorithm.config import ID3Config
from id3_ds.algorithm.id3 import Keep, Scorer
from id3_ds.algorithm.variants import variant_scorer
from id3_ds.errors import ID3Error
from id3_ds.methods.scorers import FisherScorer, bitfit_keep, pafi_scorer, random_scorer

STATIC = ("random", "pafi", "fish", "bitfit")
MASKED = ("id3", *STATIC)
DENSE = ("full", "lora")
METHODS = (*MASKED, *DENSE)


@dataclass(frozen=True)
class MethodSpec:
    """Arguments for `ID3` / `from_module` / `DeepSpeedID3`: score, schedule, selectable tensors.

    fisher is set for `fish` only: the caller feeds it sample gradients before step 0 and frees them with
    `fisher.release()` once the first `select()` has chosen the mask (DeepSpeedID3 does both).
    """

    name: str
    scorer: Scorer | None = None
    static: bool = False
    keep: Keep | None = None
    fisher: FisherScorer | None = None


def method_spec(method: str, seed: int = 0, config: ID3Config | None = None) -> MethodSpec:
    """The mask-core configuration of a masked method (ID3 or a static baseline).

    config: the run's id3 section; an ID3 score variant in it (id3.grad_ema, id3.score_norm) becomes
    ID3's scorer. Without one, ID3 has no scorer and scores exactly as the paper does.
    """
    if method == "id3":
        return MethodSpec("id3", scorer=variant_scorer(config) if config is not None else None)
    if method == "random":
        return MethodSpec("random", scorer=random_scorer(seed), static=True)
    if method == "pafi":
        return MethodSpec("pafi", scorer=pafi_scorer, static=True)
    if method == "fish":
        fisher = FisherScorer()
        return MethodSpec("fish", scorer=fisher, static=True, fisher=fisher)
    if method == "bitfit":  # every bias/norm entry when B equals their count; else a uniform subset of them
        return MethodSpec("bitfit", scorer=random_scorer(seed), static=True, keep=bitfit_keep)
    if method in DENSE:
        raise ID3Error(f"method '{method}' trains densely and has no mask; method_spec is for {list(MASKED)}")
    raise ID3Error(f"unknown method '{method}'; choose one of {list(METHODS)}")


def selector_for_module(model, method: str, config, steps: int, seed: int = 0):
    """(ID3 selector, MethodSpec) over a plain torch module, for any masked method.

    For `fish`, feed the Fisher before the first `select()`: after each sample batch's backward call
    `spec.fisher.accumulate(selector.held)` (then zero the gradients); after it, `spec.fisher.release()`.
    """
    from id3_ds.algorithm.id3 import from_module

    spec = method_spec(method, seed, config)
    selector = from_module(model, config, steps, scorer=spec.scorer, static=spec.static, keep=spec.keep)
    return selector, spec

"""Skip two start-up costs DeepSpeed pays in every rank that a run does not need.

1. DeepSpeed's Muon optimizer module (`deepspeed.runtime.zero.muon.original_muon`) decorates three functions
   with `torch.compile` when it is imported, and the ZeRO optimizers import it in their constructors (for an
   `isinstance` check) whatever the optimizer is. `torch.compile(fn)` itself compiles nothing until the first
   call, but it imports torch._dynamo's debugging tools and torch._inductor (~1.3 s of CPU per rank on these
   cores, ~2 s of wall time on loaded ones). `defer_muon_compile` makes DeepSpeed's `compiler.compile()`
   (used only there) wrap each function on its first call instead: a Muon run compiles exactly as before,
   any other run never imports the compiler stack.
2. Each JIT-loaded CPU op asks py-cpuinfo for the CPU's architecture and flags twice (`cpu_arch`,
   `simd_width`); `cpuinfo.get_cpu_info()` starts a Python subprocess that sleeps a full second to measure
   the clock rate, so a rank waits ~1.5 s per call. `memoise_cpu_info` keeps the first answer for the
   process: the CPU does not change under a running process.

`avoid_start_costs()` does both; call it before `deepspeed.init_distributed` (the first op load) and
`deepspeed.initialize` (the Muon import). Both patches are idempotent, and each does nothing when the
DeepSpeed or py-cpuinfo it expects is not there (tests/test_start_costs.py is their canary).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

MUON_MODULE = "deepspeed.runtime.zero.muon.original_muon"
_DEFERRED = "_id3_ds_deferred"  # marks a function this module installed, so a second call is a no-op


def avoid_start_costs() -> list[str]:
    """Apply every patch below; returns the names of those applied now (empty when already applied)."""
    applied = []
    if memoise_cpu_info():
        applied.append("cpu_info")
    if defer_muon_compile():
        applied.append("muon_compile")
    return applied


def memoise_cpu_info() -> bool:
    """Make `cpuinfo.get_cpu_info()` ask once per process; False when already done or py-cpuinfo is absent."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then asks lscpu itself
        return False
    original = cpuinfo.get_cpu_info
    if getattr(original, _DEFERRED, False):
        return False
    answer: dict[str, Any] = {}

    @functools.wraps(original)
    def get_cpu_info() -> dict[str, Any]:
        if not answer:
            answer.update(original())
        return dict(answer)  # a copy: one caller's edit never reaches the next

    setattr(get_cpu_info, _DEFERRED, True)
    cpuinfo.get_cpu_info = get_cpu_info  # DeepSpeed imports it from the module at each call
    return True


def defer_muon_compile() -> bool:
    """Make DeepSpeed's `compiler.compile()` decorator compile each function on its first call.

    False when already done, when DeepSpeed has no `deepspeed.runtime.compiler.compile`, or when the Muon module
    was imported already (its functions are decorated then; patching would change nothing).
    """
    if MUON_MODULE in sys.modules:
        return False
    try:
        from deepspeed.runtime import compiler
    except ImportError:
        return False
    original = getattr(compiler, "compile", None)
    if original is None or getattr(original, _DEFERRED, False):
        return False

    def compile() -> Callable[[Callable], Callable]:  # noqa: A001  (DeepSpeed's name)
        return functools.partial(compile_on_first_call, make=original)

    setattr(compile, _DEFERRED, True)
    compiler.compile = compile
    return True


def compile_on_first_call(fn: Callable, make: Callable[[], Callable[[Callable], Callable]]) -> Callable:
    """`fn` wrapped so that `make()(fn)` (e.g. `torch.compile(fn)`) is built at its first call, then always used."""
    built: list[Callable] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not built:
            built.append(make()(fn))
        return built[0](*args, **kwargs)

    return call

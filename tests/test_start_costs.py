"""id3_ds/integration/start_costs.py: DeepSpeed's Muon compile deferred, py-cpuinfo asked once per process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from id3_ds.integration import start_costs
from id3_ds.integration.start_costs import MUON_MODULE, compile_on_first_call

ROOT = Path(__file__).resolve().parents[1]


def test_compile_on_first_call_builds_once_at_the_first_call() -> None:
    built = []

    def make():
        def compile_(fn):
            built.append(fn)
            return lambda *a, **k: ("compiled", fn(*a, **k))

        return compile_

    def double(x, *, by=2):
        """Doubles."""
        return x * by

    wrapped = compile_on_first_call(double, make)
    assert built == [] and wrapped.__name__ == "double" and wrapped.__doc__ == "Doubles."
    assert wrapped(3) == ("compiled", 6) and wrapped(3, by=3) == ("compiled", 9)
    assert built == [double]  # built once, at the first call


def test_defer_muon_compile_replaces_deepspeeds_decorator_once(monkeypatch) -> None:
    from deepspeed.runtime import compiler

    calls = []
    monkeypatch.setattr(compiler, "compile", lambda: calls.append("compile") or (lambda fn: fn))
    monkeypatch.delitem(sys.modules, MUON_MODULE, raising=False)
    assert start_costs.defer_muon_compile()
    decorate = compiler.compile()
    square = decorate(lambda x: x * x)
    assert calls == []  # decorating no longer reaches torch.compile
    assert square(4) == 16 and square(5) == 25 and calls == ["compile"]
    assert not start_costs.defer_muon_compile()  # already deferred: a no-op


def test_defer_muon_compile_is_a_no_op_once_muon_is_imported(monkeypatch) -> None:
    from deepspeed.runtime import compiler

    before = compiler.compile
    monkeypatch.setitem(sys.modules, MUON_MODULE, object())
    assert not start_costs.defer_muon_compile() and compiler.compile is before


def test_cpu_info_is_asked_once_per_process(monkeypatch) -> None:
    cpuinfo = pytest.importorskip("cpuinfo")
    asked = []
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: asked.append(1) or {"arch": "X86_64", "flags": ["avx2"]})
    assert start_costs.memoise_cpu_info()
    first = cpuinfo.get_cpu_info()
    first["arch"] = "edited by a caller"
    assert cpuinfo.get_cpu_info() == {"arch": "X86_64", "flags": ["avx2"]} and len(asked) == 1
    assert not start_costs.memoise_cpu_info()  # already memoised: a no-op


def test_deepspeeds_muon_module_still_decorates_with_compiler_compile() -> None:
    """The canary: the deferral matters only while Muon's functions carry `@compiler.compile()`."""
    spec = importlib.util.find_spec(MUON_MODULE)
    assert spec is not None and spec.origin, f"{MUON_MODULE} moved: update id3_ds/integration/start_costs.py"
    assert "@compiler.compile()" in Path(spec.origin).read_text()


@pytest.mark.slow
def test_a_zero_optimizer_import_no_longer_loads_torch_inductor() -> None:
    """In a fresh interpreter, as in a rank: the Muon import every ZeRO optimizer makes stays cheap."""
    code = (
        "import sys, deepspeed\n"
        "from id3_ds.integration.start_costs import avoid_start_costs\n"
        "print(sorted(avoid_start_costs()))\n"
        "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam\n"
        "from deepspeed.runtime.zero.muon import original_muon\n"
        "print('torch._inductor.compile_fx' in sys.modules, hasattr(original_muon.muon_update, '__wrapped__'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-3:] == ["['cpu_info', 'muon_compile']", "False True", ""], out.stdout + out.stderr

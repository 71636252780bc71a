"""DeepSpeed's internals are used in id3_ds/integration/ only: the one place to fix when DeepSpeed changes them.

Scans the source (not docstrings or comments) of every other module of id3_ds/ and launch/ for internal
attributes, `getattr`/`hasattr` on their names, and imports of DeepSpeed's internal packages. Public API
(`deepspeed.initialize`, `deepspeed.init_distributed`, `deepspeed.accelerator`, engine methods) is allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INTERNAL_ATTRS = {
    "ds_tensor",
    "ds_shape",
    "ds_numel",
    "ds_id",
    "ds_process_group",
    "GatheredParameters",
    "_config",
    "global_steps",
    "global_samples",
    "_hp_mapping",
    "fp32_partitioned_groups_flat",
    "norm_for_param_grads",
}
INTERNAL_PACKAGES = ("runtime", "checkpoint", "utils", "zero")
INTERNAL_MODULES = tuple(f"deepspeed.{p}" for p in INTERNAL_PACKAGES)


def internal_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each use of a DeepSpeed internal in a parsed module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRS:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2:
            name = node.args[1]
            if node.func.id in ("getattr", "hasattr", "setattr") and isinstance(name, ast.Constant):
                if name.value in INTERNAL_ATTRS:
                    found.append((node.lineno, f"{node.func.id}(..., {name.value!r})"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(INTERNAL_MODULES) or (
                node.module == "deepspeed" and any(a.name in INTERNAL_PACKAGES for a in node.names)
            ):
                found.append((node.lineno, f"from {node.module} import"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.startswith(INTERNAL_MODULES)]
    return found


def outside_integration() -> list[Path]:
    """Every Python file of id3_ds/ and launch/ except those under id3_ds/integration/."""
    integration = ROOT / "id3_ds" / "integration"
    files = [*(ROOT / "id3_ds").rglob("*.py"), *(ROOT / "launch").rglob("*.py")]
    return sorted(f for f in files if not f.is_relative_to(integration))


def test_no_module_outside_integration_uses_deepspeed_internals() -> None:
    files = outside_integration()
    assert any(f.name == "train.py" for f in files) and any(f.parts[-2] == "checkpoint" for f in files)
    bad = [
        f"{f.relative_to(ROOT)}:{line}: {what}"
        for f in files
        for line, what in internal_uses(ast.parse(f.read_text(), str(f)))
    ]
    assert not bad, "DeepSpeed internals outside id3_ds/integration/ (move them behind it):\n" + "\n".join(bad)


def test_the_scan_finds_each_kind_of_internal_use() -> None:
    """The scan itself: every form it must catch is caught, docstrings and public API are not."""
    src = '''
"""Mentions p.ds_tensor and GatheredParameters in a docstring only."""
import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed import zero
import deepspeed.checkpoint.ds_to_universal
n = p.ds_numel
ok = hasattr(p, "ds_id")
engine.global_steps = 0
with deepspeed.zero.GatheredParameters([p]):
    pass
deepspeed.initialize(model=m)
'''
    found = {what for _, what in internal_uses(ast.parse(src))}
    assert found == {
        "from deepspeed.runtime.engine import",
        "from deepspeed import",
        "import deepspeed.checkpoint.ds_to_universal",
        ".ds_numel",
        "hasattr(..., 'ds_id')",
        ".global_steps",
        ".GatheredParameters",
    }

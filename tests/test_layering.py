"""The package's layers: no two files import each other, and no folder imports one that imports it back.

Reads every `import` of id3_ds/ with ast (function-level imports included: a lazy import is still a
dependency; `if TYPE_CHECKING:` blocks left out: annotations only). A folder is a sub-package; a module
directly in id3_ds/ (config.py, plan.py, errors.py, ...) is its own unit. Also: algorithm/ does no file
I/O, and the tests' own machinery does not live in benchmarks/.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "id3_ds"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package's name for its __init__)."""
    out = {}
    for f in (root / PACKAGE).rglob("*.py"):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imported(tree: ast.AST, known: dict[str, Path]) -> set[str]:
    """The package's modules a parsed module imports (`from pkg import submodule` counts as the submodule)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known.keys()
            found.update(subs)
            if len(subs) < len(node.names) and node.module in known:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def unit(name: str, known: dict[str, Path]) -> str:
    """The folder a module belongs to; a module directly in the package is its own unit."""
    parts = name.split(".")
    if known[name].name == "__init__.py" or len(parts) == 2:
        return name
    return ".".join(parts[:-1])


def graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, Path]]:
    known = modules(root)
    edges = {m: imported(ast.parse(f.read_text(), str(f)), known) - {m} for m, f in known.items()}
    return edges, known


def file_cycles(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in edges.items() for b in targets if a < b and a in edges.get(b, ()))


def folder_cycles(edges: dict[str, set[str]], known: dict[str, Path]) -> list[list[str]]:
    """Strongly connected groups of more than one folder (Tarjan), each with an example import per edge."""
    folders: dict[str, set[str]] = {}
    for a, targets in edges.items():
        for b in targets:
            ua, ub = unit(a, known), unit(b, known)
            if ua != ub:
                folders.setdefault(ua, set()).add(ub)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in folders.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(folders):
        if v not in index:
            strongconnect(v)
    return groups


def _why(group: list[str], edges: dict[str, set[str]], known: dict[str, Path]) -> str:
    inside = set(group)
    pairs = [
        f"{a} -> {b}"
        for a, targets in sorted(edges.items())
        for b in sorted(targets)
        if unit(a, known) in inside and unit(b, known) in inside and unit(a, known) != unit(b, known)
    ]
    return f"{' <-> '.join(group)}: " + "; ".join(pairs)


def test_no_two_modules_import_each_other() -> None:
    edges, _ = graph()
    assert not file_cycles(edges), file_cycles(edges)


def test_no_folder_imports_one_that_imports_it_back() -> None:
    edges, known = graph()
    groups = folder_cycles(edges, known)
    assert not groups, "\n".join(_why(g, edges, known) for g in groups)


def test_the_scan_finds_a_two_file_and_a_folder_cycle(tmp_path) -> None:
    """The checks themselves, on a made-up package: each kind of cycle is found, TYPE_CHECKING is not one."""
    pkg = tmp_path / PACKAGE
    files = {
        "__init__.py": "",
        "top.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from id3_ds.low.a import A\n",
        "low/__init__.py": "",
        "low/a.py": "from id3_ds import top\nfrom id3_ds.low import b\n",
        "low/b.py": "def f():\n    from id3_ds.low.a import A\n",
        "high/__init__.py": "",
        "high/c.py": "import id3_ds.low.a\n",
        "low/d.py": "from id3_ds.high.c import C\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    edges, known = graph(tmp_path)
    assert file_cycles(edges) == [("id3_ds.low.a", "id3_ds.low.b")]  # b's lazy import counts
    assert folder_cycles(edges, known) == [["id3_ds.high", "id3_ds.low"]]  # top <- low only: no cycle


def test_algorithm_does_no_file_io() -> None:
    """algorithm/ is pure torch: what reads and writes files lives in checkpoint/ (and files/)."""
    io_modules = ("id3_ds.files", "os", "pathlib", "json", "shutil")
    bad = []
    for f in sorted((ROOT / PACKAGE / "algorithm").glob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            bad += [f"{f.name}: import {n}" for n in names if n.split(".")[0] in io_modules or n in io_modules]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                bad.append(f"{f.name}: open()")
    assert not bad, bad


MACHINERY = ("_launch", "fork_ranks")  # what tests used to borrow from benchmarks/: now id3_ds/runtime/


def test_the_tests_machinery_is_not_borrowed_from_benchmarks() -> None:
    """The fork server and the launch helpers are the package's (id3_ds/runtime/); a benchmark's own test may
    still import that benchmark."""
    bad = []
    for f in sorted((ROOT / "tests").glob("*.py")):
        text = f.read_text()
        bad += [f"{f.name}: benchmarks/{m}.py" for m in MACHINERY if f"benchmarks/{m}" in text]
        for node in ast.walk(ast.parse(text)):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "benchmarks":
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            bad += [f"{f.name}:{node.lineno}: {n}" for n in names if n.split(".")[-1] in MACHINERY]
    assert not bad, bad

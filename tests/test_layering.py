"""The layering of mmfast's own modules (README, "Adding an op"): no import loop, nothing loaded by
a string, the Triton kernels on the ground floor and the float64 oracle apart from the code it checks.

Imports are read from the source (ast), at module level and inside functions (the imports that run
at run time), so a loop closed by a lazy import counts too. Run as a script it prints the graph:

    python tests/test_layering.py [ROOT]     # ROOT: a checkout of mmfast (default: this one)
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "mmfast.kernels"  # kernels/ at the top level, installed under this name (pyproject.toml)
GROUND_FLOOR = {"mmfast.kernel_contract"}  # what the kernels may import besides each other
COMPILED = "mmfast._C"  # the C++ kernels (csrc/), built by setup.py: a module without Python imports
CHECKED_BY_THE_ORACLE = ("mmfast.backends", KERNELS, "mmfast.contrastive_loss", "mmfast.distillation_loss",
                         "mmfast.pooling")  # fmt: skip


def module_files(root: Path) -> dict[str, Path]:
    """Every module of mmfast by its import name: mmfast/**/*.py, and kernels/*.py as mmfast.kernels.*."""
    files = {}
    for path in sorted((root / "mmfast").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((root / "kernels").glob("*.py")):
        files[KERNELS if path.stem == "__init__" else f"{KERNELS}.{path.stem}"] = path
    return files


def _function_level(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside a function body: they run when the function is called."""
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inner


def import_graph(root: Path) -> dict[str, dict[str, str]]:
    """{module: {imported mmfast module: how}}, how being "import", "run time" (inside a function)
    or "by string" (a module path passed as a call argument, as importlib loading takes it)."""
    files = module_files(root)
    known = {*files, COMPILED}
    graph = {COMPILED: {}}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        inner, edges = _function_level(tree), {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                           for alias in node.names]  # fmt: skip
            elif isinstance(node, ast.Call):
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("mmfast."):
                        named = [m for m in files if arg.value == m or arg.value.startswith(m + ".")]
                        if named and max(named, key=len) != name:
                            edges[max(named, key=len)] = "by string"
                continue
            else:
                continue
            for target in targets:
                if target in known and target != name:
                    edges.setdefault(target, "run time" if id(node) in inner else "import")
        graph[name] = dict(sorted(edges.items()))
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Every import loop, as the modules of one strongly connected component (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_loop_at_import_time_or_at_run_time():
    loops = cycles(import_graph(ROOT))
    assert not loops, f"import loops among mmfast's modules: {loops}"


def test_nothing_is_loaded_by_a_string():
    graph = import_graph(ROOT)
    by_string = {m: [t for t, how in edges.items() if how == "by string"] for m, edges in graph.items()}
    assert not {m: t for m, t in by_string.items() if t}, by_string
    for name, path in module_files(ROOT).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                assert called not in ("import_module", "__import__"), f"{name} loads a module by name"


def test_the_kernels_stand_on_the_ground_floor():
    for name, edges in import_graph(ROOT).items():
        if name == KERNELS or name.startswith(KERNELS + "."):
            above = [t for t in edges if t not in GROUND_FLOOR and not t.startswith(KERNELS)]
            assert not above, f"{name} imports {above}: the Triton kernels may import only {sorted(GROUND_FLOOR)}"


def test_the_oracle_stands_apart():
    """The code the reference checks never imports it, and it imports none of that code."""
    for name, edges in import_graph(ROOT).items():
        in_reference = name.startswith("mmfast.reference")
        for target in edges:
            if in_reference:
                assert not target.startswith(CHECKED_BY_THE_ORACLE), f"the oracle {name} imports {target}"
            elif name.startswith(("mmfast.backends", KERNELS)):
                assert not target.startswith("mmfast.reference"), f"{name} imports the oracle {target}"


# Imports each kernel module with sys.modules clean of mmfast and without running mmfast/__init__.py
# (which imports the whole API): the mmfast modules loaded afterwards are what the kernel module
# itself pulls in, directly or not.
LOADED_BY_EACH = r"""
import importlib, importlib.util, json, sys
loaded = {}
for name in json.loads(sys.argv[1]):
    for key in [k for k in sys.modules if k == "mmfast" or k.startswith("mmfast.")]:
        del sys.modules[key]
    sys.modules["mmfast"] = importlib.util.module_from_spec(importlib.util.find_spec("mmfast"))
    importlib.import_module(name)
    loaded[name] = sorted(k for k in sys.modules if k.startswith("mmfast."))
print(json.dumps(loaded))
"""


def test_importing_each_kernel_module_loads_nothing_of_mmfast_backends():
    pytest.importorskip("triton")
    names = [m for m in module_files(ROOT) if m == KERNELS or m.startswith(KERNELS + ".")]
    run = subprocess.run([sys.executable, "-c", LOADED_BY_EACH, json.dumps(names)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout)
    assert sorted(loaded) == sorted(names)
    for name, modules in loaded.items():
        assert not [m for m in modules if m.startswith("mmfast.backends")], f"{name} loads {modules}"
        above = [m for m in modules if m not in GROUND_FLOOR and not m.startswith(KERNELS)]
        assert not above, f"importing {name} loads {above}"


if __name__ == "__main__":
    graph = import_graph(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    for module, edges in graph.items():
        print(f"{module:34s} -> " + (", ".join(t + ("" if how == "import" else f" ({how})") for t, how in edges.items())
                                     or "-"))  # fmt: skip
    print("import loops:", cycles(graph) or "none")

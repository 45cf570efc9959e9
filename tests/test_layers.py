"""The package's shape: one-way layers (import-linter's contracts in pyproject.toml, and an
independent walk of every import), a training loop that reads top to bottom, short functions, and
one source for each vocabulary (method presets)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adaptercli"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every adaptercli module ``name`` imports: module level, inside functions and under
    ``TYPE_CHECKING`` alike. ``from pkg import sub`` counts as importing ``pkg.sub``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                targets.add(sub if sub in modules else module)
    return {t for t in targets if t in modules and t != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere_in_the_package() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert len(graph) >= 40 and sum(map(len, graph.values())) > 150  # the walk sees the package
    assert _cycles(graph) == []
    # The public API (adaptercli/__init__.py) is the top: nothing inside imports it.
    assert [name for name, targets in graph.items() if "adaptercli" in targets and name != "adaptercli"] == []


def test_the_walk_finds_a_circle_behind_a_lazy_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    modules = {"adaptercli.methods.lora": Path("x"), "adaptercli.model": Path("y")}
    source = "def f():\n    from ..model import AdapterModel\n"
    path = ROOT / "tests" / "__lazy_probe__.py"
    try:
        path.write_text(source)
        assert _imports("adaptercli.methods.lora", path, modules) == {"adaptercli.model"}
    finally:
        path.unlink()


def test_import_linter_keeps_every_layers_contract() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is not installed (the dev extra has import-linter; run make install)")
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def _function_lengths() -> dict[str, int]:
    lengths = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_no_library_function_is_over_80_lines_and_train_py_stays_short() -> None:
    lengths = _function_lengths()
    assert len(lengths) > 500
    assert {where: n for where, n in lengths.items() if n > 80} == {}
    assert len((PACKAGE / "train.py").read_text().splitlines()) <= 400


def test_the_training_loop_is_one_function_without_closures() -> None:
    tree = ast.parse((PACKAGE / "train.py").read_text())
    loop = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_train_loop")
    assert loop.end_lineno - loop.lineno + 1 <= 100
    assert [n.name for n in ast.walk(loop) if isinstance(n, ast.FunctionDef) and n is not loop] == []
    assert not any(isinstance(n, ast.Nonlocal) for n in ast.walk(loop))


def test_method_presets_in_configs_agree_with_the_registry() -> None:
    from adaptercli.methods import METHODS, method_name, resolve_config

    folder = ROOT / "configs" / "method"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(METHODS)
    for path in folder.glob("*.yaml"):
        adapter = yaml.safe_load(path.read_text())["adapter"]
        assert adapter["method"] == path.stem, path
        config = resolve_config({"method": adapter["method"], **(adapter.get("config") or {})})
        assert method_name(config) == path.stem
        assert config.to_dict() == METHODS[path.stem].make_config().to_dict(), path

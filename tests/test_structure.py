"""The package's shape, checked: no import cycle, model.py depends on nothing of ours but errors (it reads
like nanoGPT's), and no function is longer than a screen."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nanogpt"
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def nanogpt_imports(tree: ast.AST, top_level_only: bool) -> set[str]:
    """The nanogpt modules a module imports (at its top level only, or anywhere)."""
    nodes = ast.iter_child_nodes(tree) if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanogpt"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("nanogpt")}
    return found


@functools.cache  # parsed once for all the tests below
def parsed_modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in PACKAGE.rglob("*.py")}


def test_no_import_cycle():
    """Depth-first search over top-level imports: a module met again while still on the path is a cycle."""
    modules = parsed_modules()
    graph = {name: {m for m in nanogpt_imports(tree, True) if m in modules} for name, tree in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                pytest.fail(f"import cycle: {' -> '.join(path[path.index(dep) :] + [dep])}")
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_a_cycle_is_detected(monkeypatch):
    """The search above fails on a cycle (a test of the test)."""
    fake = {"nanogpt.a": ast.parse("from nanogpt.b import x"), "nanogpt.b": ast.parse("import nanogpt.a")}
    monkeypatch.setitem(globals(), "parsed_modules", lambda: fake)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()


def test_model_imports_only_errors():
    """Only errors at the top; the one lazy import is GPT-2's weights (transformers is optional)."""
    tree = parsed_modules()["nanogpt.model"]
    assert nanogpt_imports(tree, True) == {"nanogpt.errors"}
    assert nanogpt_imports(tree, False) == {"nanogpt.errors", "nanogpt.hf"}


def test_no_function_is_longer_than_a_screen():
    long = [
        f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in parsed_modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"

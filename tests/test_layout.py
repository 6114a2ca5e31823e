"""The layout's rules, read from the source: three layers that import one way (platform <- jobs <-
lessons <- functions and CLI), no import circle in common/ (function-level imports included), and a
function-level import only where a heavy module loads lazily on purpose, said in a comment."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

LAYERS = {"common.platform": 0, "common.jobs": 1, "common.lessons": 2, "common.cli": 3, "common.dashboard": 3}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / "common").rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function) for every import of `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from common.jobs import queries` imports the submodule common.jobs.queries
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            ]
        else:
            continue
        found += [(t, node.lineno, id(node) in inside) for t in targets if t in modules]
    return found


def _layer(module: str) -> int | None:
    return next(
        (rank for prefix, rank in LAYERS.items() if module == prefix or module.startswith(prefix + ".")), None
    )


def test_layers_import_only_downwards() -> None:
    modules = _modules()
    upward = [
        f"{name} -> {target} (line {line})"
        for name, path in modules.items()
        for target, line, _ in _imports(path, modules)
        if (mine := _layer(name)) is not None and (theirs := _layer(target)) is not None and theirs > mine
    ]
    assert upward == []


def test_no_import_circle_in_common_counting_function_level_imports() -> None:
    modules = _modules()
    graph = {name: {t for t, _, _ in _imports(path, modules) if t != name} for name, path in modules.items()}
    circles = []
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_function_level_imports_are_lazy_loads_that_say_so() -> None:
    unexplained = []
    for path in sorted((ROOT / "common").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    # The comment sits above the import (or above the first of a group of imports).
                    above = lines[max(0, node.lineno - 4) : node.lineno - 1]
                    if not any(line.strip().startswith("#") and "azil" in line for line in above):
                        unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert unexplained == []


def test_the_tree_says_where_things_live() -> None:
    expected = [
        "common/platform/db/pool.py",
        "common/platform/db/connect.py",
        "common/platform/db/migrate.py",
        "common/jobs/model.py",
        "common/jobs/queries.py",
        "common/jobs/kinds.py",
        "common/jobs/dispatch/cloud_tasks.py",
        "common/jobs/dispatch/local_http.py",
        "common/lessons/generation.py",
        "common/lessons/archive/queries.py",
    ]
    assert [p for p in expected if not (ROOT / p).is_file()] == []
    assert "_CLAIM" in (ROOT / "common/jobs/queries.py").read_text()
    assert "class LessonRequest" in (ROOT / "common/lessons/generation.py").read_text()
    assert "CloudTasksClient" in (ROOT / "common/jobs/dispatch/cloud_tasks.py").read_text()

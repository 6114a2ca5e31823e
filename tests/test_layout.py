"""The layout's rules, read from the source: layers that import one way (platform <- jobs <- models
<- accounts <- lessons <- functions, CLI and dashboard), no import circle in common/ (function-level imports
included), a function-level import only where a heavy module loads lazily on purpose, said in a
comment; and the same rules for the SQL: each table has one owning package, only that package
writes it (only the job layer's transitions module writes `jobs`), and no layer reads a table of a
layer above it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.support import ROOT

LAYERS = {
    "common.platform": 0,
    "common.jobs": 1,
    "common.models": 2,
    "common.accounts": 3,
    "common.lessons": 4,
    "common.cli": 5,
    "common.dashboard": 5,
}
# Every table of the schema, and the package that owns it (the only one that writes it).
OWNERS = {
    "jobs": "common.jobs",
    "job_attempts": "common.jobs",
    "job_pruned_totals": "common.jobs",
    "model_lanes": "common.models",
    "model_calls": "common.models",
    "users": "common.accounts",
    "quota_grants": "common.accounts",
    "lessons": "common.lessons",
    "job_done_totals": "common.jobs",
    "job_done_mark": "common.jobs",
    "dashboard_secret": "common.dashboard",
}
TRANSITIONS = "common.jobs.transitions"


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
        "common/jobs/transitions.py",
        "common/accounts/tiers.py",
        "common/jobs/kinds.py",
        "common/jobs/dispatch/cloud_tasks.py",
        "common/jobs/dispatch/local_http.py",
        "common/lessons/generation.py",
        "common/lessons/archive/queries.py",
    ]
    assert [p for p in expected if not (ROOT / p).is_file()] == []
    assert "_CLAIM" in (ROOT / "common/jobs/transitions.py").read_text()
    assert "class LessonRequest" in (ROOT / "common/lessons/generation.py").read_text()
    assert "CloudTasksClient" in (ROOT / "common/jobs/dispatch/cloud_tasks.py").read_text()


# --- the SQL --------------------------------------------------------------------------------------

_WRITE = re.compile(r"\b(?:UPDATE|INSERT INTO|DELETE FROM)\s+(\w+)")
_READ = re.compile(r"\b(?:FROM|JOIN)\s+(\w+)")


def _sql_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal of a module, f-strings' literal parts joined; SQL
    keywords are upper case in this code base, prose is not."""
    texts = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_fstrings = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_fstrings:
            texts.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            parts = [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            texts.append((node.lineno, " ? ".join(parts)))
    return [(line, " ".join(text.split())) for line, text in texts]


def _statements() -> list[tuple[str, int, str, str]]:
    """(module, line, "write" | "read", table) for each table a module's SQL names."""
    found = []
    for name, path in _modules().items():
        texts = _sql_texts(path)
        beside = path.with_suffix(".sql")  # a module's SQL may live in a file beside it
        if beside.is_file():
            texts += list(enumerate(beside.read_text(encoding="utf-8").splitlines(), start=1))
        for line, text in texts:
            found += [(name, line, "write", t) for t in _WRITE.findall(text) if t in OWNERS]
            found += [(name, line, "read", t) for t in _READ.findall(text) if t in OWNERS]
    return found


def _owner(module: str) -> str:
    return next(prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + "."))


def test_every_sql_file_belongs_to_a_module() -> None:
    assert [p for p in (ROOT / "common").rglob("*.sql") if not p.with_suffix(".py").is_file()] == []


def test_every_table_of_the_schema_has_an_owner() -> None:
    created = set()
    for path in (ROOT / "migrations" / "versions").glob("*.py"):
        created |= set(re.findall(r"CREATE TABLE (\w+)", path.read_text(encoding="utf-8")))
    assert created == set(OWNERS)


def test_only_the_transitions_module_writes_jobs_and_each_table_only_its_owner() -> None:
    writes = [(m, line, t) for m, line, how, t in _statements() if how == "write"]
    assert any(m == TRANSITIONS and t == "jobs" for m, _, t in writes)  # the rule reads real SQL
    wrong = [
        f"{m}:{line} writes {t}"
        for m, line, t in writes
        if (t == "jobs" and m != TRANSITIONS) or _owner(m) != OWNERS[t]
    ]
    assert wrong == []


def test_no_layer_reads_a_table_of_a_layer_above_it() -> None:
    reads = [(m, line, t) for m, line, how, t in _statements() if how == "read"]
    assert any(t == "lessons" for _, _, t in reads)
    upward = [
        f"{m}:{line} reads {t} (owned by {OWNERS[t]})"
        for m, line, t in reads
        if LAYERS[OWNERS[t]] > LAYERS[_owner(m)]
    ]
    assert upward == []


def test_the_sql_rules_catch_a_violation(tmp_path: Path) -> None:
    """The detector itself: the leak the job-life issue found (the job layer reading lessons, the
    lesson layer writing jobs) is seen."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        'A = "SELECT EXISTS (SELECT 1 FROM lessons WHERE job_id = :id)"\n'
        "B = f'UPDATE jobs SET status = {1} WHERE id = :id'\n"
    )
    texts = " ".join(text for _, text in _sql_texts(bad))
    assert _READ.findall(texts) == ["lessons"] and _WRITE.findall(texts) == ["jobs"]


def test_no_module_in_common_is_over_400_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in sorted((ROOT / "common").rglob("*.py"))
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert long == {}

"""The docs name only what exists: README.md and docs/*.md are read for `common.*` modules and
attributes, repository paths, links, `make` targets and `python -m` modules, and every name that
does not resolve is reported with its file and line.

What is checked:
- `common.x.y` and `common.x:y` anywhere in the text: imported (importlib) and looked up (getattr).
- `mod.attr` in code (inline spans and fenced blocks) whose first parts name a module of `common/`
  by its last parts (`queries.finish_section`, `lessons.queries.x`): one such module must have it.
- paths whose first segment is a top-level entry of the repository (`common/jobs/kinds.py`,
  `tests/test_faults_*.py`, `functions/<name>/main.py` as a pattern), relative to the root; bare
  file names in code (`kinds.py`) must be some file's name; links must stay in the repository and
  resolve from the linking file.
- `make <target>` in code: a rule of the Makefile. `python -m <module>` in code: importable.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

from tests.support import ROOT

# Paths the docs may name before they exist (a page written on another branch at the same time);
# once one exists, `test_pending_paths_are_still_pending` fails until it is taken off this list.
PENDING: set[str] = set()

FILE_SUFFIXES = ("py", "md", "txt", "yaml", "yml", "toml", "sh", "lua", "ini", "cfg", "mako", "png")


@dataclass(frozen=True)
class Doc:
    path: Path
    text: str

    @property
    def name(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    def where(self, offset: int) -> str:
        return f"{self.name}:{self.text.count(chr(10), 0, offset) + 1}"

    def code(self) -> Iterator[tuple[int, str]]:
        """(offset, text) of every fenced block and inline code span."""
        fences = list(re.finditer(r"^```[^\n]*\n(.*?)^```", self.text, re.M | re.S))
        for fence in fences:
            yield fence.start(1), fence.group(1)
        prose = self.text
        for fence in fences:  # blank the fences out, keeping offsets
            prose = prose[: fence.start()] + " " * (fence.end() - fence.start()) + prose[fence.end() :]
        for span in re.finditer(r"`([^`]+)`", prose):
            yield span.start(1), span.group(1)


def _docs() -> list[Doc]:
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [Doc(p, p.read_text(encoding="utf-8")) for p in paths]


# --- resolving names --------------------------------------------------------------------------------


def _import(name: str) -> ModuleType | None:
    """The module `name`, or None when there is no such module (a broken one raises)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            return None
        raise


def _lookup(obj: object, attrs: list[str]) -> bool:
    for attr in attrs:
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


def resolve_absolute(name: str) -> str | None:
    """Why `common.a.b[:c.d]` does not resolve, or None when it does."""
    dotted, _, after = name.partition(":")
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = _import(".".join(parts[:i]))
        if module is not None:
            rest = parts[i:] + (after.split(".") if after else [])
            if _lookup(module, rest):
                return None
            return f"module {module.__name__} has no {'.'.join(rest)}"
    return "no such module"


@cache
def _our_modules() -> tuple[str, ...]:
    names = []
    for path in sorted((ROOT / "common").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return tuple(names)


@cache
def _tables() -> frozenset[str]:
    sql = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "migrations").rglob("*.py"))
    return frozenset(re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", sql, re.I))


def resolve_relative(name: str) -> str | None:
    """Why `queries.finish_section` does not resolve against the modules of common/ it may mean
    (those whose name ends with its leading parts), or None when it does or names none of ours.
    `table.column` (`lessons.job_id`) is a column, not a module's attribute."""
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in _tables():
        return None
    for k in range(len(parts) - 1, 0, -1):
        suffix = "." + ".".join(parts[:k])
        candidates = [m for m in _our_modules() if m.endswith(suffix)]
        if candidates:
            if any(_lookup(importlib.import_module(m), parts[k:]) for m in candidates):
                return None
            return f"none of {', '.join(candidates)} has {'.'.join(parts[k:])}"
    return None


_SKIP = {".git", ".venv", ".venv-tasks-emulator", ".tools", ".dev", "build", "node_modules", "__pycache__"}
_SKIP |= {".mypy_cache", ".pytest_cache", ".ruff_cache"}


@cache
def _files() -> tuple[str, ...]:
    """The repository's files: the tracked ones when git can say, else what is on disk."""
    try:
        return tuple(
            subprocess.run(
                ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
            ).stdout.splitlines()
        )
    except (OSError, subprocess.SubprocessError):
        found = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in _SKIP]
            found += [(Path(folder) / n).relative_to(ROOT).as_posix() for n in names if n not in _SKIP]
        return tuple(found)


@cache
def _top_level() -> frozenset[str]:
    return frozenset(p.split("/")[0] for p in _files())


@cache
def _file_names() -> frozenset[str]:
    return frozenset(p.rsplit("/", 1)[-1] for p in _files())


def path_exists(path: str) -> bool:
    if path.rstrip("/") in PENDING:
        return True
    pattern = re.sub(r"<[^>]*>", "*", path).rstrip("/")
    if "*" in pattern:
        return any(True for _ in ROOT.glob(pattern))
    return (ROOT / pattern).exists()


@cache
def make_targets() -> frozenset[str]:
    targets: set[str] = set()
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        rule = re.match(r"^([A-Za-z0-9_.-]+(?:[ \t]+[A-Za-z0-9_.-]+)*)[ \t]*:(?!=)", line)
        if rule:
            targets.update(rule.group(1).split())
    return frozenset(targets - {".PHONY"})


# --- finding names ----------------------------------------------------------------------------------

ABSOLUTE = re.compile(r"(?<![\w.])common(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)?")
DOTTED = re.compile(r"(?<![\w./:-])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"(?<![\w./:@<>*-])(?:[\w.*<>-]+/)+[\w.*<>-]*")
BARE_FILE = re.compile(rf"(?<![\w./:@<>*-])[\w-]+(?:\.[\w-]+)*\.(?:{'|'.join(FILE_SUFFIXES)})(?![\w/])")
GCLOUD_PROPERTY = re.compile(r"gcloud config (?:get-value|set|unset)\s+$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MAKE = re.compile(r"(?<![\w.-])make((?:[ \t]+[^\s#;&|)`']+)+)")
PYTHON_M = re.compile(r"(?<![\w.-])-m[ \t]+([A-Za-z_][\w.]*)")


def problems(doc: Doc) -> list[str]:
    """Every name in `doc` that does not resolve, as `file:line: what`."""
    found: list[str] = []

    def report(offset: int, what: str) -> None:
        found.append(f"{doc.where(offset)}: {what}")

    for m in ABSOLUTE.finditer(doc.text):
        why = resolve_absolute(m.group())
        if why:
            report(m.start(), f"`{m.group()}`: {why}")

    for m in PATH.finditer(doc.text):
        path = m.group().rstrip(".")
        if GCLOUD_PROPERTY.search(doc.text, max(0, m.start() - 60), m.start()):
            continue  # `gcloud config get-value functions/region` names a gcloud property
        if path.split("/")[0] in _top_level() and not path_exists(path):
            report(m.start(), f"path `{path}` does not exist in the repository")

    for m in LINK.finditer(doc.text):
        target = m.group(1)
        if re.match(r"[A-Za-z][\w+.-]*:", target) or target.startswith("//"):
            report(m.start(1), f"link `{target}` leaves the repository")
            continue
        local = target.split("#")[0]
        if local:
            resolved = (doc.path.parent / local).resolve()
            if not resolved.is_relative_to(ROOT):
                report(m.start(1), f"link `{target}` leaves the repository")
            elif not path_exists(resolved.relative_to(ROOT).as_posix()):
                report(m.start(1), f"link `{target}` points at nothing")

    for offset, code in doc.code():
        for m in DOTTED.finditer(code):
            name = m.group()
            if name.startswith("common.") or name.rsplit(".", 1)[-1] in FILE_SUFFIXES:
                continue
            why = resolve_relative(name)
            if why:
                report(offset + m.start(), f"`{name}`: {why}")
        for m in BARE_FILE.finditer(code):
            if m.group() not in _file_names():
                report(offset + m.start(), f"file `{m.group()}` is no file's name in the repository")
        for m in MAKE.finditer(code):
            words = [w for w in m.group(1).split() if "=" not in w and not w.startswith("-")]
            if words and re.fullmatch(r"[A-Za-z][\w.-]*", words[0]) and words[0] not in make_targets():
                report(offset + m.start(), f"`make {words[0]}`: no such target in the Makefile")
        for m in PYTHON_M.finditer(code):
            module = m.group(1).rstrip(".")
            try:
                spec = importlib.util.find_spec(module)
            except ModuleNotFoundError:  # a parent package is missing
                spec = None
            if spec is None:
                report(offset + m.start(), f"`-m {module}`: no such module")
    return sorted(set(found), key=lambda line: (line.split(":")[0], int(line.split(":")[1])))


# --- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", _docs(), ids=lambda d: d.name)
def test_the_docs_name_only_what_exists(doc: Doc) -> None:
    found = problems(doc)
    assert not found, "names that do not resolve:\n" + "\n".join(found)


def test_the_readme_is_a_newcomers_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move details into docs/"


def test_pending_paths_are_still_pending() -> None:
    arrived = sorted(p for p in PENDING if (ROOT / p).exists())
    assert not arrived, f"{arrived} exist now: take them off PENDING in tests/test_docs.py"


def test_the_check_reports_each_stale_name_with_its_line(tmp_path: Path) -> None:
    text = "\n".join(
        [
            "# A stale page",
            "Pages read `queries.section_jobs` and `common.jobs.queries.nothing_here`.",
            "The registry is `common/jobs/registry.py`, see [the design](../DESIGN.md).",
            "Run `make deploy`, then `python -m common.nothing`, `python -m devtools.nope.deeper`.",
            "Fine: `common.jobs.ops`, `common.platform.errors.DylenError`, `common/jobs/kinds.py`,",
            "`common.lessons.template:generate_lesson`, `make run`, `functions/<name>/main.py`, `json.loads`.",
            "Outside: [docs](https://example.com/).",
        ]
    )
    found = problems(Doc(ROOT / "docs" / "STALE.md", text))
    assert [line.split(": ", 1)[0] for line in found] == [
        "docs/STALE.md:2",
        "docs/STALE.md:2",
        "docs/STALE.md:3",
        "docs/STALE.md:3",
        "docs/STALE.md:4",
        "docs/STALE.md:4",
        "docs/STALE.md:4",
        "docs/STALE.md:4",
        "docs/STALE.md:7",
    ], found
    joined = "\n".join(found)
    for name in (
        "queries.section_jobs",
        "nothing_here",
        "common/jobs/registry.py",
        "../DESIGN.md",
        "make deploy",
        "common.nothing",
        "devtools.nope.deeper",
        "https://example.com/",
    ):
        assert name in joined, (name, found)

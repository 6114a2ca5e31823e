"""No code of ours reaches into a library's private names (anything starting with `_`).

A private name can move in any release, and the first version's database layer desynced pooled
connections through pg8000's. This reads the source of common/ and functions/ and flags every
attribute with a leading underscore that is read from anything but `self` or `cls`, every private
name imported, and every getattr/setattr/hasattr of one: so it holds for every library, pg8000
included, without a list of names to avoid.
"""

from __future__ import annotations

import ast

from tests.support import ROOT

ACCESSORS = {"getattr", "setattr", "hasattr", "delattr"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom):
            module_private = any(_private(part) for part in (node.module or "").split("."))
            names = [alias.name for alias in node.names if _private(alias.name)]
            if module_private or names:
                found.append(f"{node.lineno}: from {node.module} import {', '.join(names) or '...'}")
        elif isinstance(node, ast.Import):
            found += [
                f"{node.lineno}: import {a.name}" for a in node.names if any(map(_private, a.name.split(".")))
            ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ACCESSORS
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
        ):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_checker_finds_what_it_is_for() -> None:
    sample = (
        "import pg8000.core\n"
        "from pg8000.core import _flush\n"
        "con._usock.settimeout(1)\n"
        "getattr(con, '_in_transaction')\n"
        "self._record.con\n"
        "row.__class__\n"
    )
    assert sorted(line.split(":")[0] for line in private_uses(sample)) == ["2", "3", "4"]


def test_no_private_names_in_the_product() -> None:
    offenders = {
        str(path.relative_to(ROOT)): uses
        for folder in ("common", "functions")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (uses := private_uses(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}

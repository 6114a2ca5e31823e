"""SQL kept in a `.sql` file beside the module it serves: one statement per `-- name: x` block."""

from __future__ import annotations

import re
from pathlib import Path

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def named_sql(path: Path, **fragments: str) -> dict[str, str]:
    """name -> statement text of each block, its comment lines dropped and `{fragment}`s filled in
    (plain replacement: SQL's own braces, jsonb paths say, stay as they are). Read at import, once;
    a placeholder left unfilled is an error then, not a statement PostgreSQL refuses later."""
    text = path.read_text(encoding="utf-8")
    parts = _NAME.split(text)[1:]
    statements: dict[str, str] = {}
    for name, body in zip(parts[::2], parts[1::2], strict=True):
        sql = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("--")).strip()
        for key, value in fragments.items():
            sql = sql.replace("{" + key + "}", value)
        if left := re.findall(r"\{(\w+)\}", sql):
            raise ValueError(f"{path.name}: {name} has unfilled placeholders {left}")
        if name in statements:
            raise ValueError(f"{path.name}: {name} is named twice")
        statements[name] = sql
    return statements

"""What the pool runs and hands back: `Statement` (fixed SQL with `:name` parameters), `Result`,
`jsonb` for jsonb parameters, `QueryError`, and the reading of the driver's errors (SQLSTATE, message,
"is this a lost connection?") that the pool decides by.
"""

from __future__ import annotations

import json
from collections import namedtuple
from collections.abc import Iterator
from typing import Any

from common.platform.db.connect import driver

# SQLSTATE classes 08 (connection exception) and 57P (the server is shutting down or terminated the
# session: restart, failover, pg_terminate_backend).
_DISCONNECT_SQLSTATES = ("57P01", "57P02", "57P03")


class Result:
    """Rows (named tuples: attribute access by column name) and the count of rows written."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def all(self) -> list[Any]:
        return list(self._rows)

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise LookupError(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def scalar(self) -> Any:
        """The first column of the first row, or None when there is no row."""
        return self._rows[0][0] if self._rows else None

    def value(self) -> Any:
        """The first column of the only row (LookupError unless exactly one row came back)."""
        return self.one()[0]


class Statement:
    """Fixed SQL with `:name` parameters. Parameters are sent as text and typed by the server from
    their context, so one whose type the context does not fix needs a CAST in the SQL.

    Statements of the hot path are declared with `prepare=True` at module level: prepared once per
    pooled connection, then executed by name in one exchange. Others are parsed on every execution
    (three exchanges: Parse, Describe, Bind/Execute), which is fine for SQL run now and then.
    """

    __slots__ = ("_make_args", "_numbered", "_row_types", "prepare", "sql")

    def __init__(self, sql: str, *, prepare: bool = False) -> None:
        self.sql = sql
        self.prepare = prepare
        self._numbered: str | None = None
        self._make_args: Any = None
        self._row_types: dict[tuple[str, ...], Any] = {}

    def compiled(self) -> tuple[str, Any]:
        if self._numbered is None:
            # Lazily, like the driver (connect.driver): nothing of pg8000 loads at cold start.
            from pg8000.native import to_statement

            self._numbered, self._make_args = to_statement(self.sql)
        return self._numbered, self._make_args

    def result(self, context: Any) -> Result:
        rows = context.rows
        if not rows:
            return Result([], context.row_count)
        names = tuple(column["name"] for column in context.columns)
        row_type: Any = self._row_types.get(names)
        if row_type is None:
            row_type = self._row_types[names] = namedtuple("Row", names, rename=True)
        return Result([row_type(*row) for row in rows], context.row_count)


# Built once: json.dumps(..., ensure_ascii=False) builds an encoder per call.
_JSONB = json.JSONEncoder(ensure_ascii=False)


def jsonb(value: Any) -> str | None:
    """A value for a `CAST(:x AS jsonb)` parameter."""
    return None if value is None else _JSONB.encode(value)


class QueryError(Exception):
    """The database refused a statement (not a lost connection: that is DatabaseUnavailable)."""

    def __init__(self, error: Exception, sql: str, *, where: str | None = None) -> None:
        self.orig = error
        self.where = where  # set when connecting failed: which server refused us
        detail = error.args[0] if error.args else {}
        self.sqlstate = str(detail.get("C", "")) if isinstance(detail, dict) else ""
        message = detail.get("M", str(error)) if isinstance(detail, dict) else str(error)
        super().__init__(f"{message} (SQLSTATE {self.sqlstate or '?'})\n[SQL: {' '.join(sql.split())[:500]}]")

    @property
    def unique_violation(self) -> bool:
        return self.sqlstate == "23505"


def sqlstate(error: BaseException | None) -> str:
    """The SQLSTATE of a server's error as pg8000 raises it, or "" for any other exception."""
    args = getattr(error, "args", ())
    if args and isinstance(args[0], dict):
        return str(args[0].get("C", ""))
    return ""


def error_message(error: BaseException) -> str:
    args = getattr(error, "args", ())
    if args and isinstance(args[0], dict):
        return str(args[0].get("M", ""))
    return str(error)


def is_disconnect(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, OSError)):
        return True
    if isinstance(error, driver().InterfaceError):
        return True
    code = sqlstate(error)
    return code in _DISCONNECT_SQLSTATES or code.startswith("08")

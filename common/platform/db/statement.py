"""What the pool runs and hands back: `Statement` (fixed SQL with `:name` parameters), `Result`,
`jsonb` for jsonb parameters, the reader of timestamptz values, `QueryError`, the reading of the
driver's errors (SQLSTATE, message, "is this a lost connection?") that the pool decides by, and
`PreparedStatements`, the prepared forms one connection holds.

A prepared statement is identified by its SQL text, not by the Statement object that carries it, so
SQL built into a new Statement on every call still meets the one form prepared for it; and each
connection holds at most PREPARED_PER_CONNECTION of them, closing the least recently used on the
server, so no pattern of calls grows a session without bound.
"""

from __future__ import annotations

import json
from collections import OrderedDict, namedtuple
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from common.platform.db.connect import driver

# SQLSTATE classes 08 (connection exception) and 57P (the server is shutting down or terminated the
# session: restart, failover, pg_terminate_backend).
_DISCONNECT_SQLSTATES = ("57P01", "57P02", "57P03")
# After these a prepared statement must be prepared again: 26000 it no longer exists (the session
# was reset), 0A000 "cached plan must not change result type" (a migration altered a table).
_STALE_STATEMENT_SQLSTATES = ("26000", "0A000")
# Far above what the hot path declares: the bound only bites SQL built per call.
PREPARED_PER_CONNECTION = 128


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


def read_timestamptz(data: str) -> Any:
    """pg8000 parses timestamptz with strptime, the largest single cost of reading a job row;
    PostgreSQL's ISO output is what datetime.fromisoformat reads natively. The rare values it does
    not (infinity, BC dates, years past 9999) go to pg8000's own parser."""
    try:
        return datetime.fromisoformat(data)
    except ValueError:
        # Lazily, like the driver (connect.driver): nothing of pg8000 loads at cold start.
        from pg8000.converters import timestamptz_in

        return timestamptz_in(data)


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


class PreparedStatements:
    """The statements one driver connection holds prepared: SQL text -> (name, columns, input
    functions), least recently used first. Preparing one past `limit` first closes the least recently
    used on the server (one round trip), so the server holds exactly what this holds.

    Each method runs inside one exchange of the pool: every driver call here reads its reply up to
    ReadyForQuery before it returns or raises the server's refusal, so the exchange ends clean."""

    __slots__ = ("_con", "_forms", "limit")

    def __init__(self, con: Any, limit: int = PREPARED_PER_CONNECTION) -> None:
        self._con = con
        self.limit = limit
        self._forms: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._forms)

    def run(self, statement: Statement, params: tuple[Any, ...], in_transaction: bool) -> Any:
        """Execute `statement` by name (prepared first if this connection has not), with `params`
        already converted by the driver."""
        sql = statement.sql
        form = self._forms.get(sql)
        if form is None:
            form = self._prepare(statement)
        else:
            self._forms.move_to_end(sql)
        try:
            return self._con.execute_named(form[0], params, form[1], form[2], sql)
        except driver().DatabaseError as error:
            if sqlstate(error) not in _STALE_STATEMENT_SQLSTATES:
                raise
            # After 0A000 the old form is still on the server; after 26000 it is gone, and closing
            # a statement that does not exist is no error. Both work in an aborted transaction.
            self._close(sql)
            if in_transaction:  # the failure aborted the transaction: nothing to retry in
                raise
        # Prepare it again once (a migration altered a table, or the session was reset).
        form = self._prepare(statement)
        return self._con.execute_named(form[0], params, form[1], form[2], sql)

    def _prepare(self, statement: Statement) -> Any:
        while len(self._forms) >= self.limit:
            self._close(next(iter(self._forms)))
        form = self._forms[statement.sql] = self._con.prepare_statement(statement.compiled()[0], ())
        return form

    def _close(self, sql: str) -> None:
        # Forgotten first: should the server refuse the Close, this cache still keeps its bound.
        self._con.close_prepared_statement(self._forms.pop(sql)[0])

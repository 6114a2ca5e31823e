"""Naming a database failure's cause for operators (the CLI, the dashboard); users get 503s."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from common.platform.db.statement import QueryError
from common.platform.errors import DatabaseUnavailable, DylenError


def _reason(error: BaseException | None) -> str:
    """The driver's own words: pg8000 carries the server's message as the `M` field of a dict."""
    orig = getattr(error, "orig", None) or error
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], dict):
        return str(args[0].get("M") or args[0])
    return str(orig) or type(orig).__name__


@contextmanager
def named_errors() -> Iterator[None]:
    """For operator tools: name the cause when the database is away or refuses us (host, name, auth)."""
    try:
        yield
    except DatabaseUnavailable as error:
        raise DatabaseUnavailable(f"Cannot reach the database: {_reason(error.__cause__)}") from error
    except QueryError as error:
        raise DylenError(f"Database error: {_reason(error)}") from error

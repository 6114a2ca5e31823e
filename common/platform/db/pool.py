"""The pool of pg8000 connections (created lazily, once per process), the statement runner, and the
`connection()` / `transaction()` helpers. What they run and return is in `statement`.

Why not SQLAlchemy's engine at run time: importing SQLAlchemy costs ~0.3 s of CPU, more than the
whole bare functions-framework cold start, and its execution path around pg8000 costs more CPU per
request than the statement itself (bench/RESULTS.md). The functions only ever run fixed SQL, so
this module drives pg8000 through its public connection methods (`execute_simple`,
`execute_unnamed`, and through statement.PreparedStatements `prepare_statement`, `execute_named`,
`close_prepared_statement`) with what the engine gave us: a bounded pool with overflow, a checkout
wait, recycling, liveness checks, and "a lost connection replaces the pool". SQLAlchemy stays for migrations only (`python -m common.cli migrate`).

The pool's one invariant: **a connection is reused only if its last exchange ended cleanly**. Every
exchange marks its connection unclean before the first byte goes out, and only two outcomes mark it
clean again: the driver returned, or it raised the server's own refusal, which pg8000 raises only
after reading the ReadyForQuery that ends the reply. Anything else (a value the driver cannot
encode, a timeout, an interrupt, a bug of ours mid-reply) leaves a reply that may be half read, and
the connection is closed instead of being handed to the next request. Transactions are tracked here
(`Connection.transaction`), not read from the driver, so a connection that comes back inside one is
rolled back or closed.

Every failure to reach the database surfaces as DatabaseUnavailable (503), never a driver traceback;
a statement the database refuses raises QueryError. No private name of pg8000 is used (a test reads
this package's source to keep it so).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from common.platform.config import Settings, get_settings
from common.platform.db.connect import Opened, connect_function, describe, driver
from common.platform.db.statement import (
    PreparedStatements,
    QueryError,
    Result,
    Statement,
    error_message,
    is_disconnect,
    read_timestamptz,
    sqlstate,
)
from common.platform.errors import DatabaseUnavailable
from common.platform.log import logger

_lock = threading.Lock()
_pool: Pool | None = None

# A pooled connection idle longer than this is pinged at checkout (one round trip, bounded by the
# connect timeout). Busy connections skip the ping: a dead one fails its statement, which counts as a
# disconnect and replaces the whole pool, and a silent one hits the read timeout.
PING_AFTER_IDLE_SECONDS = 2.0
RECYCLE_SECONDS = 1800.0

# statement_timeout (set on Cloud SQL connector connections, whose socket we cannot bound): the
# server canceled a statement slower than the read timeout.
_QUERY_CANCELED = "57014"
_TIMESTAMPTZ_OID = 1184
# Class 53, insufficient resources (53300 too_many_connections, out of memory, disk full): the server
# is there but cannot take us now, so retrying later can help.
_BUSY_SQLSTATE_CLASS = "53"


class _Record:
    """A pooled connection and what the pool knows of it."""

    __slots__ = (
        "clean",
        "con",
        "created",
        "generation",
        "idle_since",
        "in_transaction",
        "make_params",
        "prepared",
        "sock",
    )

    def __init__(self, opened: Opened, generation: int) -> None:
        # Lazily, like the driver (connect.driver): nothing of pg8000 loads at cold start.
        from pg8000.converters import make_params

        self.con = opened.con
        self.sock = opened.sock
        self.make_params = make_params
        self.generation = generation
        self.created = self.idle_since = time.monotonic()
        # False from the first byte of an exchange until its reply was read whole (the invariant).
        self.clean = True
        self.in_transaction = False
        self.prepared = PreparedStatements(opened.con)

    @property
    def reusable(self) -> bool:
        return self.clean and not self.in_transaction


class Connection:
    """One pooled connection in autocommit: each statement is its own transaction unless
    `transaction()` wrapped it in BEGIN/COMMIT. Used by one thread at a time."""

    __slots__ = ("_pool", "_record")

    def __init__(self, pool: Pool, record: _Record) -> None:
        self._pool = pool
        self._record = record

    def execute(self, statement: Statement | str, params: dict[str, Any] | None = None) -> Result:
        if isinstance(statement, str):
            statement = Statement(statement)
        numbered, make_args = statement.compiled()
        args = make_args(params or {})
        record = self._record
        if statement.prepare:
            # Converted before the exchange: nothing is written for a value the driver cannot take.
            converted = record.make_params(record.con.py_types, args)
            context = self._exchange(
                statement.sql, record.prepared.run, statement, converted, record.in_transaction
            )
        elif args:
            context = self._exchange(statement.sql, record.con.execute_unnamed, numbered, args)
        else:
            context = self._exchange(statement.sql, record.con.execute_simple, statement.sql)
        return statement.result(context)

    @property
    def prepared_count(self) -> int:
        """How many statements this connection holds prepared (the server holds the same ones)."""
        return len(self._record.prepared)

    def execute_simple(self, sql: str) -> Result:
        """A statement without parameters, in the simple protocol (DDL, ANALYZE, several statements)."""
        return Statement(sql).result(self._exchange(sql, self._record.con.execute_simple, sql))

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """BEGIN ... COMMIT on this connection; ROLLBACK when the block raises."""
        record = self._record
        if record.in_transaction:
            raise RuntimeError("already in a transaction on this connection")
        self.execute_simple("BEGIN")
        record.in_transaction = True
        try:
            yield self
        except BaseException:
            with contextlib.suppress(Exception):  # a dead connection has nothing to roll back
                self.execute_simple("ROLLBACK")
                record.in_transaction = False
            raise
        try:
            self.execute_simple("COMMIT")
        finally:
            # A COMMIT the server answered ends the block either way (a refused one rolled back);
            # one it did not answer left the connection unclean, and it is closed on release.
            record.in_transaction = False

    def _exchange(self, sql: str, run: Callable[..., Any], *args: Any) -> Any:
        """One request and its whole reply, under the invariant (see the module docstring)."""
        record = self._record
        record.clean = False
        try:
            context = run(*args)
        except driver().DatabaseError as error:
            # The server's refusal: pg8000 raises it only after the reply's ReadyForQuery.
            record.clean = True
            translated = self._translate(error, sql)
            raise translated from error
        except Exception as error:
            translated = self._translate(error, sql)
            if translated is error:
                raise
            raise translated from error
        record.clean = True
        return context

    def _translate(self, error: Exception, sql: str) -> Exception:
        if is_disconnect(error):
            self._record.clean = False
            self._pool.invalidate_all()
            return DatabaseUnavailable("The database is unreachable; retry shortly.")
        if isinstance(error, driver().DatabaseError):
            if sqlstate(error) == _QUERY_CANCELED:  # statement_timeout: slow, not refused
                return DatabaseUnavailable("The database did not answer in time; retry shortly.")
            return QueryError(error, sql)
        return error


# --- the pool ---------------------------------------------------------------------------------------


class Pool:
    """At most `size` idle connections kept, `size + overflow` open at once; a checkout waits up to
    `timeout` for one (then DatabaseUnavailable). A connection that failed with a disconnect is
    closed, and so is every connection opened before it (the server restarted: they are all dead).
    A connection whose last exchange did not end cleanly is closed, never reused."""

    def __init__(
        self,
        connect: Callable[[], Opened],
        *,
        size: int,
        overflow: int,
        timeout: float,
        read_timeout: float | None,
        ping_timeout: float,
        where: str = "the database",
    ) -> None:
        self._connect = connect
        self.where = where
        self.size = size
        self.limit = size + overflow
        self.timeout = timeout
        self.read_timeout = read_timeout
        self.ping_timeout = ping_timeout
        self._idle: deque[_Record] = deque()
        self._open = 0
        self._generation = 0
        self._cond = threading.Condition(threading.Lock())

    @property
    def open(self) -> int:
        """Connections open now, idle or checked out."""
        return self._open

    def invalidate_all(self) -> None:
        """Close every idle connection now and each busy one when it comes back (a lost connection
        means the others are dead too; also how the pool is disposed of)."""
        with self._cond:
            self._generation += 1
            stale, self._idle = list(self._idle), deque()
        for record in stale:
            self._discard(record)

    def _checkout(self) -> _Record:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                if self._idle:
                    return self._idle.pop()  # the most recently used: warm, least likely idle-dead
                if self._open < self.limit:
                    self._open += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DatabaseUnavailable("All database connections are busy; retry shortly.")
                self._cond.wait(left)
            generation = self._generation
        try:
            opened = self._connect()
        except BaseException as error:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            if isinstance(error, Exception) and is_disconnect(error):
                cause = error.__cause__ or error
                raise DatabaseUnavailable(
                    "The database is unreachable; retry shortly.",
                    log_detail=f"Cannot connect to {self.where}: {type(cause).__name__}: {cause}",
                ) from error
            if isinstance(error, driver().DatabaseError):
                if sqlstate(error).startswith(_BUSY_SQLSTATE_CLASS):  # too many clients: transient
                    raise DatabaseUnavailable(
                        "The database is busy; retry shortly.",
                        log_detail=f"{self.where} refused a connection: {error_message(error)}",
                    ) from error
                raise QueryError(error, "(connect)", where=self.where) from error  # no such database, ...
            raise
        record = _Record(opened, generation)
        try:
            opened.con.autocommit = True
            opened.con.register_in_adapter(_TIMESTAMPTZ_OID, read_timestamptz)
        except BaseException:
            self._discard(record)
            raise
        return record

    def acquire(self) -> _Record:
        # A stale connection found here is replaced; a new one is never pinged.
        for _ in range(self.limit + 1):
            record = self._checkout()
            now = time.monotonic()
            if record.generation != self._generation or now - record.created > RECYCLE_SECONDS:
                self._discard(record)
                continue
            if now - record.idle_since >= PING_AFTER_IDLE_SECONDS and not self._ping(record):
                logger.warning("A pooled database connection failed its ping; the pool is replaced")
                self._discard(record)
                self.invalidate_all()  # what killed this one probably killed its siblings
                continue
            return record
        raise DatabaseUnavailable("The database is unreachable; retry shortly.")

    def _ping(self, record: _Record) -> bool:
        sock = record.sock
        try:
            if sock is not None:
                sock.settimeout(self.ping_timeout)
            record.con.execute_simple("SELECT 1")
            if sock is not None:
                sock.settimeout(self.read_timeout)
            return True
        except Exception:
            return False

    def release(self, record: _Record) -> None:
        if record.clean and record.in_transaction:
            # Left inside BEGIN by an error path that could not roll back: roll back, or close.
            connection = Connection(self, record)
            with contextlib.suppress(Exception):
                connection.execute_simple("ROLLBACK")
                record.in_transaction = False
        with self._cond:
            keep = record.reusable and record.generation == self._generation and len(self._idle) < self.size
            if keep:
                record.idle_since = time.monotonic()
                self._idle.append(record)
                self._cond.notify()
        if not keep:
            self._discard(record)

    def _discard(self, record: _Record) -> None:
        # Closed before it stops counting: the pool never has more than `limit` sockets open.
        _close(record)
        with self._cond:
            self._open -= 1
            self._cond.notify()


def _close(record: _Record) -> None:
    with contextlib.suppress(Exception):
        record.con.close()
    if record.sock is not None:
        # pg8000's close() leaves the socket's file object to the garbage collector, and a traceback
        # of a failed exchange can keep that alive: end the TCP connection itself now.
        with contextlib.suppress(OSError):
            record.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            record.sock.close()


def build_pool(settings: Settings) -> Pool:
    return Pool(
        connect_function(settings, read_timeout=settings.db_read_timeout_seconds),
        size=settings.db_pool_size,
        overflow=settings.db_max_overflow,
        timeout=settings.db_connect_timeout_seconds,
        read_timeout=settings.db_read_timeout_seconds,
        ping_timeout=settings.db_connect_timeout_seconds,
        where=describe(settings),
    )


def get_pool() -> Pool:
    global _pool
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = build_pool(get_settings())
    return _pool


def dispose_pool() -> None:
    global _pool
    with _lock:
        if _pool is not None:
            _pool.invalidate_all()
            _pool = None


@contextmanager
def connection() -> Iterator[Connection]:
    """A pooled connection in autocommit: each statement is its own transaction (one round trip
    fewer on each side than BEGIN/COMMIT). Use for single statements and independent reads."""
    pool = get_pool()
    record = pool.acquire()
    try:
        yield Connection(pool, record)
    finally:
        pool.release(record)


@contextmanager
def transaction() -> Iterator[Connection]:
    """One transaction over several statements: commits on success, rolls back on error, and
    answers 503 when the database is away."""
    with connection() as conn, conn.transaction():
        yield conn

"""The database layer: a small pool of pg8000 connections (created lazily, once per process), the
statement runner, and the `connection()` / `transaction()` helpers.

Why not SQLAlchemy's engine at run time: importing SQLAlchemy costs ~0.3 s of CPU, more than the
whole bare functions-framework cold start, and its execution path around pg8000 costs more CPU per
request than the statement itself (bench/RESULTS.md). The functions only ever run fixed SQL, so
this module talks to pg8000 directly, with what the engine gave us: a bounded pool with overflow, a
checkout wait, recycling, liveness checks, and "a lost connection replaces the pool". SQLAlchemy
stays for the schema and migrations (common.models, migrations/, `python -m common.cli migrate`).

Every failure to reach the database surfaces as DatabaseUnavailable (503), never a driver traceback;
a statement the database refuses raises QueryError. Prepared statements use pg8000's connection
internals (prepare_statement, its message handlers and buffered socket; see _execute_prepared);
requirements.txt pins its minor version and tests/test_db.py fails loudly if an upgrade moves them.
"""

from __future__ import annotations

import atexit
import contextlib
import struct
import threading
import time
from collections import deque, namedtuple
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from common.config import SSL_MODES, Settings, get_settings
from common.errors import ConfigError, DatabaseUnavailable

_lock = threading.Lock()
_pool: Pool | None = None
_connector: Any = None

# A pooled connection idle longer than this is pinged at checkout (one round trip, bounded by the
# connect timeout). Busy connections skip the ping: a dead one fails its statement, which counts as a
# disconnect and replaces the whole pool, and a silent one hits the read timeout.
PING_AFTER_IDLE_SECONDS = 2.0
RECYCLE_SECONDS = 1800.0

# SQLSTATE classes 08 (connection exception) and 57P (the server is shutting down or terminated the
# session: restart, failover, pg_terminate_backend).
_DISCONNECT_SQLSTATES = ("57P01", "57P02", "57P03")
# After these a prepared statement must be prepared again: 26000 it no longer exists (the session
# was reset), 0A000 "cached plan must not change result type" (a migration altered a table).
_STALE_STATEMENT_SQLSTATES = ("26000", "0A000")
_TIMESTAMPTZ_OID = 1184


def _driver() -> Any:
    import pg8000.dbapi

    return pg8000.dbapi


# --- where the database is ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str | None
    port: int
    database: str | None
    user: str | None
    password: str | None
    sslmode: str | None
    unix_sock: str | None = None


def parse_url(url: str) -> Target:
    """A postgresql:// URL (the `+pg8000` driver suffix is accepted) with libpq's `sslmode`, or
    pg8000's `unix_sock` for a Unix socket (`postgresql://user@/db?unix_sock=/cloudsql/.../.s.PGSQL.5432`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgresql+pg8000", "postgres"):
        raise ConfigError("DYLEN_DATABASE_URL must point at PostgreSQL")
    query = parse_qs(parts.query)
    modes = query.get("sslmode")
    mode = modes[-1] if modes else None
    if mode is not None and mode not in SSL_MODES:
        raise ConfigError(f"DYLEN_DATABASE_URL: sslmode must be one of {', '.join(SSL_MODES)}, got {mode!r}")
    return Target(
        host=parts.hostname,
        port=parts.port or 5432,
        database=unquote(parts.path.lstrip("/")) or None,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        sslmode=mode,
        unix_sock=query["unix_sock"][-1] if "unix_sock" in query else None,
    )


def ssl_argument(url: str) -> Any:
    """pg8000's `ssl_context` for a URL's libpq-style `sslmode`.

    pg8000's own default is "prefer": it builds a fresh default SSL context for every new connection
    (~50 ms of CPU loading the CA store, on the cold start's path) and asks the server for TLS. With
    no sslmode, a loopback server gets no TLS (nothing to protect on this host) and any other host
    keeps pg8000's default; `require` and the verify modes build one context per process.
    """
    target = parse_url(url)
    mode = target.sslmode
    if mode is None:
        return False if target.unix_sock or is_loopback_host(target.host) else None
    if mode == "disable":
        return False
    if mode in ("allow", "prefer"):
        return None
    import ssl

    context = ssl.create_default_context()
    if mode != "verify-full":
        context.check_hostname = False
    if mode == "require":
        context.verify_mode = ssl.CERT_NONE
    return context


def is_loopback_host(host: str | None) -> bool:
    """True for a host on this machine: localhost, 127.0.0.0/8, ::1, or a Unix socket (no host)."""
    if not host or host == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _cloud_sql_connect(settings: Settings) -> Callable[[], Any]:
    # Imported only here: functions configured with a plain URL never load the connector.
    global _connector
    from google.cloud.sql.connector import Connector, IPTypes

    if _connector is None:
        _connector = Connector(refresh_strategy="lazy", ip_type=IPTypes.PUBLIC)
        atexit.register(_connector.close)
    connector = _connector

    def connect() -> Any:
        kwargs: dict[str, Any] = {
            "user": settings.db_user,
            "db": settings.db_name,
            "enable_iam_auth": settings.db_iam_auth,
        }
        if not settings.db_iam_auth:
            kwargs["password"] = settings.db_password
        return connector.connect(settings.cloud_sql_instance, "pg8000", **kwargs)

    return connect


def _url_connect(settings: Settings) -> Callable[[], Any]:
    if not settings.database_url:
        raise ConfigError(
            "DYLEN_DATABASE_URL (or DYLEN_CLOUD_SQL_INSTANCE) is required; "
            "`make run` and `make test` start an embedded PostgreSQL for you"
        )
    target = parse_url(settings.database_url)
    ssl_context = ssl_argument(settings.database_url)

    where: dict[str, Any] = (
        {"unix_sock": target.unix_sock}
        if target.unix_sock
        else {"host": target.host or "localhost", "port": target.port}
    )

    def connect() -> Any:
        return _driver().connect(
            user=target.user or "postgres",
            password=target.password,
            database=target.database,
            timeout=settings.db_connect_timeout_seconds,
            ssl_context=ssl_context,
            **where,
        )

    return connect


# --- statements and results -------------------------------------------------------------------------


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
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]


class Statement:
    """Fixed SQL with `:name` parameters. Parameters are sent as text and typed by the server from
    their context, so one whose type the context does not fix needs a CAST in the SQL.

    Statements of the hot path are declared with `prepare=True` at module level: prepared once per
    pooled connection, then executed by name, one round trip. pg8000 otherwise spends three round
    trips per statement (Parse, Describe, Bind/Execute) and the server re-plans it every time.
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
        return Result([row_type._make(row) for row in rows], context.row_count)


def text(sql: str) -> Statement:
    """SQL run now and then (operators, maintenance): parsed on each execution, nothing cached."""
    return Statement(sql)


class QueryError(Exception):
    """The database refused a statement (not a lost connection: that is DatabaseUnavailable)."""

    def __init__(self, error: Exception, sql: str) -> None:
        self.orig = error
        detail = error.args[0] if error.args else {}
        self.sqlstate = str(detail.get("C", "")) if isinstance(detail, dict) else ""
        message = detail.get("M", str(error)) if isinstance(detail, dict) else str(error)
        super().__init__(f"{message} (SQLSTATE {self.sqlstate or '?'})\n[SQL: {' '.join(sql.split())[:500]}]")

    @property
    def unique_violation(self) -> bool:
        return self.sqlstate == "23505"


def _sqlstate(error: BaseException | None) -> str:
    args = getattr(error, "args", ())
    if args and isinstance(args[0], dict):
        return str(args[0].get("C", ""))
    return ""


def _is_disconnect(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, OSError)):
        return True
    driver = _driver()
    if isinstance(error, driver.InterfaceError):
        return True
    code = _sqlstate(error)
    return code in _DISCONNECT_SQLSTATES or code.startswith("08")


class Connection:
    """One pooled connection in autocommit: each statement is its own transaction unless
    `transaction()` wrapped it in BEGIN/COMMIT. Used by one thread at a time."""

    __slots__ = ("_pool", "_record")

    def __init__(self, pool: Pool, record: _Record) -> None:
        self._pool = pool
        self._record = record

    @property
    def driver_connection(self) -> Any:
        return self._record.con

    def execute(self, statement: Statement | str, params: dict[str, Any] | None = None) -> Result:
        if isinstance(statement, str):
            statement = Statement(statement)
        con = self._record.con
        try:
            if not statement.prepare:
                numbered, make_args = statement.compiled()
                args = make_args(params or {})
                context = (
                    con.execute_unnamed(numbered, vals=args) if args else con.execute_simple(statement.sql)
                )
            else:
                try:
                    context = self._run_prepared(statement, params or {})
                except _driver().DatabaseError as error:
                    # Prepare it again once, unless the failure aborted an explicit transaction.
                    if _sqlstate(error) not in _STALE_STATEMENT_SQLSTATES or con._in_transaction:
                        raise
                    context = self._run_prepared(statement, params or {})
        except Exception as error:
            translated = self._translate(error, statement.sql)
            if translated is error:
                raise
            raise translated from error
        return statement.result(context)

    def exec_driver_sql(self, sql: str) -> Result:
        """A statement without parameters, in the simple protocol (BEGIN, COMMIT, DDL, ANALYZE)."""
        try:
            context = self._record.con.execute_simple(sql)
        except Exception as error:
            translated = self._translate(error, sql)
            if translated is error:
                raise
            raise translated from error
        return Statement(sql).result(context)

    def _run_prepared(self, statement: Statement, params: dict[str, Any]) -> Any:
        record = self._record
        con = record.con
        cache = record.prepared
        entry = cache.get(statement)
        if entry is None:
            numbered, _ = statement.compiled()
            entry = cache[statement] = con.prepare_statement(numbered, ())
        name, columns, input_funcs = entry
        args = statement.compiled()[1](params)
        try:
            return _execute_prepared(
                con, name, record.make_params(con.py_types, args), columns, input_funcs, statement.sql
            )
        except _driver().DatabaseError as error:
            if _sqlstate(error) in _STALE_STATEMENT_SQLSTATES:
                cache.pop(statement, None)
            raise
        except BaseException:
            # Not the server's refusal (that arrives as a DatabaseError after ReadyForQuery): the
            # reply may be half read, so this connection cannot be trusted with another statement.
            record.dead = True
            raise

    def _translate(self, error: Exception, sql: str) -> Exception:
        if _is_disconnect(error):
            self._record.dead = True
            self._pool.invalidate_all()
            return DatabaseUnavailable("The database is unreachable; retry shortly.")
        if isinstance(error, _driver().DatabaseError):
            return QueryError(error, sql)
        return error


# --- the pool ---------------------------------------------------------------------------------------


class _Record:
    __slots__ = ("con", "created", "dead", "generation", "idle_since", "make_params", "prepared")

    def __init__(self, con: Any, generation: int) -> None:
        from pg8000.converters import make_params

        self.con = con
        self.make_params = make_params
        self.generation = generation
        self.created = self.idle_since = time.monotonic()
        self.dead = False
        # Statement -> (name, columns, input funcs) of its prepared form on this connection.
        self.prepared: dict[Statement, Any] = {}


_MESSAGE_HEADER = struct.Struct("!ci")  # type byte, length
_pack_int32 = struct.Struct("!i").pack
_pack_uint16 = struct.Struct("!H").pack


def _execute_prepared(
    con: Any, name: bytes, params: tuple[str | None, ...], columns: Any, input_funcs: Any, sql: str
) -> Any:
    """pg8000's execute_named, minus two costs on the hot path (bench/RESULTS.md):

    - It sends Bind, Flush, Execute, Flush, Sync; each Flush makes the server write what it has so
      far, so one statement came back in three packets, three wake-ups of this thread and three
      sends by the server. Bind, Execute, Sync alone get the same reply in one packet.
    - It reads each message with two buffered reads; the reply is parsed here from the buffer the
      one receive filled, message by message, with pg8000's own handlers (errors, row decoding,
      transaction status, notices and parameter changes behave exactly as in pg8000).
    """
    from pg8000 import core

    context = core.Context(columns=columns, input_funcs=input_funcs, statement=sql)
    encoding = con._client_encoding
    parts = [b"\x00", name, b"\x00\x00", _pack_uint16(len(params))]
    for value in params:
        if value is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            encoded = value.encode(encoding)
            parts.append(_pack_int32(len(encoded)))
            parts.append(encoded)
    parts.append(b"\x00\x00")  # every result column in text format
    bind = b"".join(parts)
    sock = con._sock
    if sock is None:
        raise core.InterfaceError("connection is closed")
    core._write(sock, b"B" + _pack_int32(len(bind) + 4) + bind + core.EXECUTE_MSG + core.SYNC_MSG)
    core._flush(sock)
    handlers = con.message_types
    unpack = _MESSAGE_HEADER.unpack_from
    ready = False  # ReadyForQuery handled: the reply is complete
    while not ready:
        try:
            buffered = sock.peek(5)  # what one receive brought (blocks only when nothing is buffered)
        except OSError as error:
            raise core.InterfaceError("network error") from error
        end, size = 0, len(buffered)
        while end + 5 <= size:
            code, length = unpack(buffered, end)
            stop = end + 1 + length
            if stop > size:
                break
            handlers[code](buffered[end + 5 : stop], context)
            end = stop
            if code == b"Z":
                ready = True
                break
        if end:
            sock.read(end)
        else:  # a message split across packets: read it whole, as pg8000 does
            code, length = _MESSAGE_HEADER.unpack(core._read(sock, 5))
            handlers[code](core._read(sock, length - 4), context)
            ready = code == b"Z"
    if context.error is not None:
        raise context.error
    return context


def _set_read_timeout(con: Any, seconds: float | None) -> None:
    sock = getattr(con, "_usock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _timestamptz_in(data: str) -> Any:
    """pg8000 parses timestamptz with strptime, the largest single cost of reading a job row;
    PostgreSQL's ISO output is what datetime.fromisoformat reads natively. The rare values it does
    not (infinity, BC dates, years past 9999) go to pg8000's own parser."""
    try:
        return datetime.fromisoformat(data)
    except ValueError:
        from pg8000.converters import timestamptz_in

        return timestamptz_in(data)


class Pool:
    """At most `size` idle connections kept, `size + overflow` open at once; a checkout waits up to
    `timeout` for one (then DatabaseUnavailable). A connection that failed with a disconnect is
    closed, and so is every connection opened before it (the server restarted: they are all dead)."""

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        size: int,
        overflow: int,
        timeout: float,
        read_timeout: float,
        ping_timeout: float,
    ) -> None:
        self._connect = connect
        self.size = size
        self.limit = size + overflow
        self.timeout = timeout
        self.read_timeout = read_timeout
        self.ping_timeout = ping_timeout
        self._idle: deque[_Record] = deque()
        self._open = 0
        self._generation = 0
        self._cond = threading.Condition(threading.Lock())

    def invalidate_all(self) -> None:
        """Close every idle connection now and each busy one when it comes back (a lost connection
        means the others are dead too; also how the pool is disposed of)."""
        with self._cond:
            self._generation += 1
            stale, self._idle = list(self._idle), deque()
            self._open -= len(stale)
            self._cond.notify_all()
        for record in stale:
            _close(record)

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
            con = self._connect()
        except BaseException as error:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            if isinstance(error, Exception) and _is_disconnect(error):
                raise DatabaseUnavailable("The database is unreachable; retry shortly.") from error
            if isinstance(error, _driver().DatabaseError):  # no such database, wrong password
                raise QueryError(error, "(connect)") from error
            raise
        try:
            con.autocommit = True
            _set_read_timeout(con, self.read_timeout)
            con.register_in_adapter(_TIMESTAMPTZ_OID, _timestamptz_in)
        except BaseException:
            self._discard(_Record(con, generation))
            raise
        return _Record(con, generation)

    def acquire(self) -> _Record:
        # A stale connection found here is replaced; a new one is never pinged.
        for _ in range(self.limit + 1):
            record = self._checkout()
            now = time.monotonic()
            if record.generation != self._generation or now - record.created > RECYCLE_SECONDS:
                self._discard(record)
                continue
            if now - record.idle_since >= PING_AFTER_IDLE_SECONDS and not self._ping(record):
                from common.log import logger

                logger.warning("A pooled database connection failed its ping; the pool is replaced")
                self._discard(record)
                self.invalidate_all()  # what killed this one probably killed its siblings
                continue
            return record
        raise DatabaseUnavailable("The database is unreachable; retry shortly.")

    def _ping(self, record: _Record) -> bool:
        _set_read_timeout(record.con, self.ping_timeout)
        try:
            record.con.execute_simple("SELECT 1")
            return True
        except Exception:
            return False
        finally:
            with contextlib.suppress(OSError):
                _set_read_timeout(record.con, self.read_timeout)

    def release(self, record: _Record) -> None:
        if not record.dead and record.con._in_transaction:
            # Left inside BEGIN by an error path that could not roll back: not reusable as is.
            with contextlib.suppress(Exception):
                record.con.execute_simple("ROLLBACK")
            record.dead = record.con._in_transaction
        with self._cond:
            keep = not record.dead and record.generation == self._generation and len(self._idle) < self.size
            if keep:
                record.idle_since = time.monotonic()
                self._idle.append(record)
            else:
                self._open -= 1
            self._cond.notify()
        if not keep:
            _close(record)

    def _discard(self, record: _Record) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()
        _close(record)


def _close(record: _Record) -> None:
    with contextlib.suppress(Exception):
        record.con.close()


def build_pool(settings: Settings) -> Pool:
    connect = _cloud_sql_connect(settings) if settings.uses_cloud_sql else _url_connect(settings)
    return Pool(
        connect,
        size=settings.db_pool_size,
        overflow=settings.db_max_overflow,
        timeout=settings.db_connect_timeout_seconds,
        read_timeout=settings.db_read_timeout_seconds,
        ping_timeout=settings.db_connect_timeout_seconds,
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
    with connection() as conn:
        conn.exec_driver_sql("BEGIN")
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(Exception):  # a dead connection has nothing to roll back
                conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")


def sqlalchemy_engine(settings: Settings | None = None) -> Any:
    """A SQLAlchemy engine on the same database, for Alembic migrations only (no pool kept, no read
    timeout: a migration may rightly rebuild an index for a long time)."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    settings = settings or get_settings()
    connect = _cloud_sql_connect(settings) if settings.uses_cloud_sql else _url_connect(settings)

    def creator() -> Any:
        con = connect()
        _set_read_timeout(con, None)
        return con

    return sa.create_engine("postgresql+pg8000://", creator=creator, poolclass=NullPool)

"""The database engine (created lazily, once per process) and the transaction helper.

Every query runs inside `transaction()`, which turns "the database is not there" into
DatabaseUnavailable (503) so no caller ever answers a driver traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
from collections import namedtuple
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import Connection, make_url

from common.config import Settings, get_settings
from common.errors import ConfigError, DatabaseUnavailable

_lock = threading.Lock()
_engine: Engine | None = None
_connector: Any = None


def normalize_url(url: str) -> str:
    """Accept plain postgresql:// URLs and pin the pg8000 driver (`sslmode` is taken out: see
    ssl_argument)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError("DYLEN_DATABASE_URL must point at PostgreSQL")
    return (
        parsed.set(drivername="postgresql+pg8000")
        .difference_update_query(["sslmode"])
        .render_as_string(hide_password=False)
    )


_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def ssl_argument(url: str) -> Any:
    """pg8000's `ssl_context` for a URL's libpq-style `sslmode`.

    pg8000's own default is "prefer": it builds a fresh default SSL context for every new connection
    (~50 ms of CPU loading the CA store, on the cold start's path) and asks the server for TLS. With
    no sslmode, a loopback server gets no TLS (nothing to protect on this host) and any other host
    keeps pg8000's default; `require` and the verify modes build one context per process.
    """
    parsed = make_url(url)
    mode = parsed.query.get("sslmode")
    if isinstance(mode, tuple):
        mode = mode[-1]
    if mode is None:
        return False if is_loopback_host(parsed.host) else None
    if mode not in _SSL_MODES:
        raise ConfigError(f"DYLEN_DATABASE_URL: sslmode must be one of {', '.join(_SSL_MODES)}, got {mode!r}")
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


def _cloud_sql_creator(settings: Settings) -> Any:
    # Imported only here: functions configured with a plain URL never load the connector.
    global _connector
    from google.cloud.sql.connector import Connector, IPTypes

    if _connector is None:
        _connector = Connector(refresh_strategy="lazy", ip_type=IPTypes.PUBLIC)
        atexit.register(_connector.close)
    connector = _connector

    def creator() -> Any:
        kwargs: dict[str, Any] = {
            "user": settings.db_user,
            "db": settings.db_name,
            "enable_iam_auth": settings.db_iam_auth,
        }
        if not settings.db_iam_auth:
            kwargs["password"] = settings.db_password
        return connector.connect(settings.cloud_sql_instance, "pg8000", **kwargs)

    return creator


# SQLSTATE class 57P: the server is shutting down or terminated the session (restart, failover).
_DISCONNECT_SQLSTATES = ("57P01", "57P02", "57P03")


def _sqlstate(error: BaseException | None) -> str:
    args = getattr(error, "args", ())
    if args and isinstance(args[0], dict):
        return str(args[0].get("C", ""))
    return ""


# A pooled connection idle longer than this is pinged at checkout (one round trip, bounded by the
# connect timeout). Busy connections skip the ping: a dead one fails its statement, which counts as a
# disconnect and replaces the whole pool, and a silent one hits the read timeout.
PING_AFTER_IDLE_SECONDS = 2.0


def build_engine(settings: Settings) -> Engine:
    common: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        # Liveness is checked by _ping_idle_connections, not on every checkout.
        "pool_pre_ping": False,
        "pool_recycle": 1800,
        "pool_timeout": settings.db_connect_timeout_seconds,
        # Autocommit at the driver: a single statement is its own transaction and costs no
        # BEGIN/COMMIT round trips; transaction() issues BEGIN/COMMIT itself when it needs more.
        "isolation_level": "AUTOCOMMIT",
    }
    if settings.uses_cloud_sql:
        engine = create_engine("postgresql+pg8000://", creator=_cloud_sql_creator(settings), **common)
    else:
        if not settings.database_url:
            raise ConfigError(
                "DYLEN_DATABASE_URL (or DYLEN_CLOUD_SQL_INSTANCE) is required; "
                "`make run` and `make test` start an embedded PostgreSQL for you"
            )
        engine = create_engine(
            normalize_url(settings.database_url),
            connect_args={
                "timeout": settings.db_connect_timeout_seconds,
                "ssl_context": ssl_argument(settings.database_url),
            },
            **common,
        )

    read_timeout = settings.db_read_timeout_seconds

    @event.listens_for(engine, "connect")
    def _bounded_reads(dbapi_conn: Any, _record: Any) -> None:
        # pg8000's `timeout` covers connect; afterwards every read waits at most the read timeout, so
        # a database that stops answering mid-statement (a dropped network, a frozen failover)
        # fails the request with 503 instead of hanging it.
        _set_read_timeout(dbapi_conn, read_timeout)
        dbapi_conn.register_in_adapter(_TIMESTAMPTZ_OID, _timestamptz_in)

    @event.listens_for(engine, "handle_error")
    def _classify(context: Any) -> None:
        # A server restart arrives as an ordinary error with SQLSTATE 57P01; calling it a
        # disconnect makes SQLAlchemy drop the whole pool, so every stale connection is replaced
        # after one failed statement rather than one each.
        original = context.original_exception
        if _sqlstate(original) in _DISCONNECT_SQLSTATES or isinstance(original, (ConnectionError, OSError)):
            context.is_disconnect = True

    _ping_idle_connections(engine, settings.db_connect_timeout_seconds, read_timeout)
    return engine


_TIMESTAMPTZ_OID = 1184


def _timestamptz_in(data: str) -> Any:
    """pg8000 parses timestamptz with strptime, the largest single cost of reading a job row;
    PostgreSQL's ISO output is what datetime.fromisoformat reads natively. The rare values it does
    not (infinity, BC dates, years past 9999) go to pg8000's own parser."""
    try:
        return datetime.fromisoformat(data)
    except ValueError:
        from pg8000.converters import timestamptz_in

        return timestamptz_in(data)


def _set_read_timeout(dbapi_conn: Any, seconds: float | None) -> None:
    sock = getattr(dbapi_conn, "_usock", None)
    if sock is not None:
        sock.settimeout(seconds)


@contextmanager
def without_read_timeout(conn: Connection) -> Iterator[Connection]:
    """Lift the read timeout on this connection for a statement that may rightly run long (a
    migration rebuilding an index on a big table); restored before the connection is reused."""
    dbapi_conn = conn.connection.dbapi_connection
    _set_read_timeout(dbapi_conn, None)
    try:
        yield conn
    finally:
        with contextlib.suppress(OSError):
            _set_read_timeout(dbapi_conn, get_settings().db_read_timeout_seconds)


def _ping_idle_connections(engine: Engine, ping_timeout: float, read_timeout: float) -> None:
    """Ping a connection at checkout only when it sat in the pool for PING_AFTER_IDLE_SECONDS: that
    is when a restart, a failover or a NAT timeout has had the chance to kill it unseen. Under load
    connections come back within milliseconds and a request costs no extra round trip."""
    dialect = engine.dialect
    monotonic = time.monotonic

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        _set_read_timeout(dbapi_conn, ping_timeout)
        try:
            alive = dialect.do_ping(dbapi_conn)
        except Exception as error:  # the pool replaces the connection, and retries the checkout
            raise exc.DisconnectionError(f"idle connection failed its ping: {error!r}") from error
        finally:
            with contextlib.suppress(OSError):
                _set_read_timeout(dbapi_conn, read_timeout)
        if not alive:
            raise exc.DisconnectionError("idle connection failed its ping")


# --- hot statements ------------------------------------------------------------------------------
# Through SQLAlchemy, pg8000 sends each parameterised statement as Parse, Describe, then Bind/Execute,
# waiting for the server after each: three round trips, a server-side parse and plan, a client-side
# rewrite of the placeholders, and SQLAlchemy's execution context and result objects around it. The
# few statements on the request path instead run as a Statement: prepared once per pooled connection,
# then executed by name on the driver (one round trip, bench/RESULTS.md). This reaches into pg8000's
# connection internals (pinned in requirements.txt); tests/test_db.py fails loudly if a pg8000
# upgrade moves them. Errors come out as SQLAlchemy would raise them, and a lost connection is
# handled as SQLAlchemy does (the pool is replaced).

# SQLSTATEs after which a prepared statement must be prepared again: 26000 it no longer exists (the
# session was reset), 0A000 "cached plan must not change result type" (a migration altered a table).
_STALE_STATEMENT_SQLSTATES = ("26000", "0A000")


class Statement:
    """Fixed SQL with `:name` parameters, run by `rows()` / `count()` on a connection from
    connection() or transaction(). Parameters are sent as text and typed by the server from their
    context, so a parameter whose type the context does not fix needs a CAST in the SQL."""

    __slots__ = ("_make_args", "_numbered", "_row_types", "sql")

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self._numbered: str | None = None
        self._make_args: Any = None
        self._row_types: dict[tuple[str, ...], Any] = {}

    def _execute(self, conn: Connection, params: dict[str, Any]) -> Any:
        if self._numbered is None:
            from pg8000.native import to_statement

            self._numbered, self._make_args = to_statement(self.sql)
        con: Any = conn.connection.dbapi_connection
        try:
            try:
                return _run_prepared(con, self, self._make_args(params))
            except _driver().DatabaseError as error:
                # Prepare it again once, unless the failure aborted an explicit transaction.
                if _sqlstate(error) not in _STALE_STATEMENT_SQLSTATES or con._in_transaction:
                    raise
                return _run_prepared(con, self, self._make_args(params))
        except Exception as error:
            raise _translate(conn, self.sql, params, error) from error

    def rows(self, conn: Connection, **params: Any) -> list[Any]:
        """The result rows, as named tuples (attribute access by column name)."""
        context = self._execute(conn, params)
        if not context.rows:
            return []
        names = tuple(column["name"] for column in context.columns)
        row_type: Any = self._row_types.get(names)
        if row_type is None:
            row_type = self._row_types[names] = namedtuple("Row", names, rename=True)
        return [row_type._make(row) for row in context.rows]

    def first(self, conn: Connection, **params: Any) -> Any:
        rows = self.rows(conn, **params)
        return rows[0] if rows else None

    def count(self, conn: Connection, **params: Any) -> int:
        """Rows written (UPDATE / INSERT / DELETE without RETURNING)."""
        return int(self._execute(conn, params).row_count)


def _driver() -> Any:
    import pg8000.legacy

    return pg8000.legacy


def _run_prepared(con: Any, statement: Statement, args: tuple[Any, ...]) -> Any:
    from pg8000.converters import make_params

    cache: dict[Statement, Any] = con.__dict__.setdefault("_dylen_prepared", {})
    entry = cache.get(statement)
    if entry is None:
        entry = cache[statement] = con.prepare_statement(statement._numbered, ())
    name, columns, input_funcs = entry
    try:
        return con.execute_named(name, make_params(con.py_types, args), columns, input_funcs, statement.sql)
    except _driver().DatabaseError as error:
        if _sqlstate(error) in _STALE_STATEMENT_SQLSTATES:
            cache.pop(statement, None)
        raise


def _translate(conn: Connection, sql: str, params: dict[str, Any], error: Exception) -> Exception:
    """The exception SQLAlchemy would raise for this driver error, with its side effects: a lost
    connection is invalidated and the rest of the pool replaced (see _classify in build_engine)."""
    driver = _driver()
    if not isinstance(error, (driver.Error, OSError)):
        return error
    if _sqlstate(error) in _DISCONNECT_SQLSTATES or isinstance(error, (driver.InterfaceError, OSError)):
        with contextlib.suppress(Exception):
            conn.invalidate(error)
        with contextlib.suppress(Exception):
            conn.engine.dispose(close=False)
        return DatabaseUnavailable("The database is unreachable; retry shortly.")
    if type(error) is driver.DatabaseError:  # as pg8000's own Cursor.execute classifies them
        cls = {"28000": driver.InterfaceError, "23505": driver.IntegrityError}.get(
            _sqlstate(error), driver.ProgrammingError
        )
        error = cls(*error.args)
    return exc.DBAPIError.instance(sql, params, error, driver.Error, dialect=conn.dialect)


def get_engine() -> Engine:
    global _engine
    if _engine is None:
        with _lock:
            if _engine is None:
                _engine = build_engine(get_settings())
    return _engine


def dispose_engine() -> None:
    global _engine
    with _lock:
        if _engine is not None:
            _engine.dispose()
            _engine = None


def is_unavailable(error: BaseException) -> bool:
    """True for errors that mean "cannot reach the database", not "the SQL is wrong"."""
    if isinstance(error, exc.TimeoutError):  # pool exhausted for pool_timeout seconds
        return True
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        if isinstance(error, (exc.OperationalError, exc.InterfaceError)):
            return True
        # pg8000 reports server shutdown / admin termination as DatabaseError with SQLSTATE 57P0x.
        if _sqlstate(getattr(error, "orig", None)) in _DISCONNECT_SQLSTATES:
            return True
    return isinstance(error, (ConnectionError, OSError))


@contextmanager
def connection() -> Iterator[Connection]:
    """A pooled connection in autocommit: each statement is its own transaction (one round trip
    fewer on each side than BEGIN/COMMIT). Use for single statements and independent reads."""
    try:
        with get_engine().connect() as conn:
            yield conn
    except Exception as error:
        if is_unavailable(error):
            raise DatabaseUnavailable("The database is unreachable; retry shortly.") from error
        raise


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

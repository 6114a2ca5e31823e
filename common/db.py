"""The database engine (created lazily, once per process) and the transaction helper.

Every query runs inside `transaction()`, which turns "the database is not there" into
DatabaseUnavailable (503) so no caller ever answers a driver traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import Connection, make_url

from common.config import Settings, get_settings
from common.errors import ConfigError, DatabaseUnavailable

_lock = threading.Lock()
_engine: Engine | None = None
_connector: Any = None


def normalize_url(url: str) -> str:
    """Accept plain postgresql:// URLs and pin the pg8000 driver."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError("DYLEN_DATABASE_URL must point at PostgreSQL")
    return parsed.set(drivername="postgresql+pg8000").render_as_string(hide_password=False)


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


def build_engine(settings: Settings) -> Engine:
    common: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        # Every checkout pings (one simple-protocol round trip in autocommit, bounded by
        # _bound_pre_ping), so a database restart or a silently dropped network costs no request.
        "pool_pre_ping": True,
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
            connect_args={"timeout": settings.db_connect_timeout_seconds},
            **common,
        )

        @event.listens_for(engine, "connect")
        def _unbounded_reads(dbapi_conn: Any, _record: Any) -> None:
            # pg8000's `timeout` bounds every socket read; keep it for connect only, so that a
            # down server fails fast but a long archive batch is not cut off.
            sock = getattr(dbapi_conn, "_usock", None)
            if sock is not None:
                sock.settimeout(None)

    @event.listens_for(engine, "handle_error")
    def _classify(context: Any) -> None:
        # A server restart arrives as an ordinary error with SQLSTATE 57P01; calling it a
        # disconnect makes SQLAlchemy drop the whole pool, so every stale connection is replaced
        # after one failed statement rather than one each.
        original = context.original_exception
        if _sqlstate(original) in _DISCONNECT_SQLSTATES or isinstance(original, (ConnectionError, OSError)):
            context.is_disconnect = True

    _bound_pre_ping(engine, settings.db_connect_timeout_seconds)
    return engine


def _bound_pre_ping(engine: Engine, seconds: float) -> None:
    """Give the checkout ping a deadline. Reads are otherwise unbounded (see above), so a pooled
    connection to a database that stopped answering without closing the socket (a dropped network,
    a frozen failover) would hang the request forever. A ping that times out counts as a
    disconnect: the connection is replaced, and a database still away answers 503."""
    dialect = engine.dialect
    ping = dialect.do_ping

    def bounded_ping(dbapi_conn: Any) -> bool:
        sock = getattr(dbapi_conn, "_usock", None)
        if sock is None:
            return ping(dbapi_conn)
        sock.settimeout(seconds)
        try:
            return ping(dbapi_conn)
        except OSError as error:  # the timeout surfaces raw from pg8000's first read
            raise dialect.loaded_dbapi.InterfaceError("network error") from error
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(None)

    dialect.do_ping = bounded_ping  # type: ignore[method-assign,assignment]


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

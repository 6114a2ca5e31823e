"""Opening connections: to a DYLEN_DATABASE_URL (TCP or Unix socket, TLS by libpq's sslmode) or
through the Cloud SQL connector, each handing the pool the socket it may bound (see Opened).
"""

from __future__ import annotations

import atexit
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.platform.config import DatabaseTarget, Settings, parse_database_url
from common.platform.errors import ConfigError

APPLICATION_NAME = "dylen"
_connector: Any = None


def driver() -> Any:
    # Lazily: pg8000's imports (~30 ms) load with the first connection, not at cold start.
    import pg8000.dbapi

    return pg8000.dbapi


def is_loopback_host(host: str | None) -> bool:
    """True for a host on this machine: localhost, 127.0.0.0/8, ::1, or a Unix socket (no host)."""
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Handshake(threading.local):
    """The TLS socket pg8000 wrapped last on this thread (see _TrackingContext)."""

    sock: ssl.SSLSocket | None = None


_handshake = _Handshake()


class _TrackingContext(ssl.SSLContext):
    """An SSLContext that remembers the socket it wraps, so the pool can set that socket's timeouts
    (pg8000 owns the TLS socket it makes from ours and exposes no public handle on it)."""

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        wrapped = super().wrap_socket(sock, *args, **kwargs)
        _handshake.sock = wrapped
        return wrapped


def ssl_argument(url: str) -> Any:
    """pg8000's `ssl_context` for a URL's libpq-style `sslmode`: False for no TLS, else a context.

    No sslmode means no TLS to a loopback server (nothing to protect on this host; pg8000's own
    default would build a fresh context per connection, ~50 ms of CPU loading the CA store on the
    cold start's path) and `prefer` elsewhere. `allow` and `prefer` try TLS without verifying and
    fall back to plain text if the server refuses (see _url_connect); `require` insists on it; the
    verify modes check the certificate (and, for verify-full, the host name).
    """
    target = parse_database_url(url)
    mode = target.sslmode
    if mode is None:
        mode = "disable" if target.unix_sock or is_loopback_host(target.host) else "prefer"
    if mode == "disable":
        return False
    context = _TrackingContext(ssl.PROTOCOL_TLS_CLIENT)
    if mode in ("verify-ca", "verify-full"):
        context.load_default_certs()
        context.check_hostname = mode == "verify-full"
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class Opened:
    """A new driver connection and the socket it talks over, when that socket is reachable (ours,
    or the TLS socket made from ours): the pool sets read and ping timeouts on it. None with the
    Cloud SQL connector, which makes its own socket; there the server's statement_timeout bounds
    statements instead."""

    con: Any
    sock: socket.socket | None


def _open_socket(target: DatabaseTarget, timeout: float) -> socket.socket:
    if target.unix_sock:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(target.unix_sock)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((target.host or "localhost", target.port), timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return sock


def _url_connect(settings: Settings, *, read_timeout: float | None) -> Callable[[], Opened]:
    if not settings.database_url:
        raise ConfigError(
            "DYLEN_DATABASE_URL (or DYLEN_CLOUD_SQL_INSTANCE) is required; "
            "`make run` and `make test` start an embedded PostgreSQL for you"
        )
    target = parse_database_url(settings.database_url)
    ssl_context = ssl_argument(settings.database_url)
    fall_back = target.sslmode in (None, "allow", "prefer") and ssl_context is not False
    connect_timeout = settings.db_connect_timeout_seconds

    def attempt(context: Any) -> Opened:
        # Our own socket: the one handle on the connection's reads that pg8000 does not hide.
        sock = _open_socket(target, connect_timeout)
        _handshake.sock = None
        try:
            con = driver().connect(
                user=target.user or "postgres",
                password=target.password,
                database=target.database,
                host=target.host or "localhost",  # the TLS server name; the socket is already ours
                sock=sock,
                ssl_context=context,
                application_name=APPLICATION_NAME,
            )
        except BaseException:
            sock.close()
            raise
        used = _handshake.sock if context is not False else sock
        _handshake.sock = None
        if used is not None:
            used.settimeout(read_timeout)
        return Opened(con, used)

    def connect() -> Opened:
        try:
            return attempt(ssl_context)
        except driver().InterfaceError as error:
            # libpq's prefer: a server without TLS answers the SSL request with "N" (pg8000 then says
            # "Server refuses SSL"); connect again in plain text.
            if not fall_back or "refuses SSL" not in str(error):
                raise
        return attempt(False)

    return connect


def _cloud_sql_connect(settings: Settings, *, read_timeout: float | None) -> Callable[[], Opened]:
    global _connector
    # Lazily: functions configured with a plain URL never load the connector.
    from google.cloud.sql.connector import Connector, IPTypes

    if _connector is None:
        _connector = Connector(refresh_strategy="lazy", ip_type=IPTypes[settings.db_ip_type.upper()])
        atexit.register(_connector.close)
    connector = _connector
    kwargs: dict[str, Any] = {
        "user": settings.db_user,
        "db": settings.db_name,
        "enable_iam_auth": settings.db_iam_auth,
        "application_name": APPLICATION_NAME,
    }
    if not settings.db_iam_auth:
        kwargs["password"] = settings.db_password
    if read_timeout is not None:
        # The connector's socket is out of reach, so the server bounds each statement instead.
        kwargs["startup_params"] = {"statement_timeout": str(int(read_timeout * 1000))}

    def connect() -> Opened:
        return Opened(connector.connect(settings.cloud_sql_instance, "pg8000", **kwargs), None)

    return connect


def connect_function(settings: Settings, *, read_timeout: float | None) -> Callable[[], Opened]:
    if settings.uses_cloud_sql:
        return _cloud_sql_connect(settings, read_timeout=read_timeout)
    return _url_connect(settings, read_timeout=read_timeout)


def describe(settings: Settings) -> str:
    """Where connections go, for logs: never the password."""
    if settings.uses_cloud_sql:
        return f"Cloud SQL instance {settings.cloud_sql_instance} (database {settings.db_name}, user {settings.db_user})"
    if not settings.database_url:
        return "no database configured"
    target = parse_database_url(settings.database_url)
    where = target.unix_sock or f"{target.host or 'localhost'}:{target.port}"
    return (
        f"{where} (database {target.database or target.user or 'postgres'}, user {target.user or 'postgres'})"
    )

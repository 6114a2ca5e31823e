"""The database layer's own behaviour: the autocommit and transaction helpers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from common import db as common_db
from common.errors import ConfigError


def test_transaction_rolls_back_everything_on_error(app_env: dict[str, str], db: sa.Engine) -> None:
    user = f"tx-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError), common_db.transaction() as conn:
        conn.execute("INSERT INTO users (id) VALUES (:u)", {"u": user})
        raise RuntimeError("boom")
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users WHERE id = :u"), {"u": user}).scalar() == 0


def test_transaction_commits_on_success_and_connection_autocommits(
    app_env: dict[str, str], db: sa.Engine
) -> None:
    a, b = f"tx-{uuid.uuid4().hex[:8]}", f"ac-{uuid.uuid4().hex[:8]}"
    with common_db.transaction() as conn:
        conn.execute("INSERT INTO users (id) VALUES (:u)", {"u": a})
    with common_db.connection() as conn:
        conn.execute("INSERT INTO users (id) VALUES (:u)", {"u": b})
        # Autocommit: visible to another connection before this one is returned.
        with db.connect() as other:
            assert other.execute(sa.text("SELECT count(*) FROM users WHERE id = :u"), {"u": b}).scalar() == 1
    with db.connect() as conn:
        assert (
            conn.execute(
                sa.text("SELECT count(*) FROM users WHERE id IN (:a, :b)"), {"a": a, "b": b}
            ).scalar()
            == 2
        )


def test_unreachable_database_is_database_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.errors import DatabaseUnavailable
    from tests.support import free_port

    monkeypatch.setenv("DYLEN_AUTH_MODE", "dev")
    monkeypatch.setenv("DYLEN_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    monkeypatch.setenv("DYLEN_DB_CONNECT_TIMEOUT_SECONDS", "1")
    common_db.dispose_pool()
    try:
        with pytest.raises(DatabaseUnavailable), common_db.connection() as conn:
            conn.execute("SELECT 1")
    finally:
        common_db.dispose_pool()


# --- hot statements (common.db.Statement) --------------------------------------------------------


@pytest.fixture
def scratch_table(db: sa.Engine) -> Iterator[str]:
    name = f"scratch_{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {name} (a int PRIMARY KEY)"))
        conn.execute(sa.text(f"INSERT INTO {name} VALUES (1), (2)"))
    yield name
    with db.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {name}"))


class FlushCounter:
    """Counts pg8000's socket flushes: one per round trip to the server."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import pg8000.core

        self.count = 0
        real = pg8000.core._flush

        def counting(sock: object) -> None:
            self.count += 1
            real(sock)

        monkeypatch.setattr(pg8000.core, "_flush", counting)

    def during(self, action: Callable[[], object]) -> int:
        before = self.count
        action()
        return self.count - before


def test_a_prepared_statement_costs_one_round_trip_once_prepared_on_its_connection(
    app_env: dict[str, str], scratch_table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushes = FlushCounter(monkeypatch)
    select = common_db.Statement(f"SELECT a, a * 10 AS ten FROM {scratch_table} WHERE a = :a", prepare=True)
    plain = common_db.text(f"SELECT a FROM {scratch_table} WHERE a = :a")
    with common_db.connection() as conn:
        first = flushes.during(lambda: conn.execute(select, {"a": 1}))
        again = flushes.during(lambda: conn.execute(select, {"a": 2}))
        unprepared = flushes.during(lambda: conn.execute(plain, {"a": 2}))
        row = conn.execute(select, {"a": 2}).one()
        assert (row.a, row.ten) == (2, 20)
        assert conn.execute(select, {"a": 3}).first() is None
        assert conn.execute(plain, {"a": 1}).scalar_one() == 1
    assert (first, again, unprepared) == (2, 1, 3)


def test_a_prepared_statement_survives_a_table_change_and_a_session_reset(
    app_env: dict[str, str], scratch_table: str
) -> None:
    select = common_db.Statement(f"SELECT * FROM {scratch_table} WHERE a = :a", prepare=True)
    with common_db.connection() as conn:
        assert tuple(conn.execute(select, {"a": 1}).one()) == (1,)
        # A migration changes the row type: PostgreSQL refuses the cached plan (0A000).
        conn.exec_driver_sql(f"ALTER TABLE {scratch_table} ADD COLUMN b int DEFAULT 7")
        assert tuple(conn.execute(select, {"a": 1}).one()) == (1, 7)
        # A pooler or an operator resets the session: the statement no longer exists (26000).
        conn.exec_driver_sql("DEALLOCATE ALL")
        assert tuple(conn.execute(select, {"a": 2}).one()) == (2, 7)


def test_a_stale_prepared_statement_inside_a_transaction_fails_that_transaction_only(
    app_env: dict[str, str], scratch_table: str
) -> None:
    select = common_db.Statement(f"SELECT * FROM {scratch_table} WHERE a = :a", prepare=True)
    with common_db.connection() as conn:
        conn.execute(select, {"a": 1}).one()
        conn.exec_driver_sql(f"ALTER TABLE {scratch_table} ADD COLUMN b int DEFAULT 7")
    # The pool hands back the same connection (nothing else runs in this process).
    with pytest.raises(common_db.QueryError) as refused, common_db.transaction() as conn:
        conn.execute(select, {"a": 1}).one()
    assert refused.value.sqlstate == "0A000"
    with common_db.connection() as conn:
        assert tuple(conn.execute(select, {"a": 1}).one()) == (1, 7)


def test_a_refused_statement_is_a_query_error_and_the_connection_stays_usable(
    app_env: dict[str, str], scratch_table: str
) -> None:
    insert = common_db.Statement(f"INSERT INTO {scratch_table} (a) VALUES (:a)", prepare=True)
    with common_db.connection() as conn:
        assert conn.execute(insert, {"a": 3}).rowcount == 1
        with pytest.raises(common_db.QueryError) as duplicate:
            conn.execute(insert, {"a": 3})
        assert duplicate.value.unique_violation
        with pytest.raises(common_db.QueryError, match="nope"):
            conn.execute(f"SELECT nope FROM {scratch_table} WHERE a = :a", {"a": 1})
        assert conn.execute(f"SELECT count(*) FROM {scratch_table} WHERE a > :a", {"a": 0}).scalar() == 3


class _RecordingSocket:
    """pg8000's buffered socket, with what the client writes kept for the test."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.written = bytearray()

    def write(self, data: bytes) -> int:
        self.written += data
        return self.inner.write(data)  # type: ignore[attr-defined,no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def _message_types(wire: bytes) -> list[str]:
    types, at = [], 0
    while at < len(wire):
        types.append(chr(wire[at]))
        at += 1 + int.from_bytes(wire[at + 1 : at + 5], "big")
    return types


def test_a_prepared_statement_asks_for_one_reply_and_reads_any_size_of_it(
    app_env: dict[str, str], scratch_table: str
) -> None:
    small = common_db.Statement(
        f"SELECT a, CAST(:s AS text) AS s FROM {scratch_table} WHERE a = :a", prepare=True
    )
    rows = common_db.Statement(
        "SELECT g, repeat('x', :width) AS pad FROM generate_series(1, :n) AS g", prepare=True
    )
    with common_db.connection() as conn:
        conn.execute(small, {"a": 1, "s": None})  # prepared now; the next executions are what we check
        record = conn._record
        socket = record.con._sock = _RecordingSocket(record.con._sock)
        # Given a prepared statement, when it runs, then the client sends Bind, Execute, Sync and no
        # Flush: the server answers once, in one packet, instead of after every message.
        assert tuple(conn.execute(small, {"a": 2, "s": "é"}).one()) == (2, "é")
        assert _message_types(bytes(socket.written)) == ["B", "E", "S"]
        # Replies larger than the read buffer, one huge row and many small ones, arrive whole.
        big = conn.execute(rows, {"width": 200_000, "n": 3}).all()
        assert [(r.g, len(r.pad)) for r in big] == [(1, 200_000), (2, 200_000), (3, 200_000)]
        many = conn.execute(rows, {"width": 3, "n": 20_000}).all()
        assert len(many) == 20_000 and many[-1] == (20_000, "xxx")
        assert conn.execute(small, {"a": 1, "s": None}).one() == (1, None)
        record.con._sock = socket.inner
    assert not record.dead


class _SmallPackets(_RecordingSocket):
    """Lets the reader see at most `limit` bytes at a time, as if every packet were that small."""

    def __init__(self, inner: object, limit: int) -> None:
        super().__init__(inner)
        self.limit = limit

    def peek(self, size: int = 0) -> bytes:
        return self.inner.peek(size)[: self.limit]  # type: ignore[attr-defined,no-any-return]


def test_a_reply_split_at_any_byte_is_read_whole_and_nothing_of_it_is_left_behind(
    app_env: dict[str, str], scratch_table: str
) -> None:
    select = common_db.Statement(
        f"SELECT a, CAST(:s AS text) AS s FROM {scratch_table} ORDER BY a", prepare=True
    )
    with common_db.connection() as conn:
        conn.execute(select, {"s": "x"})
        con = conn._record.con
        real = con._sock
        try:
            for limit in range(1, 64):
                con._sock = _SmallPackets(real, limit)
                rows = conn.execute(select, {"s": f"split-{limit}"}).all()
                assert [tuple(r) for r in rows] == [(1, f"split-{limit}"), (2, f"split-{limit}")]
        finally:
            con._sock = real
        # Had a ReadyForQuery been left in the buffer, this reply would be misread.
        assert conn.execute(select, {"s": "after"}).all()[0] == (1, "after")


def test_a_reply_that_cannot_be_decoded_retires_the_connection(
    app_env: dict[str, str], scratch_table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    select = common_db.Statement(f"SELECT a FROM {scratch_table} WHERE a = :a", prepare=True)
    with common_db.connection() as conn:
        conn.execute(select, {"a": 1})
        funcs = conn._record.prepared[select][2]
        real = funcs[0]
        funcs[0] = lambda text: 1 / 0  # a value this process cannot decode, mid-reply
        with pytest.raises(ZeroDivisionError):
            conn.execute(select, {"a": 1})
        funcs[0] = real
        retired = conn._record
    # The rest of that reply is still unread: the pool closes the connection instead of reusing it.
    assert retired.dead
    with common_db.connection() as conn:
        assert conn._record is not retired
        assert conn.execute(select, {"a": 2}).scalar_one() == 2


def test_a_lost_connection_is_database_unavailable_and_the_pool_recovers(
    app_env: dict[str, str], db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.errors import DatabaseUnavailable

    monkeypatch.setattr(common_db, "PING_AFTER_IDLE_SECONDS", 3600.0)  # the statement meets it, not a ping
    select = common_db.Statement("SELECT pg_backend_pid() AS pid, CAST(:x AS int) AS x", prepare=True)
    with common_db.connection() as conn:
        pid = conn.execute(select, {"x": 1}).one().pid
    # The server ends the session under the pooled connection (as a restart or failover does).
    with db.connect() as admin:
        admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    with pytest.raises(DatabaseUnavailable), common_db.connection() as conn:
        conn.execute(select, {"x": 2})
    with common_db.connection() as conn:
        row = conn.execute(select, {"x": 3}).one()
    assert row.x == 3 and row.pid != pid


def test_an_idle_connection_killed_meanwhile_is_replaced_at_checkout_without_an_error(
    app_env: dict[str, str], db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(common_db, "PING_AFTER_IDLE_SECONDS", 0.0)  # every checkout pings
    with common_db.connection() as conn:
        pid = conn.execute("SELECT pg_backend_pid()").scalar()
    with db.connect() as admin:
        admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    with common_db.connection() as conn:
        assert conn.execute("SELECT pg_backend_pid()").scalar() != pid


def test_the_pool_never_opens_more_than_size_plus_overflow_and_a_waiter_gets_503(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.errors import DatabaseUnavailable

    monkeypatch.setenv("DYLEN_DB_POOL_SIZE", "1")
    monkeypatch.setenv("DYLEN_DB_MAX_OVERFLOW", "1")
    monkeypatch.setenv("DYLEN_DB_CONNECT_TIMEOUT_SECONDS", "0.3")
    common_db.dispose_pool()
    with common_db.connection() as first, common_db.connection() as second:
        pids = {c.execute("SELECT pg_backend_pid()").scalar() for c in (first, second)}
        assert len(pids) == 2
        with pytest.raises(DatabaseUnavailable, match="busy"), common_db.connection():
            pass
    # The overflow connection was closed on return; the one kept serves the next checkout.
    with common_db.connection() as again:
        assert again.execute("SELECT pg_backend_pid()").scalar() in pids
    assert common_db.get_pool()._open == 1


def test_reads_are_bounded_except_on_the_migrations_engine(app_env: dict[str, str]) -> None:
    with common_db.connection() as conn:
        sock = conn.driver_connection._usock
        assert sock.gettimeout() == 30.0  # DYLEN_DB_READ_TIMEOUT_SECONDS's default
    engine = common_db.sqlalchemy_engine()  # a migration may rightly rebuild an index for long
    try:
        with engine.connect() as migrating:
            assert migrating.connection.dbapi_connection._usock.gettimeout() is None  # type: ignore[union-attr]
            assert migrating.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()


def test_a_statement_slower_than_the_read_timeout_is_database_unavailable(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.errors import DatabaseUnavailable

    monkeypatch.setenv("DYLEN_DB_READ_TIMEOUT_SECONDS", "0.5")
    common_db.dispose_pool()
    slow = "SELECT pg_sleep(CAST(:s AS float8)) IS NULL AS slept"
    with pytest.raises(DatabaseUnavailable), common_db.connection() as conn:
        conn.execute(slow, {"s": 3})
    with common_db.connection() as conn:
        assert conn.execute(slow, {"s": 0}).one().slept is not None


# --- TLS to the database (DYLEN_DATABASE_URL's sslmode) ----------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@127.0.0.1/db", False),  # loopback: no TLS, no per-connection SSL context
        ("postgresql://u@localhost:5433/db", False),
        ("postgresql://u@[::1]/db", False),
        ("postgresql://u@10.1.2.3/db", None),  # elsewhere: pg8000's own "prefer"
        ("postgresql://u@db.internal/db?sslmode=disable", False),
        ("postgresql://u@127.0.0.1/db?sslmode=prefer", None),
    ],
)
def test_sslmode_maps_to_pg8000s_ssl_context(url: str, expected: object) -> None:
    assert common_db.ssl_argument(url) is expected


def test_sslmode_require_and_verify_full_build_one_context() -> None:
    import ssl

    required = common_db.ssl_argument("postgresql://u@10.1.2.3/db?sslmode=require")
    assert isinstance(required, ssl.SSLContext)
    assert required.verify_mode == ssl.CERT_NONE and not required.check_hostname
    verified = common_db.ssl_argument("postgresql://u@10.1.2.3/db?sslmode=verify-full")
    assert isinstance(verified, ssl.SSLContext)
    assert verified.verify_mode == ssl.CERT_REQUIRED and verified.check_hostname


def test_a_url_with_sslmode_disable_connects(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support import base_env

    for key, value in base_env(database_url + "?sslmode=disable").items():
        if key.startswith("DYLEN_"):
            monkeypatch.setenv(key, value)
    common_db.dispose_pool()
    try:
        with common_db.connection() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").scalar() is False
    finally:
        common_db.dispose_pool()


def test_urls_parse_like_libpq_and_pg8000() -> None:
    target = common_db.parse_url("postgresql://app:p%40ss%2Fword@db.internal:6432/dylen?sslmode=require")
    assert (target.user, target.password, target.host, target.port, target.database, target.sslmode) == (
        "app",
        "p@ss/word",
        "db.internal",
        6432,
        "dylen",
        "require",
    )
    socket_url = "postgresql+pg8000://app@/dylen?unix_sock=/cloudsql/p:r:i/.s.PGSQL.5432"
    unix = common_db.parse_url(socket_url)
    assert (unix.host, unix.port, unix.unix_sock) == (None, 5432, "/cloudsql/p:r:i/.s.PGSQL.5432")
    assert common_db.ssl_argument(socket_url) is False  # a local socket needs no TLS
    with pytest.raises(ConfigError):
        common_db.parse_url("mysql://app@db/dylen")

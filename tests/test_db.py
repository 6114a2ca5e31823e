"""The database layer's own behaviour: the autocommit and transaction helpers."""

from __future__ import annotations

import ast
import contextlib
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from common.platform.config import parse_database_url, reset_settings
from common.platform.db import connect, migrate
from common.platform.db import pool as common_db
from common.platform.db.statement import PREPARED_PER_CONNECTION
from common.platform.errors import ConfigError
from tests.factories import make_job
from tests.support import ROOT


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
    from common.platform.errors import DatabaseUnavailable
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


# --- hot statements (common.platform.db.Statement) --------------------------------------------------------


@pytest.fixture
def scratch_table(db: sa.Engine) -> Iterator[str]:
    name = f"scratch_{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {name} (a int PRIMARY KEY)"))
        conn.execute(sa.text(f"INSERT INTO {name} VALUES (1), (2)"))
    yield name
    with db.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {name}"))


def prepared_here(conn: common_db.Connection, statement: common_db.Statement) -> int:
    """How many times the server holds `statement` prepared for this session."""
    return int(
        conn.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = :sql",
            {"sql": statement.compiled()[0]},
        ).value()
    )


def test_a_prepared_statement_is_prepared_once_per_connection_and_then_run_by_name(
    app_env: dict[str, str], scratch_table: str
) -> None:
    select = common_db.Statement(f"SELECT a, a * 10 AS ten FROM {scratch_table} WHERE a = :a", prepare=True)
    plain = common_db.Statement(f"SELECT a FROM {scratch_table} WHERE a = :a")
    with common_db.connection() as conn:
        assert prepared_here(conn, select) == 0
        for a in (1, 2, 1):
            conn.execute(select, {"a": a})
        row = conn.execute(select, {"a": 2}).one()
        assert (row.a, row.ten) == (2, 20)
        assert conn.execute(select, {"a": 3}).first() is None
        assert conn.execute(plain, {"a": 1}).value() == 1
        assert prepared_here(conn, select) == 1
        assert prepared_here(conn, plain) == 0  # run unnamed, nothing left on the server


def prepared_on_server(conn: common_db.Connection) -> int:
    """How many statements the server holds prepared for this session, whatever their SQL."""
    return int(conn.execute("SELECT count(*) FROM pg_prepared_statements").value())


@pytest.fixture
def one_connection(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool of exactly one connection: every checkout meets the same session."""
    monkeypatch.setenv("DYLEN_DB_POOL_SIZE", "1")
    monkeypatch.setenv("DYLEN_DB_MAX_OVERFLOW", "0")
    common_db.dispose_pool()


# The statement a section reads its parent's plan with (get_plan), which once built its Statement on
# every call: one pooled session then held a new prepared statement per section, 1,000 after 1,000.
SECTION_PLAN = "SELECT request_json, plan FROM jobs WHERE id = :id"


def test_a_thousand_sections_leave_one_prepared_statement_on_their_connection(
    one_connection: None, db: sa.Engine
) -> None:
    with db.begin() as given:
        parent = make_job(given, user_id=None, status="done")  # a row nothing else acts on
    with common_db.connection() as conn:
        pid = conn.execute("SELECT pg_backend_pid()").scalar()
    for _ in range(1000):
        with common_db.connection() as conn:
            # A new Statement per call, as get_plan built it: the same SQL is the same statement.
            statement = common_db.Statement(SECTION_PLAN, prepare=True)
            assert conn.execute(statement, {"id": parent}).one().request_json["job_kind"] == "lesson"
    with common_db.connection() as conn:
        # The same session throughout (a reconnect would have hidden a leak).
        assert conn.execute("SELECT pg_backend_pid()").scalar() == pid
        assert prepared_here(conn, statement) == 1
        assert prepared_on_server(conn) == conn.prepared_count == 1
    assert common_db.get_pool().open == 1


def test_more_statements_than_a_connection_keeps_close_the_least_recently_used(one_connection: None) -> None:
    limit = PREPARED_PER_CONNECTION
    hot = common_db.Statement("SELECT CAST(:x AS int) AS y", prepare=True)
    others = [
        common_db.Statement(f"SELECT CAST(:x AS int) + {i} AS y", prepare=True) for i in range(1, limit + 40)
    ]
    with common_db.connection() as conn:
        for i, statement in enumerate(others, start=1):
            assert conn.execute(statement, {"x": 1}).value() == 1 + i
            assert conn.execute(hot, {"x": i}).value() == i  # used all along: never the one closed
        assert prepared_on_server(conn) == conn.prepared_count == limit
        assert prepared_here(conn, hot) == 1
        assert prepared_here(conn, others[0]) == 0  # closed on the server, not only forgotten
        # One closed long ago is prepared again when it comes back, and answers right.
        assert conn.execute(others[0], {"x": 5}).value() == 6
        assert prepared_on_server(conn) == conn.prepared_count == limit


def test_a_statement_the_session_lost_is_prepared_again(one_connection: None) -> None:
    select = common_db.Statement("SELECT CAST(:x AS int) AS y", prepare=True)
    with common_db.connection() as conn:
        assert conn.execute(select, {"x": 1}).value() == 1
        conn.execute_simple("DEALLOCATE ALL")  # as a session reset does: 26000 on the next run
        assert conn.execute(select, {"x": 2}).value() == 2
        assert prepared_on_server(conn) == conn.prepared_count == 1


def test_a_statement_whose_table_changed_is_replaced_not_left_on_the_server(
    one_connection: None, scratch_table: str, db: sa.Engine
) -> None:
    select = common_db.Statement(f"SELECT * FROM {scratch_table} WHERE a = :a", prepare=True)
    with common_db.connection() as conn:
        assert conn.execute(select, {"a": 1}).one() == (1,)
        with db.begin() as migration:
            migration.execute(sa.text(f"ALTER TABLE {scratch_table} ADD COLUMN b int DEFAULT 7"))
        # 0A000 inside a transaction: it is aborted, nothing to retry in; the old form is dropped.
        with pytest.raises(common_db.QueryError, match="0A000"), conn.transaction():
            conn.execute(select, {"a": 1})
        assert conn.execute(select, {"a": 1}).one() == (1, 7)
        with db.begin() as migration:
            migration.execute(sa.text(f"ALTER TABLE {scratch_table} ADD COLUMN c int DEFAULT 8"))
        assert conn.execute(select, {"a": 2}).one() == (2, 7, 8)  # outside one: prepared again at once
        assert prepared_here(conn, select) == 1
        assert prepared_on_server(conn) == conn.prepared_count == 1


def prepared_in_functions(source: str) -> list[int]:
    """Lines where `Statement(..., prepare=...)`, or a `transitions.Output` (a prepared Statement),
    is built inside a function or lambda body."""
    found = []
    for scope in ast.walk(ast.parse(source)):
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body: list[ast.AST] = list(scope.body)
        elif isinstance(scope, ast.Lambda):
            body = [scope.body]
        else:
            continue
        for node in (n for part in body for n in ast.walk(part)):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name == "Output" or (
                name == "Statement"
                and any(
                    k.arg == "prepare" and not (isinstance(k.value, ast.Constant) and not k.value.value)
                    for k in node.keywords
                )
            ):
                found.append(node.lineno)
    return sorted(set(found))


def test_the_prepared_checker_finds_what_it_is_for() -> None:
    sample = (
        "A = Statement('SELECT 1', prepare=True)\n"
        "def f(conn, s=Statement('SELECT 2', prepare=True)):\n"
        "    plain = Statement('SELECT 3')\n"
        "    off = db.Statement('SELECT 4', prepare=False)\n"
        "    return conn.execute(db.Statement('SELECT 5', prepare=True))\n"
        "class Q:\n"
        "    B = Statement('SELECT 6', prepare=True)\n"
        "    async def g(self, hot):\n"
        "        return Statement('SELECT 7', prepare=hot)\n"
        "h = lambda: Statement('SELECT 8', prepare=True)\n"
        "LESSON = transitions.Output('INSERT ...')\n"
        "def per_call():\n"
        "    return transitions.Output('INSERT ...')\n"
    )
    assert prepared_in_functions(sample) == [5, 9, 10, 13]


def test_prepared_statements_are_declared_at_module_level() -> None:
    """The pool finds a prepared statement by its SQL whatever object carries it, but a Statement
    built per call still compiles its SQL and builds its row type per call: hot SQL is declared once."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted((ROOT / "common").rglob("*.py"))
        for line in prepared_in_functions(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_replies_of_any_size_arrive_whole(app_env: dict[str, str]) -> None:
    rows = common_db.Statement(
        "SELECT g, repeat('x', :width) AS pad FROM generate_series(1, :n) AS g", prepare=True
    )
    with common_db.connection() as conn:
        big = conn.execute(rows, {"width": 200_000, "n": 3}).all()
        assert [(r.g, len(r.pad)) for r in big] == [(1, 200_000), (2, 200_000), (3, 200_000)]
        many = conn.execute(rows, {"width": 3, "n": 20_000}).all()
        assert len(many) == 20_000 and many[-1] == (20_000, "xxx")
        assert conn.execute(rows, {"width": 1, "n": 1}).one() == (1, "x")


def test_a_lost_connection_is_database_unavailable_and_the_pool_recovers(
    app_env: dict[str, str], db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.platform.errors import DatabaseUnavailable

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
    from common.platform.errors import DatabaseUnavailable

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
    assert common_db.get_pool().open == 1


def test_reads_are_bounded_except_on_the_migrations_engine(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.platform.errors import DatabaseUnavailable

    monkeypatch.setenv("DYLEN_DB_READ_TIMEOUT_SECONDS", "0.3")
    common_db.dispose_pool()
    slow = "SELECT pg_sleep(0.8) IS NULL AS slept"
    with pytest.raises(DatabaseUnavailable), common_db.connection() as conn:
        conn.execute_simple(slow)
    engine = migrate.sqlalchemy_engine()  # a migration may rightly rebuild an index for long
    try:
        with engine.connect() as migrating:
            assert migrating.exec_driver_sql(slow).scalar() is not None
    finally:
        engine.dispose()


def test_a_statement_slower_than_the_read_timeout_is_database_unavailable(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.platform.errors import DatabaseUnavailable

    monkeypatch.setenv("DYLEN_DB_READ_TIMEOUT_SECONDS", "0.5")
    common_db.dispose_pool()
    slow = "SELECT pg_sleep(CAST(:s AS float8)) IS NULL AS slept"
    with pytest.raises(DatabaseUnavailable), common_db.connection() as conn:
        conn.execute(slow, {"s": 3})
    with common_db.connection() as conn:
        assert conn.execute(slow, {"s": 0}).one().slept is not None


# --- TLS to the database (DYLEN_DATABASE_URL's sslmode) ----------------------------------------------


@pytest.mark.parametrize(
    ("url", "tls"),
    [
        ("postgresql://u@127.0.0.1/db", False),  # loopback: no TLS, no per-connection SSL context
        ("postgresql://u@localhost:5433/db", False),
        ("postgresql://u@[::1]/db", False),
        ("postgresql://u@10.1.2.3/db", True),  # elsewhere: libpq's "prefer"
        ("postgresql://u@db.internal/db?sslmode=disable", False),
        ("postgresql://u@127.0.0.1/db?sslmode=prefer", True),
    ],
)
def test_sslmode_maps_to_a_tls_context_or_none(url: str, tls: bool) -> None:
    import ssl

    context = connect.ssl_argument(url)
    if not tls:
        assert context is False
    else:
        assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_NONE


def test_sslmode_require_and_verify_full_build_one_context() -> None:
    import ssl

    required = connect.ssl_argument("postgresql://u@10.1.2.3/db?sslmode=require")
    assert isinstance(required, ssl.SSLContext)
    assert required.verify_mode == ssl.CERT_NONE and not required.check_hostname
    verified = connect.ssl_argument("postgresql://u@10.1.2.3/db?sslmode=verify-full")
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
            assert conn.execute_simple("SELECT 1").scalar() == 1
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").scalar() is False
    finally:
        common_db.dispose_pool()


def test_urls_parse_like_libpq_and_pg8000() -> None:
    target = parse_database_url("postgresql://app:p%40ss%2Fword@db.internal:6432/dylen?sslmode=require")
    assert (target.user, target.password, target.host, target.port, target.database, target.sslmode) == (
        "app",
        "p@ss/word",
        "db.internal",
        6432,
        "dylen",
        "require",
    )
    socket_url = "postgresql+pg8000://app@/dylen?unix_sock=/cloudsql/p:r:i/.s.PGSQL.5432"
    unix = parse_database_url(socket_url)
    assert (unix.host, unix.port, unix.unix_sock) == (None, 5432, "/cloudsql/p:r:i/.s.PGSQL.5432")
    assert connect.ssl_argument(socket_url) is False  # a local socket needs no TLS
    with pytest.raises(ConfigError):
        parse_database_url("mysql://app@db/dylen")


def test_sslmode_prefer_falls_back_to_plain_text_and_require_refuses_it(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.platform.errors import DatabaseUnavailable

    # The test server has no TLS: it answers the SSL request "N".
    with common_db_env(database_url + "?sslmode=prefer", monkeypatch), common_db.connection() as conn:
        assert conn.execute_simple("SELECT 1").scalar() == 1
    with (
        common_db_env(database_url + "?sslmode=require", monkeypatch),
        pytest.raises(DatabaseUnavailable),
        common_db.connection(),
    ):
        pass


@contextlib.contextmanager
def common_db_env(url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from tests.support import base_env

    for key, value in base_env(url).items():
        if key.startswith("DYLEN_"):
            monkeypatch.setenv(key, value)
    reset_settings()
    common_db.dispose_pool()
    try:
        yield
    finally:
        common_db.dispose_pool()


def test_a_server_out_of_connections_is_database_unavailable_not_a_query_error(
    database_url: str, db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.platform.errors import DatabaseUnavailable

    # Given a role the server may not give another connection (as with max_connections reached)
    role = f"full_{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0'))
    try:
        url = sa.engine.make_url(database_url).set(username=role).render_as_string(hide_password=False)
        # Then a checkout is a retryable 503, not an internal error
        with (
            common_db_env(url, monkeypatch),
            pytest.raises(DatabaseUnavailable, match="busy"),
            common_db.connection(),
        ):
            pass
    finally:
        with db.begin() as conn:
            conn.execute(sa.text(f'DROP ROLE "{role}"'))

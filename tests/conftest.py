"""Fixtures: a fresh database built from the migrations, and real function processes over it."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import (
    FunctionServer,
    Stack,
    StackFactory,
    base_env,
    free_port,
    migrated_database,
    stop_all,
)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A server to create the test database on: DYLEN_TEST_DATABASE_URL, else an embedded one."""
    configured = os.environ.get("DYLEN_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    from devtools.embedded_pg import EmbeddedPostgres

    # Not under pytest's tmp root: every pytest session that starts on this machine chmods
    # /tmp/pytest-of-<user> back to 0700, locking the server's own OS user out of its data
    # directory (PANIC: could not open pg_control) when sessions run side by side.
    root = Path(tempfile.mkdtemp(prefix="dylen-test-pg-"))
    pg = EmbeddedPostgres(root / "data", durable=False)
    try:
        pg.start()
        yield pg.url
    finally:
        pg.destroy()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(pg_admin_url: str) -> Iterator[str]:
    """A database of its own for this run, built by `python -m common.cli migrate`."""
    with migrated_database(pg_admin_url) as url:
        yield url


@pytest.fixture(scope="session")
def db(database_url: str) -> Iterator[sa.Engine]:
    """An engine on the test database, for Given steps (factories) and Then checks."""
    engine = sa.create_engine(
        sa.engine.make_url(database_url).set(drivername="postgresql+pg8000"), pool_size=10
    )
    yield engine
    engine.dispose()


@pytest.fixture
def app_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point in-process `common` code at the test database (for tests that call it directly)."""
    from common.platform import db as common_db

    env = base_env(database_url)
    for key, value in env.items():
        if key.startswith("DYLEN_"):
            monkeypatch.setenv(key, value)
    common_db.dispose_pool()
    yield env
    common_db.dispose_pool()


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("function-logs")


@pytest.fixture(scope="session")
def calls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tests.generators records each handler run, to count them per job."""
    return tmp_path_factory.mktemp("generator-calls")


@pytest.fixture(scope="session")
def make_stack(database_url: str, logs_dir: Path, calls_dir: Path) -> Iterator[StackFactory]:
    """Start (once per distinct configuration) process_job and the user functions.

    `make_stack(DYLEN_JOBS_AUTO_PROCESS="false")` shares processes with every other test asking for
    the same configuration, so the suite pays each cold start once.
    """
    stacks: dict[tuple[tuple[str, str], ...], Stack] = {}

    def factory(**overrides: str) -> Stack:
        key = tuple(sorted(overrides.items()))
        if key not in stacks:
            env = base_env(database_url, DYLEN_TEST_CALLS_DIR=str(calls_dir), **overrides)
            # process_job dispatches too (a lesson's sections), so it is told its own URL.
            port = free_port()
            env.setdefault("DYLEN_PROCESS_JOB_URL", f"http://127.0.0.1:{port}/")
            process = FunctionServer("process_job", env, logs_dir, port=port).start(wait=False)
            servers = {"process_job": process}
            for name in ("create_job", "get_job", "get_lesson", "list_lessons", "cancel_job"):
                servers[name] = FunctionServer(name, env, logs_dir).start(wait=False)
            for server in servers.values():
                server.wait_ready()
            stacks[key] = Stack(servers)
        return stacks[key]

    yield factory
    for stack in stacks.values():
        stack.http.close()
    stop_all(server for stack in stacks.values() for server in stack.servers.values())


@pytest.fixture(scope="session")
def stack(make_stack: StackFactory) -> Stack:
    """The default deployment: local dispatch on, built-in generator."""
    return make_stack()


@pytest.fixture(scope="session")
def manual_stack(make_stack: StackFactory) -> Stack:
    """Auto-process off and the test generator: the test delivers tasks itself."""
    return make_stack(
        DYLEN_JOBS_AUTO_PROCESS="false",
        DYLEN_LESSON_GENERATOR="tests.generators:generate",
        DYLEN_JOB_MAX_ATTEMPTS="3",
    )


@pytest.fixture
def user() -> str:
    """A user of this test alone, so tests sharing processes never see each other's data."""
    return f"user-{uuid.uuid4().hex[:12]}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The browser tests' screenshots, for a person to look at."""
    from tests.browser import TAKEN

    if TAKEN:
        terminalreporter.section("screenshots")
        for path in TAKEN:
            terminalreporter.write_line(str(path))

"""The database goes away and comes back: a PostgreSQL server this module owns, real processes.

While it is down every function answers 503 problem+json quickly; when it is back the same
processes (never restarted) serve again, and every job accepted before or after ends `done` with
exactly one lesson.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from common.platform.db import PING_AFTER_IDLE_SECONDS
from tests.faults import FreezableProxy, kill_all, rescue, start_stack, wait_until
from tests.support import ROOT, TASK_SECRET, FunctionServer, Stack, base_env, lesson_body, session

PROBLEM = "application/problem+json"
ALL = ("create_job", "get_job", "get_lesson", "list_lessons", "rescue_jobs")


@pytest.fixture(scope="module")
def own_pg() -> Iterator[Any]:
    from devtools.embedded_pg import EmbeddedPostgres

    # Not under pytest's tmp root (see tests/conftest.py, pg_admin_url): any pytest session that
    # starts on this machine chmods it back to 0700, locking the server's OS user out of its data.
    root = Path(tempfile.mkdtemp(prefix="dylen-own-pg-"))
    pg = EmbeddedPostgres(root / "data", durable=False)
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def own_db_url(own_pg: Any) -> str:
    from devtools.embedded_pg import create_database

    create_database(own_pg.url, "faults")
    url = own_pg.url_for("faults")
    env = {**os.environ, "DYLEN_DATABASE_URL": url, "DYLEN_AUTH_MODE": "dev", "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "common.cli", "migrate"], env=env, cwd=ROOT, check=True, capture_output=True
    )
    return url


@pytest.fixture(scope="module")
def own_engine(own_db_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(
        sa.engine.make_url(own_db_url).set(drivername="postgresql+pg8000"), pool_pre_ping=True
    )
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def db_stack(own_db_url: str, logs_dir: Path) -> Iterator[Stack]:
    stack = start_stack(
        own_db_url,
        logs_dir,
        names=ALL,
        DYLEN_DB_CONNECT_TIMEOUT_SECONDS="1",
        DYLEN_JOB_TIMEOUT_SECONDS="3",
        DYLEN_RESCUE_AFTER_SECONDS="1",
        DYLEN_JOB_MAX_ATTEMPTS="10",
    )
    yield stack
    kill_all(stack)


def _pids(stack: Stack) -> dict[str, int]:
    return {name: server.proc.pid for name, server in stack.servers.items() if server.proc}


def _alive(stack: Stack) -> bool:
    return all(server.proc is not None and server.proc.poll() is None for server in stack.servers.values())


def _requests(stack: Stack, user: str) -> dict[str, tuple[str, str, dict[str, Any]]]:
    some_id = str(uuid.uuid4())
    user_h = {"X-Dylen-User": user}
    return {
        "create_job": (
            "POST",
            stack.url("create_job") + "/",
            {"json": lesson_body("Down"), "headers": user_h},
        ),
        "get_job": ("GET", f"{stack.url('get_job')}/{some_id}", {"headers": user_h}),
        "get_lesson": ("GET", f"{stack.url('get_lesson')}/{some_id}", {"headers": user_h}),
        "list_lessons": ("GET", stack.url("list_lessons") + "/", {"headers": user_h}),
        "process_job": (
            "POST",
            stack.url("process_job") + "/",
            {"json": {"job_id": some_id}, "headers": {"X-Dylen-Task-Secret": TASK_SECRET}},
        ),
        "rescue_jobs": (
            "POST",
            stack.url("rescue_jobs") + "/",
            {"headers": {"X-Dylen-Task-Secret": TASK_SECRET}},
        ),
    }


@pytest.mark.parametrize("mode", ["fast", "immediate"])  # clean shutdown, and one like a crash
def test_every_function_answers_503_quickly_while_the_database_is_down(
    own_pg: Any, db_stack: Stack, user: str, mode: str
) -> None:
    pids = _pids(db_stack)
    # Warm every pool first, so the outage has stale connections to find.
    for name, (method, url, kwargs) in _requests(db_stack, user).items():
        assert db_stack.http.request(method, url, timeout=10, **kwargs).status_code < 500, name
    own_pg.stop(mode)
    try:
        for name, (method, url, kwargs) in _requests(db_stack, user).items():
            started = time.monotonic()
            response = db_stack.http.request(method, url, timeout=10, **kwargs)
            elapsed = time.monotonic() - started
            assert response.status_code == 503, (name, response.status_code, response.text)
            assert response.headers["Content-Type"].startswith(PROBLEM), name
            assert response.headers.get("Retry-After"), name
            problem = response.json()
            assert problem["type"].endswith("/database-unavailable"), name
            assert "Traceback" not in response.text and "pg8000" not in response.text
            assert elapsed < 3, (name, elapsed)
    finally:
        own_pg.start()
    # The same processes serve again: stale pooled connections were replaced, nobody restarted.
    for name, (method, url, kwargs) in _requests(db_stack, user).items():
        response = db_stack.http.request(method, url, timeout=10, **kwargs)
        assert response.status_code < 500, (name, response.text)
    assert _pids(db_stack) == pids and _alive(db_stack)


def test_a_database_restart_during_a_stream_of_creates_loses_nothing(
    own_pg: Any, db_stack: Stack, own_engine: sa.Engine
) -> None:
    pids = _pids(db_stack)
    accepted: list[tuple[str, str]] = []
    refused: list[int] = []
    unexpected: list[str] = []
    stop = threading.Event()

    def produce(worker: int) -> None:
        http = session()
        user = f"stream-{worker}-{uuid.uuid4().hex[:6]}"
        deadline = time.monotonic() + 60  # bound even if the test body fails to set `stop`
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                response = http.post(
                    db_stack.url("create_job") + "/",
                    json=lesson_body(f"Stream {worker}"),
                    headers={"X-Dylen-User": user},
                    timeout=10,
                )
            except requests.RequestException as error:
                unexpected.append(repr(error))
                continue
            if response.status_code == 202:
                accepted.append((user, response.json()["job_id"]))
            elif response.status_code == 503 and response.headers["Content-Type"].startswith(PROBLEM):
                refused.append(503)
                time.sleep(0.05)
            else:
                unexpected.append(f"{response.status_code} {response.text[:200]}")
            time.sleep(0.01)

    producers = [threading.Thread(target=produce, args=(i,)) for i in range(3)]
    for thread in producers:
        thread.start()
    try:
        time.sleep(1.5)
        before_outage = len(accepted)
        own_pg.stop()
        time.sleep(2)
        during_outage = len(accepted)
        own_pg.start()
        time.sleep(2)
    finally:
        stop.set()
        for thread in producers:
            thread.join(20)
    assert not unexpected, unexpected[:5]
    assert before_outage > 0, "no create succeeded before the outage"
    assert refused, "no create was refused with 503 during the outage"
    assert len(accepted) > during_outage, "no create succeeded after the restart"

    # Jobs caught by the outage mid-dispatch or mid-run are finished by redelivery or rescue_jobs.
    # That includes a job whose insert committed just as the server went down, so its create was
    # answered 503 (the client would retry with the same idempotency key): every job, not only the
    # accepted ones, must end done.
    ids = [job_id for _user, job_id in accepted]

    def all_done() -> bool:
        with own_engine.connect() as conn:
            open_jobs = conn.execute(sa.text("SELECT count(*) FROM jobs WHERE status <> 'done'")).scalar_one()
        if open_jobs:
            rescue(db_stack)
        return open_jobs == 0

    wait_until(all_done, timeout=60, interval=1, what="every job to be done")

    with own_engine.connect() as conn:
        statuses = dict(conn.execute(sa.text("SELECT status, count(*) FROM jobs GROUP BY status")).all())
        orphans = conn.execute(
            sa.text(
                "SELECT count(*) FROM jobs j WHERE j.status = 'done' AND j.parent_id IS NULL AND "
                "(SELECT count(*) FROM lessons l WHERE l.job_id = j.id) <> 1"
            )
        ).scalar_one()
        lesson_jobs = conn.execute(
            sa.text("SELECT count(*) FROM jobs WHERE status = 'done' AND parent_id IS NULL")
        ).scalar_one()
        lessons = conn.execute(sa.text("SELECT count(*) FROM lessons")).scalar_one()
        known = conn.execute(
            sa.text("SELECT count(*) FROM jobs WHERE id::text = ANY(:ids)"), {"ids": ids}
        ).scalar_one()
    assert known == len(ids)  # every 202 is a committed job
    # No job row without its outcome: every job in this database is done, and every lesson job (the
    # built-in generator plans: its sections are jobs too) with exactly one lesson.
    assert set(statuses) == {"done"}, statuses
    assert orphans == 0
    assert lessons == lesson_jobs
    assert _pids(db_stack) == pids and _alive(db_stack)


def test_a_database_that_accepts_but_never_answers_gives_503_within_the_connect_timeout(
    logs_dir: Path, user: str
) -> None:
    # A listener that accepts TCP connections and never speaks: the worst case for a connect.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        env = base_env(f"postgresql://postgres@127.0.0.1:{port}/none", DYLEN_DB_CONNECT_TIMEOUT_SECONDS="1")
        server = FunctionServer("get_job", env, logs_dir).start()
        try:
            started = time.monotonic()
            response = requests.get(
                f"{server.url}/{uuid.uuid4()}", headers={"X-Dylen-User": user}, timeout=15
            )
            elapsed = time.monotonic() - started
        finally:
            server.kill()
    assert response.status_code == 503, response.text
    assert response.headers["Content-Type"].startswith(PROBLEM)
    assert elapsed < 4, elapsed


@pytest.mark.parametrize(
    ("idle", "read_timeout", "bound"),
    [
        # Frozen right after use: no checkout ping, the statement's read times out.
        (0.0, "2", 5.0),
        # Frozen after the pool sat idle: the checkout ping gives up within the connect timeout,
        # long before the (default) read timeout.
        (PING_AFTER_IDLE_SECONDS + 0.5, "30", 5.0),
    ],
    ids=["busy-connection", "idle-connection"],
)
def test_a_database_that_stops_answering_on_open_connections_gives_503_not_a_hang(
    own_pg: Any, own_db_url: str, logs_dir: Path, user: str, idle: float, read_timeout: str, bound: float
) -> None:
    # Given get_job with warm pooled connections through a relay to PostgreSQL
    proxy = FreezableProxy(own_pg.port)
    url = sa.engine.make_url(own_db_url).set(port=proxy.port).render_as_string(hide_password=False)
    env = base_env(url, DYLEN_DB_CONNECT_TIMEOUT_SECONDS="1", DYLEN_DB_READ_TIMEOUT_SECONDS=read_timeout)
    server = FunctionServer("get_job", env, logs_dir).start()
    http = session()
    try:
        for _ in range(3):
            assert (
                http.get(
                    f"{server.url}/{uuid.uuid4()}", headers={"X-Dylen-User": user}, timeout=10
                ).status_code
                == 404
            )
        time.sleep(idle)
        # When the network silently drops everything (no reset, no close)
        proxy.frozen.set()
        started = time.monotonic()
        response = http.get(f"{server.url}/{uuid.uuid4()}", headers={"X-Dylen-User": user}, timeout=60)
        elapsed = time.monotonic() - started
        # And once the network is back the same process serves again
        proxy.frozen.clear()

        def serves() -> bool:
            again = http.get(f"{server.url}/{uuid.uuid4()}", headers={"X-Dylen-User": user}, timeout=10)
            return again.status_code == 404

        wait_until(serves, timeout=15, interval=0.2, what="get_job to serve after the network returns")
        assert server.proc is not None and server.proc.poll() is None
    finally:
        server.kill()
        proxy.close()
    # Then the request gives up within its bound (read timeout or ping timeout) and answers 503
    assert response.status_code == 503, response.text
    assert response.headers["Content-Type"].startswith(PROBLEM)
    assert elapsed < bound, elapsed

"""A newcomer's first hour: every failure reads as one line that says what to do.

Configuration errors stop the cold start with one line; database problems are 503s whose log names
the cause (never the password); refused task requests are logged, rate-limited; an operator's retry
says what became of each dispatch; the read functions log their requests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.factories import make_job, make_user
from tests.support import ROOT, TASK_SECRET, FunctionServer, base_env, free_port, session

PROBLEM = "application/problem+json"


def _cold_start(env: dict[str, str], name: str = "create_job") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "functions_framework",
            "--target",
            name,
            "--source",
            str(ROOT / "functions" / name / "main.py"),
            "--port",
            str(free_port()),
        ],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT),
            "DYLEN_ENV_FILE": os.devnull,
            **env,
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DYLEN_DATABASE_URL": "postgresql://postgres@127.0.0.1/x"}, "DYLEN_FIREBASE_PROJECT_ID"),
        ({"DYLEN_AUTH_MODE": "dev"}, "DYLEN_DATABASE_URL"),
        ({"DYLEN_AUTH_MODE": "dev", "DYLEN_DATABASE_URL": "mysql://x"}, "DYLEN_DATABASE_URL"),
        (
            {
                "DYLEN_AUTH_MODE": "dev",
                "DYLEN_DATABASE_URL": "postgresql://x@h/d",
                "DYLEN_DB_POOL_SIZE": "many",
            },
            "DYLEN_DB_POOL_SIZE",
        ),
    ],
    ids=["no-firebase-project", "no-database", "not-postgresql", "bad-number"],
)
def test_a_configuration_error_is_one_line_naming_the_variable_and_the_function_does_not_start(
    env: dict[str, str], named: str
) -> None:
    result = _cold_start(env)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dylen: configuration error: ") and named in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_migrate_needs_no_auth_settings(pg_admin_url: str) -> None:
    from devtools.embedded_pg import create_database

    name = f"dylen_fresh_{uuid.uuid4().hex[:8]}"
    create_database(pg_admin_url, name)
    url = sa.engine.make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "common.cli", "migrate"],
            env={
                "PATH": os.environ.get("PATH", ""),
                "PYTHONPATH": str(ROOT),
                "DYLEN_ENV_FILE": os.devnull,
                "DYLEN_DATABASE_URL": url,
            },
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "migrated to head" in result.stdout
    finally:
        _drop(pg_admin_url, name)


def _drop(pg_admin_url: str, name: str) -> None:
    admin = sa.create_engine(
        sa.engine.make_url(pg_admin_url).set(drivername="postgresql+pg8000"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _messages(server: FunctionServer) -> list[str]:
    return [line.get("message", "") for line in server.log_lines()]


def test_a_wrong_database_name_is_a_503_whose_log_names_where_and_why(
    database_url: str, logs_dir: Path, user: str
) -> None:
    url = sa.engine.make_url(database_url).set(database=f"absent_{uuid.uuid4().hex[:8]}")
    server = FunctionServer("get_job", base_env(url.render_as_string(hide_password=False)), logs_dir).start()
    try:
        answer = session().get(f"{server.url}/{uuid.uuid4()}", headers={"X-Dylen-User": user}, timeout=30)
    finally:
        server.stop()
    assert answer.status_code == 503 and answer.headers["Content-Type"].startswith(PROBLEM)
    messages = _messages(server)
    where = f":{url.port or 5432} (database {url.database}, user {url.username})"
    assert any(where in m and "the database does not exist" in m for m in messages), messages


def test_an_unmigrated_database_is_a_503_whose_log_says_to_migrate(
    pg_admin_url: str, logs_dir: Path, user: str
) -> None:
    from devtools.embedded_pg import create_database

    name = f"dylen_empty_{uuid.uuid4().hex[:8]}"
    create_database(pg_admin_url, name)
    url = sa.engine.make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    server = FunctionServer("get_job", base_env(url), logs_dir).start()
    try:
        answer = session().get(f"{server.url}/{uuid.uuid4()}", headers={"X-Dylen-User": user}, timeout=30)
    finally:
        server.stop()
        _drop(pg_admin_url, name)
    assert answer.status_code == 503 and answer.headers["Content-Type"].startswith(PROBLEM)
    assert any("python -m common.cli migrate" in m for m in _messages(server)), _messages(server)
    assert "Traceback" not in server.log()


def test_an_unreachable_database_is_logged_with_host_port_and_cause(logs_dir: Path, user: str) -> None:
    port = free_port()
    env = base_env(
        f"postgresql://postgres:hunter2@127.0.0.1:{port}/none", DYLEN_DB_CONNECT_TIMEOUT_SECONDS="1"
    )
    server = FunctionServer("get_job", env, logs_dir).start()
    try:
        answer = session().get(f"{server.url}/{uuid.uuid4()}", headers={"X-Dylen-User": user}, timeout=30)
    finally:
        server.stop()
    assert answer.status_code == 503
    messages = _messages(server)
    assert any(m.startswith(f"Cannot connect to 127.0.0.1:{port}") and "Error" in m for m in messages), (
        messages
    )
    assert "hunter2" not in server.log()  # never the password


def test_refused_task_requests_are_logged_with_the_reason_at_most_once_per_window(
    database_url: str, logs_dir: Path
) -> None:
    server = FunctionServer("process_job", base_env(database_url), logs_dir).start()
    http = session()
    try:
        answers = [
            http.post(
                server.url,
                json={"job_id": str(uuid.uuid4())},
                headers={"X-Dylen-Task-Secret": "wrong"},
                timeout=10,
            )
            for _ in range(20)
        ]
    finally:
        server.stop()
    assert {a.status_code for a in answers} == {403}
    refused = [line for line in server.log_lines() if line.get("message") == "Task request refused"]
    assert len(refused) == 1, refused  # a queue retrying ten times a second does not flood the log
    assert refused[0]["function"] == "process_job" and refused[0]["reason"] == "Wrong task secret."


def test_the_read_functions_log_each_request(database_url: str, logs_dir: Path, user: str) -> None:
    server = FunctionServer("get_job", base_env(database_url), logs_dir).start()
    job_id = uuid.uuid4()
    try:
        session().get(
            f"{server.url}/{job_id}",
            headers={"X-Dylen-User": user, "X-Cloud-Trace-Context": "abc123/1;o=1"},
            timeout=10,
        )
    finally:
        server.stop()
    (served,) = [line for line in server.log_lines() if line.get("message") == "Request served"]
    assert served["httpRequest"]["requestMethod"] == "GET"
    assert served["httpRequest"]["requestUrl"] == f"/{job_id}"
    assert served["httpRequest"]["status"] == 404
    assert served["httpRequest"]["latency"].endswith("s")
    assert served["user_id"] == user
    assert served["logging.googleapis.com/trace"] == "abc123"


def test_a_probe_with_the_nil_id_is_answered_without_a_warning(database_url: str, logs_dir: Path) -> None:
    server = FunctionServer("process_job", base_env(database_url), logs_dir).start()
    try:
        answer = session().post(
            server.url,
            json={"job_id": str(uuid.UUID(int=0))},
            headers={"X-Dylen-Task-Secret": TASK_SECRET},
            timeout=10,
        )
    finally:
        server.stop()
    assert answer.status_code == 200 and answer.json()["outcome"] == "unknown_job"
    warnings = [line["message"] for line in server.log_lines() if line.get("severity") == "WARNING"]
    # The one warning every dev-auth process logs at start is not about the probe.
    assert [w for w in warnings if not w.startswith("Serving with dev auth")] == []


def test_jobs_retry_says_what_became_of_each_dispatch_and_fails_when_one_did(
    database_url: str, db: sa.Engine, logs_dir: Path, user: str
) -> None:
    # Given a failed job, and a process_job that refuses the operator's secret
    process = FunctionServer("process_job", base_env(database_url), logs_dir).start()
    with db.begin() as conn:
        job_id = make_job(conn, user_id=make_user(conn, user), status="error", attempts=3, max_attempts=3)
    try:
        env = base_env(
            database_url,
            PYTHONPATH=str(ROOT),
            DYLEN_JOBS_AUTO_PROCESS="true",
            DYLEN_JOB_MAX_ATTEMPTS="2",
            DYLEN_PROCESS_JOB_URL=process.url + "/",
            DYLEN_TASK_SECRET="not-the-secret",
        )
        result = subprocess.run(
            [sys.executable, "-m", "common.cli", "jobs", "retry", job_id],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        process.stop()
    # Then the CLI says the dispatch failed, why, and exits non-zero; the job waits for rescue_jobs
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"NOT dispatched {job_id}: process_job at {process.url} answered 403" in result.stdout
    assert "dispatched 0, 1 left queued for rescue_jobs" in result.stdout
    assert "DYLEN_TASK_SECRET" in result.stderr
    with db.connect() as conn:
        assert (
            conn.execute(sa.text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id}).scalar()
            == "queued"
        )

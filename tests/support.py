"""Test support: real functions-framework processes on loopback ports and small HTTP helpers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
TASK_SECRET = "test-task-secret"
USER_FUNCTIONS = ("create_job", "get_job", "get_lesson", "list_lessons", "cancel_job")


_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never the same twice per test run: the kernel does hand a just-closed
    port out again, and two servers told the same port would answer each other's requests."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # tests talk to loopback only
    # One connection per request. A kept-alive one races gunicorn's 2 s idle close: a request sent
    # as the server closes it meets a reset, the one ConnectionResetError CI ever showed here. A
    # connect on loopback costs nothing next to that flake.
    s.headers["Connection"] = "close"
    return s


class FunctionServer:
    """One function under `functions-framework`, as Cloud Run would run it, on a loopback port."""

    def __init__(
        self,
        name: str,
        env: Mapping[str, str],
        log_dir: Path,
        *,
        port: int | None = None,
        source: Path | None = None,
    ) -> None:
        self.name = name
        self.source = source or ROOT / "functions" / name / "main.py"
        self.env = dict(env)
        self.port = port or free_port()
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> FunctionServer:
        env = {**self.env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "functions_framework",
                "--target",
                self.name,
                "--source",
                str(self.source),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up:\n{self.log()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} not listening after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(line))
        return lines

    def kill(self) -> None:
        """SIGKILL the whole process group: no cleanup, like a Cloud Run instance taken away."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop_all([self])


def stop_all(servers: Iterable[FunctionServer]) -> None:
    """Signal every server first, then wait, so shutdowns overlap. SIGINT is gunicorn's quick
    shutdown; SIGTERM would wait out keep-alive connections."""
    running = [s for s in servers if s.proc and s.proc.poll() is None]
    for server in running:
        assert server.proc is not None
        os.killpg(server.proc.pid, signal.SIGINT)
    for server in running:
        assert server.proc is not None
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def base_env(database_url: str, **overrides: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(
        DYLEN_ENV_FILE=os.devnull,
        DYLEN_DATABASE_URL=database_url,
        DYLEN_AUTH_MODE="dev",
        DYLEN_TASK_SECRET=TASK_SECRET,
        DYLEN_LOCAL_DISPATCH_MIN_BACKOFF_SECONDS="0.05",
        DYLEN_LOCAL_DISPATCH_MAX_BACKOFF_SECONDS="1",
        # Two kept idle, up to ten open: the suite's many stacks share one server's 100 connections.
        DYLEN_DB_POOL_SIZE="2",
        DYLEN_DB_MAX_OVERFLOW="8",
        # Quotas stay on (every create runs the limited insert) but out of reach, except in the
        # tests about them, which set the limits they test.
        DYLEN_TIER_DAILY_JOBS="free=1000000",
        DYLEN_TIER_ACTIVE_JOBS="free=1000000",
        DYLEN_TIER_DAILY_TOKENS="free=1000000000000",
        DYLEN_TIER_CONCURRENT_CALLS="free=1000000",
        # A failed attempt is retried at once (no backoff) unless a test is about the backoff.
        DYLEN_JOB_RETRY_BASE_SECONDS="0",
        DYLEN_JOB_RETRY_CAP_SECONDS="0",
    )
    env.update(overrides)
    return env


class Stack:
    """process_job plus the user functions, wired together like a deployment."""

    def __init__(self, servers: dict[str, FunctionServer]) -> None:
        self.servers = servers
        self.http = session()

    def url(self, name: str) -> str:
        return self.servers[name].url

    def create(self, user: str, body: Any, **kwargs: Any) -> requests.Response:
        headers = {"X-Dylen-User": user, **kwargs.pop("headers", {})}
        return self.http.post(self.url("create_job") + "/", json=body, headers=headers, timeout=30, **kwargs)

    def get_job(self, user: str, job_id: str) -> requests.Response:
        return self.http.get(f"{self.url('get_job')}/{job_id}", headers={"X-Dylen-User": user}, timeout=30)

    def cancel(self, user: str, job_id: str) -> requests.Response:
        return self.http.post(
            f"{self.url('cancel_job')}/{job_id}", headers={"X-Dylen-User": user}, timeout=30
        )

    def get_lesson(self, user: str, lesson_id: str) -> requests.Response:
        return self.http.get(
            f"{self.url('get_lesson')}/{lesson_id}", headers={"X-Dylen-User": user}, timeout=30
        )

    def list_lessons(self, user: str, **params: Any) -> requests.Response:
        return self.http.get(
            self.url("list_lessons") + "/", params=params, headers={"X-Dylen-User": user}, timeout=30
        )

    def deliver(self, job_id: str, *, secret: str | None = TASK_SECRET, **headers: str) -> requests.Response:
        h = dict(headers)
        if secret is not None:
            h["X-Dylen-Task-Secret"] = secret
        return self.http.post(self.url("process_job") + "/", json={"job_id": job_id}, headers=h, timeout=60)

    def wait_for(
        self, user: str, job_id: str, statuses: tuple[str, ...] = ("done", "error"), timeout: float = 20
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            response = self.get_job(user, job_id)
            assert response.status_code == 200, response.text
            body = response.json()
            if body["status"] in statuses:
                return body
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} still {body.get('status')} after {timeout}s: {body}")

    def stop(self) -> None:
        self.http.close()  # open keep-alive connections slow a graceful shutdown down
        stop_all(self.servers.values())


def lesson_body(topic: str = "Photosynthesis", key: str | None = None, **payload: Any) -> dict[str, Any]:
    import uuid

    return {
        "job_kind": "lesson",
        "idempotency_key": key or uuid.uuid4().hex,
        "payload": {"topic": topic, **payload},
    }


@contextlib.contextmanager
def migrated_database(pg_admin_url: str, revision: str = "head") -> Iterator[str]:
    """A new database built by `python -m common.cli migrate [revision]`, dropped afterwards."""
    from devtools.embedded_pg import create_database

    name = f"dylen_test_{uuid.uuid4().hex[:10]}"
    create_database(pg_admin_url, name)
    url = sa.engine.make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    env = {**os.environ, "DYLEN_DATABASE_URL": url, "DYLEN_AUTH_MODE": "dev", "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "common.cli", "migrate", revision],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    try:
        yield url
    finally:
        admin = sa.create_engine(
            sa.engine.make_url(pg_admin_url).set(drivername="postgresql+pg8000"),
            isolation_level="AUTOCOMMIT",
        )
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


StackFactory = Callable[..., Stack]


def handler_runs(calls_dir: Path, job_id: str) -> int:
    """How many times tests.generators ran for this job (one line per run)."""
    path = calls_dir / job_id
    return len(path.read_text().splitlines()) if path.exists() else 0


def generator_calls(calls_dir: Path, job_id: str) -> list[str]:
    """The calls tests.generators:fanout recorded for a lesson job: "plan <attempt>" and
    "section <index> <attempt>" lines, in the order they started."""
    path = calls_dir / job_id
    return path.read_text().splitlines() if path.exists() else []


def section_calls(calls_dir: Path, job_id: str) -> list[int]:
    """The section index of every write_section call for this lesson job."""
    return [
        int(line.split()[1]) for line in generator_calls(calls_dir, job_id) if line.startswith("section ")
    ]


@dataclass(frozen=True)
class CountedCall:
    """One model call of tests.generators:counting, as its calls file has it."""

    job_id: str
    what: str  # "plan" or "section:<i>"
    attempt: int
    start: float  # time.time()
    end: float


def counted_calls(calls_dir: Path, user: str) -> list[CountedCall]:
    """Every model call tests.generators:counting made for `user`, in the order they ended."""
    path = calls_dir / f"{user}.calls"
    lines = path.read_text().splitlines() if path.exists() else []
    return [
        CountedCall(job_id, what, int(attempt), float(start), float(end))
        for job_id, what, attempt, start, end in (line.split() for line in lines)
    ]


def most_at_once(calls: Iterable[CountedCall]) -> int:
    """The most calls in flight at one moment (an end before a start at the same stamp)."""
    events = sorted([(c.start, 1) for c in calls] + [(c.end, -1) for c in calls])
    most = inside = 0
    for _, step in events:
        inside += step
        most = max(most, inside)
    return most


# A lesson's sections are jobs of the same user (parent_id set), written when it fans out: a count
# of "the user's jobs" taken while jobs run must leave them out, or it depends on timing.
_TOP_LEVEL_JOBS_BY_STATUS = sa.text(
    "SELECT status, count(*) FROM jobs WHERE user_id = :u AND parent_id IS NULL GROUP BY status"
)


def user_jobs_by_status(db: sa.Engine, user: str) -> dict[str, int]:
    """The user's own (top-level) jobs per status; sections are counted under their lesson."""
    with db.connect() as conn:
        return {status: int(n) for status, n in conn.execute(_TOP_LEVEL_JOBS_BY_STATUS, {"u": user})}


def count_user_jobs(db: sa.Engine, user: str) -> int:
    """How many jobs the user created (top-level: a lesson's sections are not the user's jobs)."""
    return sum(user_jobs_by_status(db, user).values())

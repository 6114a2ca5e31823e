"""Isolation under faults: whatever a request does to its pooled connection, no other request ever
reads a reply that was meant for someone else.

Sixteen threads share a pool of 2 + 1 overflow and run tagged statements (plain and prepared, and the
real hot statements with real parameters); between them, at random, statements that fail in every
way we can produce: values the driver cannot encode, server errors, statement_timeout, a backend
killed under us, a read timeout, and an exception (and an interrupt) raised by our own code in the
middle of reading a reply. Every successful reply must carry its own tag.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from common.jobs import queries, transitions
from common.jobs.model import Job
from common.platform import db as common_db
from common.platform.config import load_settings
from tests.support import base_env

THREADS = 16
STATEMENTS = 20_000
FAULT_RATE = 0.06
READ_TIMEOUT = 1.0
TEXT_OID = 25
TCP_ESTABLISHED = 1  # tcp_info's first byte, the connection state (Linux)


class Interrupted(BaseException):
    """Stands in for KeyboardInterrupt or a timeout signal landing mid-reply."""


class OurBug(RuntimeError):
    """An exception from our own code while a reply is being read."""


def _text_in(value: str) -> str:
    # Registered for `text` on every connection: a reply carrying these markers blows up half read.
    if value.startswith("raise:"):
        raise OurBug(value)
    if value.startswith("interrupt:"):
        raise Interrupted(value)
    return value


class Sockets:
    """Every socket the pool opened, to count the ones still open."""

    def __init__(self) -> None:
        self.opened: list[Any] = []
        self.lock = threading.Lock()

    def wrap(self, connect: Callable[[], common_db.Opened]) -> Callable[[], common_db.Opened]:
        def connect_and_track() -> common_db.Opened:
            opened = connect()
            opened.con.register_in_adapter(TEXT_OID, _text_in)
            with self.lock:
                self.opened.append(opened.sock)
            return opened

        return connect_and_track

    def live(self) -> int:
        """Sockets whose TCP connection is still established (closed ones have no descriptor)."""
        with self.lock:
            return sum(1 for sock in self.opened if _established(sock))


def _established(sock: socket.socket) -> bool:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_ESTABLISHED
    except OSError:
        return False


@pytest.fixture
def pool(database_url: str) -> Iterator[tuple[common_db.Pool, Sockets]]:
    settings = load_settings(base_env(database_url, DYLEN_DB_READ_TIMEOUT_SECONDS=str(READ_TIMEOUT)))
    sockets = Sockets()
    pool = common_db.Pool(
        sockets.wrap(common_db.connect_function(settings, read_timeout=READ_TIMEOUT)),
        size=2,
        overflow=1,
        timeout=30.0,
        read_timeout=READ_TIMEOUT,
        ping_timeout=5.0,
    )
    yield pool, sockets
    pool.invalidate_all()


@pytest.fixture
def taken_key(db: sa.Engine) -> Iterator[str]:
    name = f"iso_{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {name} (k text PRIMARY KEY)"))
        conn.execute(sa.text(f"INSERT INTO {name} VALUES ('taken')"))
    yield name
    with db.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {name}"))


TAG = common_db.Statement("SELECT CAST(:tag AS text) AS tag", prepare=True)
TAG_AND_DATE = common_db.Statement(
    "SELECT CAST(:tag AS text) AS tag, CAST(:d AS timestamptz) AS d", prepare=True
)
FAR_EAST = timezone(timedelta(hours=14))
# Requests that fail, each in its own way (Run.run_fault); every one must happen in the run.
FAULT_KINDS = (
    "overflowing date",
    "overflowing date, prepared",
    "lone surrogate",
    "lone surrogate, prepared",
    "int beyond int8",
    "unique violation",
    "division by zero",
    "statement_timeout",
    "backend terminated",
    "our bug mid-reply",
    "interrupt mid-reply",
)


class Run:
    """What the threads saw."""

    def __init__(self, pool: common_db.Pool, table: str) -> None:
        self.pool = pool
        self.table = table
        self.lock = threading.Lock()
        self.mismatches: list[str] = []
        self.normal_failures: list[str] = []
        self.faults: Counter[str] = Counter()
        self.fault_errors: Counter[str] = Counter()
        self.statements = 0
        self.read_timeouts_left = 8  # each holds a connection for the read timeout: keep a few
        self.stop = threading.Event()

    def check(self, what: str, expected: Any, got: Any) -> None:
        if expected != got:
            with self.lock:
                self.mismatches.append(f"{what}: expected {expected!r}, got {got!r}")

    @contextlib.contextmanager
    def connection(self) -> Iterator[common_db.Connection]:
        record = self.pool.acquire()
        try:
            yield common_db.Connection(self.pool, record)
        finally:
            self.pool.release(record)

    # --- requests that succeed: each reply must carry the request's own tag ---------------------

    def normal(self, rng: random.Random) -> None:
        tag = f"t-{uuid.uuid4().hex}"
        kind = rng.randrange(4)
        with self.connection() as conn:
            if kind == 0:
                self.check(
                    "unnamed", tag, conn.execute("SELECT CAST(:tag AS text) AS tag", {"tag": tag}).one().tag
                )
            elif kind == 1:
                self.check("prepared", tag, conn.execute(TAG, {"tag": tag}).one().tag)
            elif kind == 2:
                when = datetime(2024, 1, 1, tzinfo=FAR_EAST) + timedelta(seconds=rng.randrange(10**6))
                row = conn.execute(TAG_AND_DATE, {"tag": tag, "d": when}).one()
                self.check("prepared with a date", (tag, when), (row.tag, row.d))
            else:
                self.hot_statements(conn, tag)

    def hot_statements(self, conn: common_db.Connection, tag: str) -> None:
        user = f"iso-{tag}"
        job = transitions.create(
            conn,
            user_id=user,
            job_kind="lesson",
            idempotency_key=tag,
            request_json={"tag": tag},
            max_attempts=3,
        )
        assert isinstance(job, Job)
        fetched = queries.get_job(conn, job.id)
        self.check(
            "get_job",
            (job.id, tag, {"tag": tag}),
            fetched and (fetched.id, fetched.idempotency_key, fetched.request_json),
        )
        found = queries.find_job_by_key(conn, user_id=user, job_kind="lesson", idempotency_key=tag)
        self.check("find_job_by_key", job.id, found and found.id)
        claim = transitions.claim(conn, job.id, lease_seconds=60)
        self.check(
            "claim_job",
            (True, job.id, tag),
            (claim.claimed, claim.job and claim.job.id, claim.job and claim.job.idempotency_key),
        )

    # --- requests that fail, each in its own way ---------------------------------------------------

    def fault(self, rng: random.Random) -> None:
        kinds = list(FAULT_KINDS)
        with self.lock:
            if self.read_timeouts_left > 0 and rng.random() < 0.02:
                self.read_timeouts_left -= 1
                kinds = ["read timeout"]
        kind = rng.choice(kinds)
        tag = f"f-{uuid.uuid4().hex}"
        with self.lock:
            self.faults[kind] += 1
        try:
            with self.connection() as conn:
                reply = self.run_fault(conn, kind, tag)
            # A fault that did answer must still answer for itself.
            if reply is not None:
                self.check(f"fault {kind}", tag, reply)
        except (Exception, Interrupted) as error:
            with self.lock:
                self.fault_errors[type(error).__name__] += 1

    def run_fault(self, conn: common_db.Connection, kind: str, tag: str) -> Any:
        ancient = datetime(1, 1, 1, tzinfo=FAR_EAST)  # before year 1 in UTC: the driver cannot send it
        if kind == "overflowing date":
            return (
                conn.execute(
                    "SELECT CAST(:tag AS text) AS tag, CAST(:d AS timestamptz)", {"tag": tag, "d": ancient}
                )
                .one()
                .tag
            )
        if kind == "overflowing date, prepared":
            return conn.execute(TAG_AND_DATE, {"tag": tag, "d": ancient}).one().tag
        if kind == "lone surrogate":
            return (
                conn.execute(
                    "SELECT CAST(:tag AS text) AS tag, CAST(:s AS text)", {"tag": tag, "s": "\ud800"}
                )
                .one()
                .tag
            )
        if kind == "lone surrogate, prepared":
            return conn.execute(TAG, {"tag": tag + "\ud800"}).one().tag
        if kind == "int beyond int8":
            return (
                conn.execute("SELECT CAST(:tag AS text) AS tag, CAST(:n AS int8)", {"tag": tag, "n": 2**70})
                .one()
                .tag
            )
        if kind == "unique violation":
            conn.execute(f"INSERT INTO {self.table} (k) VALUES (:k)", {"k": "taken"})
            return None
        if kind == "division by zero":
            return (
                conn.execute("SELECT CAST(:tag AS text) AS tag, 1 / CAST(:z AS int)", {"tag": tag, "z": 0})
                .one()
                .tag
            )
        if kind == "statement_timeout":
            with conn.transaction():
                conn.execute_simple("SET LOCAL statement_timeout = '10ms'")
                return conn.execute("SELECT CAST(:tag AS text) AS tag, pg_sleep(0.2)", {"tag": tag}).one().tag
        if kind == "backend terminated":
            conn.execute_simple("SELECT pg_terminate_backend(pg_backend_pid())")
            return None
        if kind == "read timeout":
            return (
                conn.execute(
                    "SELECT CAST(:tag AS text) AS tag, pg_sleep(:s)", {"tag": tag, "s": READ_TIMEOUT * 3}
                )
                .one()
                .tag
            )
        if kind == "our bug mid-reply":
            return conn.execute(TAG, {"tag": "raise:" + tag}).one().tag
        if kind == "interrupt mid-reply":
            return conn.execute("SELECT CAST(:tag AS text) AS tag", {"tag": "interrupt:" + tag}).one().tag
        raise AssertionError(kind)

    def worker(self, seed: int, count: int) -> None:
        rng = random.Random(seed)
        for _ in range(count):
            if rng.random() < FAULT_RATE:
                self.fault(rng)
            try:
                self.normal(rng)  # after every fault too: the pool serves again at once
            except Exception as error:
                with self.lock:
                    self.normal_failures.append(f"{type(error).__name__}: {error}")
            with self.lock:
                self.statements += 1


def test_no_reply_ever_reaches_another_request_whatever_fails_on_a_shared_pool(
    pool: tuple[common_db.Pool, Sockets], taken_key: str
) -> None:
    shared, sockets = pool
    run = Run(shared, taken_key)
    most_open = {"pool": 0, "sockets": 0}

    def watch() -> None:
        while not run.stop.is_set():
            most_open["pool"] = max(most_open["pool"], shared.open)
            most_open["sockets"] = max(most_open["sockets"], sockets.live())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    seed = random.randrange(2**32)
    threads = [
        threading.Thread(target=run.worker, args=(seed + i, STATEMENTS // THREADS), daemon=True)
        for i in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    run.stop.set()
    watcher.join()

    assert not any(thread.is_alive() for thread in threads), "a worker hung"
    assert run.mismatches == [], f"seed {seed}: {run.mismatches[:5]}"
    assert run.normal_failures == [], f"seed {seed}: {run.normal_failures[:5]}"
    assert run.statements == STATEMENTS
    # Every kind of fault happened, and each failed the request that caused it.
    assert set(run.faults) >= set(FAULT_KINDS), run.faults
    assert sum(run.fault_errors.values()) == sum(run.faults.values()), (run.faults, run.fault_errors)
    assert most_open["pool"] <= shared.limit and most_open["sockets"] <= shared.limit, most_open
    with run.connection() as conn:
        assert conn.execute(TAG, {"tag": "after"}).one().tag == "after"


def test_a_server_error_keeps_the_connection_and_a_half_read_reply_closes_it(
    pool: tuple[common_db.Pool, Sockets], taken_key: str
) -> None:
    shared, _ = pool
    run = Run(shared, taken_key)
    pid = common_db.Statement("SELECT pg_backend_pid() AS pid", prepare=True)
    with run.connection() as conn:
        first = conn.execute(pid).one().pid
        # Given a refusal the server answered in full (ReadyForQuery read), the connection stays.
        with pytest.raises(common_db.QueryError):
            run.run_fault(conn, "unique violation", "x")
    with run.connection() as conn:
        assert conn.execute(pid).one().pid == first
        # When a reply is left half read (our own code raised while decoding a row)
        with pytest.raises(OurBug):
            run.run_fault(conn, "our bug mid-reply", "x")
    # Then that connection is never handed out again.
    with run.connection() as conn:
        assert conn.execute(pid).one().pid != first

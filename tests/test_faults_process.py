"""process_job dies or is away: real SIGKILLs of real processes, real PostgreSQL.

Whatever happens to process_job, every accepted job ends `done` exactly once: the local dispatcher
backs off and redelivers, and rescue_jobs picks up what it gave up on or what a dead instance held.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.factories import job_row
from tests.faults import job_statuses, kill_all, lessons_per_job, rescue, start_stack, wait_until
from tests.support import Stack, handler_runs, lesson_body

LEASE_SECONDS = 2


@pytest.fixture(scope="module")
def fault_stack(database_url: str, logs_dir: Path, calls_dir: Path) -> Iterator[Stack]:
    stack = start_stack(
        database_url,
        logs_dir,
        names=("create_job", "get_job", "rescue_jobs"),
        DYLEN_JOB_TIMEOUT_SECONDS=str(LEASE_SECONDS),
        DYLEN_RESCUE_AFTER_SECONDS="1",
        DYLEN_JOB_MAX_ATTEMPTS="8",
        # Backoff 0.5, 1, 2, 2, ... s: a short outage is bridged by the dispatcher itself.
        DYLEN_LOCAL_DISPATCH_MIN_BACKOFF_SECONDS="0.5",
        DYLEN_LOCAL_DISPATCH_MAX_BACKOFF_SECONDS="2",
        DYLEN_LESSON_GENERATOR="tests.generators:generate",
        DYLEN_TEST_CALLS_DIR=str(calls_dir),
    )
    yield stack
    kill_all(stack)


def _restart_process_job(stack: Stack) -> None:
    server = stack.servers["process_job"]
    server.kill()
    server.start()


def _finish_with_rescue(
    stack: Stack, db: sa.Engine, ids: list[str], timeout: float = 60, *, ends: tuple[str, ...] = ("done",)
) -> None:
    def finished() -> bool:
        statuses = job_statuses(db, ids)
        if all(statuses.get(i) in ends for i in ids):
            return True
        rescue(stack)
        return False

    wait_until(finished, timeout=timeout, interval=0.5, what=f"every job {' or '.join(ends)}")


def test_sigkill_mid_job_then_the_lease_expires_and_the_job_finishes_once(
    fault_stack: Stack, db: sa.Engine, user: str, calls_dir: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    try:
        # Given a job whose generator blocks until the gate opens
        created = fault_stack.create(user, lesson_body(f"block:{gate}"))
        assert created.status_code == 202
        job_id = created.json()["job_id"]
        wait_until(lambda: handler_runs(calls_dir, job_id) == 1, timeout=15, what="the handler to start")
        # When the instance running it is SIGKILLed
        fault_stack.servers["process_job"].kill()
        with db.connect() as conn:
            row = job_row(conn, job_id)
        assert (row["status"], row["attempts"]) == ("running", 1)
        killed_at = time.monotonic()
        fault_stack.servers["process_job"].start()
        gate.touch()
        # Then after the lease expires a redelivery or rescue_jobs finishes it
        _finish_with_rescue(fault_stack, db, [job_id], timeout=30)
        assert time.monotonic() - killed_at >= LEASE_SECONDS - 0.5  # not before the lease expired
    finally:
        gate.touch()  # never leave a blocked generator behind
    with db.connect() as conn:
        row = job_row(conn, job_id)
    assert row["status"] == "done"
    assert row["attempts"] == 2
    assert handler_runs(calls_dir, job_id) == 2
    assert lessons_per_job(db, [job_id]) == {job_id: 1}


def test_process_job_down_briefly_the_dispatcher_backs_off_and_delivers(
    fault_stack: Stack, db: sa.Engine, user: str
) -> None:
    server = fault_stack.servers["process_job"]
    server.kill()
    ids = []
    for index in range(5):
        response = fault_stack.create(user, lesson_body(f"Brief outage {index}"))
        assert response.status_code == 202  # accepted although nothing can run it now
        ids.append(response.json()["job_id"])
    time.sleep(0.5)
    server.start()
    # No rescue call: the dispatcher's own backoff bridges the outage.
    wait_until(
        lambda: set(job_statuses(db, ids).values()) == {"done"}, timeout=20, what="dispatcher redelivery"
    )
    assert lessons_per_job(db, ids) == dict.fromkeys(ids, 1)
    log = fault_stack.servers["create_job"].log_lines()
    backed_off = {
        line.get("job_id") for line in log if line["message"] == "Local delivery failed; backing off"
    }
    assert set(ids) <= backed_off


def test_process_job_down_longer_than_the_dispatcher_waits_rescue_delivers(
    fault_stack: Stack, db: sa.Engine, user: str
) -> None:
    server = fault_stack.servers["process_job"]
    server.kill()
    ids = [fault_stack.create(user, lesson_body(f"Long outage {i}")).json()["job_id"] for i in range(5)]

    def gave_up() -> bool:
        log = fault_stack.servers["create_job"].log_lines()
        quit_ids = {
            line.get("job_id") for line in log if line["message"].startswith("Local delivery gave up")
        }
        return set(ids) <= quit_ids

    wait_until(gave_up, timeout=40, interval=0.25, what="the dispatcher to give up")
    server.start()
    time.sleep(0.5)
    assert set(job_statuses(db, ids).values()) == {"queued"}  # nobody else would have run them
    _finish_with_rescue(fault_stack, db, ids, timeout=30)
    assert lessons_per_job(db, ids) == dict.fromkeys(ids, 1)


@pytest.mark.soak
def test_soak_jobs_finish_exactly_once_while_process_job_is_killed_at_random(
    fault_stack: Stack, db: sa.Engine
) -> None:
    """`make test` runs DYLEN_SOAK_JOBS (default 200) jobs; `make soak` runs 2,000. The generator
    fails 30% of its calls at random and says "not now" (RetryLater) on 10% more, while
    process_job is killed at random: every job ends done or error exactly once, RetryLater never
    costs an attempt, and process_job never answers >= 500 (the database is up throughout)."""
    total = int(os.environ.get("DYLEN_SOAK_JOBS", "200"))
    rng = random.Random(os.environ.get("DYLEN_SOAK_SEED", "5"))
    users = [f"soak-{uuid.uuid4().hex[:8]}" for _ in range(8)]
    accepted: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(total))

    def produce(worker: int) -> None:
        http = fault_stack.http.__class__()
        http.trust_env = False
        deadline = time.monotonic() + 600
        for index in next_index:
            if time.monotonic() > deadline:
                break
            # A few slow jobs widen the window in which a kill lands mid-run; the rest are chaos.
            topic = f"slow:0.3 soak {index}" if index % 5 == 0 else f"chaos:0.3:0.1 Soak {index}"
            body = lesson_body(topic, key=f"soak-{index}")
            response = http.post(
                fault_stack.url("create_job") + "/",
                json=body,
                headers={"X-Dylen-User": users[index % len(users)]},
                timeout=30,
            )
            with lock:
                if response.status_code == 202:
                    accepted.append(response.json()["job_id"])
                else:
                    failures.append(f"{response.status_code} {response.text[:200]}")

    producers = [threading.Thread(target=produce, args=(w,)) for w in range(4)]
    for thread in producers:
        thread.start()

    def running_now() -> bool:
        with db.connect() as conn:
            found = conn.execute(
                sa.text("SELECT 1 FROM jobs WHERE status = 'running' AND user_id = ANY(:users) LIMIT 1"),
                {"users": users},
            ).first()
        return found is not None

    # Kill at random moments while jobs run (aimed at a moment some job is `running`), until the
    # kill budget is spent; jobs keep streaming in meanwhile.
    budget = 3 + total // 100
    kills = 0
    kill_deadline = time.monotonic() + 60 + total * 0.05
    while kills < budget and time.monotonic() < kill_deadline:
        time.sleep(rng.uniform(0.2, 1.0))
        try:
            wait_until(running_now, timeout=5, interval=0.02, what="a running job")
        except AssertionError:
            if not any(thread.is_alive() for thread in producers) and kills >= 3:
                break  # nothing left running to interrupt
        _restart_process_job(fault_stack)
        kills += 1
    for thread in producers:
        thread.join(600)
    assert not failures, failures[:5]
    assert len(accepted) == total
    assert kills >= 3

    _finish_with_rescue(fault_stack, db, accepted, timeout=max(60, total * 0.15), ends=("done", "error"))
    statuses = job_statuses(db, accepted)
    done = [job_id for job_id in accepted if statuses[job_id] == "done"]
    per_job = lessons_per_job(db, accepted)
    assert set(statuses.values()) <= {"done", "error"}
    assert set(per_job) == set(done)  # one lesson per done job, none for a failed one
    assert set(per_job.values()) == {1}  # no lesson twice
    with db.connect() as conn:
        # A deferral (RetryLater) gave its claim back: the attempts used are the claims less them,
        # each is on record, and a job out of attempts used exactly its 8.
        unfair = conn.execute(
            sa.text(
                "SELECT count(*) FROM jobs j WHERE j.id::text = ANY(:ids) AND ("
                " j.deferrals <> (SELECT count(*) FROM job_attempts a WHERE a.job_id = j.id"
                "                  AND a.outcome = 'deferred')"
                " OR j.attempts - j.deferrals > 8"
                " OR (j.status = 'error' AND (j.error_json ->> 'code' <> 'attempts_exhausted'"
                "                             OR j.attempts - j.deferrals <> 8)))"
            ),
            {"ids": accepted},
        ).scalar_one()
        deferred = conn.execute(
            sa.text("SELECT coalesce(sum(deferrals), 0) FROM jobs WHERE id::text = ANY(:ids)"),
            {"ids": accepted},
        ).scalar_one()
    assert unfair == 0
    assert deferred > 0, "no RetryLater happened: the soak's generator did not run as meant"
    # Every answer process_job gave a dispatcher (create_job's, and its own for retries) was 2xx.
    answers = [
        line
        for server in fault_stack.servers.values()
        for line in server.log_lines()
        if line.get("message") == "process_job asked for a retry"
    ]
    assert [a["status"] for a in answers if a["status"] >= 500] == []
    with db.connect() as conn:
        dupes = conn.execute(
            sa.text("SELECT count(*) - count(DISTINCT job_id) FROM lessons WHERE job_id::text = ANY(:ids)"),
            {"ids": accepted},
        ).scalar_one()
        retried = conn.execute(
            sa.text("SELECT count(*) FROM jobs WHERE attempts > 1 AND id::text = ANY(:ids)"),
            {"ids": accepted},
        ).scalar_one()
    assert dupes == 0
    assert retried >= 1, "no kill interrupted a running job"
    # Shown with -s: how many jobs a kill interrupted mid-run (they needed a second attempt).
    print(f"soak: {total} jobs ({len(done)} done), {kills} kills, {retried} retried, {deferred} deferrals")

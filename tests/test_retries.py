"""Retries and waits owned by the job: a failed attempt is a transition to `queued` for a time from
its kind's policy, "not now" (RetryLater, an infrastructure fault) costs no attempt, every attempt is
on record for operators, and users only ever read a code and a safe message."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.faults import kill_all, start_stack
from tests.generators import SECRET
from tests.support import ROOT, Stack, handler_runs, lesson_body

BASE, CAP = 1.0, 4.0  # the backoff stack's policy: waits of at most 1, 2, 4, 4 ... s


# This module's stacks are its own and stop with it: every process holds database connections.
@pytest.fixture(scope="module")
def backoff_stack(database_url: str, logs_dir: Path, calls_dir: Path) -> Iterator[Stack]:
    stack = start_stack(
        database_url,
        logs_dir,
        names=("create_job", "get_job"),
        DYLEN_JOBS_AUTO_PROCESS="false",
        DYLEN_LESSON_GENERATOR="tests.generators:generate",
        DYLEN_TEST_CALLS_DIR=str(calls_dir),
        DYLEN_JOB_MAX_ATTEMPTS="4",
        DYLEN_JOB_RETRY_BASE_SECONDS=str(BASE),
        DYLEN_JOB_RETRY_CAP_SECONDS=str(CAP),
        DYLEN_JOB_MAX_WAIT_SECONDS="1",
    )
    yield stack
    kill_all(stack)


@pytest.fixture(scope="module")
def sections_stack(database_url: str, logs_dir: Path, calls_dir: Path) -> Iterator[Stack]:
    """Local dispatch on, a planner, and a policy of its own for sections (waits up to 2 s)."""
    stack = start_stack(
        database_url,
        logs_dir,
        names=("create_job", "get_job"),
        DYLEN_LESSON_GENERATOR="tests.generators:fanout",
        DYLEN_TEST_CALLS_DIR=str(calls_dir),
        DYLEN_JOB_RETRY_POLICIES="lesson.section=base:2,cap:2,attempts:3",
    )
    yield stack
    kill_all(stack)


def _create(stack: Stack, user: str, topic: str) -> str:
    response = stack.create(user, lesson_body(topic))
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def _row(db: sa.Engine, job_id: str) -> Any:
    with db.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT status, attempts, deferrals, max_attempts, waited_seconds, run_after, error_json "
                "FROM jobs WHERE id = :id"
            ),
            {"id": job_id},
        ).one()


def _attempts(db: sa.Engine, job_id: str) -> list[Any]:
    with db.connect() as conn:
        return list(
            conn.execute(
                sa.text("SELECT * FROM job_attempts WHERE job_id = :id ORDER BY attempt"), {"id": job_id}
            )
        )


def _due_now(db: sa.Engine, job_id: str) -> None:
    """Skip a scheduled wait (the test stands in for the clock, not for the queue)."""
    with db.begin() as conn:
        conn.execute(
            sa.text("UPDATE jobs SET run_after = now(), dispatched_at = now() WHERE id = :id"), {"id": job_id}
        )


def test_retry_later_reschedules_without_using_an_attempt(
    manual_stack: Stack, db: sa.Engine, user: str, calls_dir: Path
) -> None:
    # Given a generator whose provider says "not now" on the first two claims
    job_id = _create(manual_stack, user, "later-twice:0 Tides")
    # When it is delivered three times
    answers = [manual_stack.deliver(job_id) for _ in range(3)]
    # Then the first two were deferred (2xx, the queue is not slowed) and the third wrote the lesson
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json().get("outcome") for a in answers[:2]] == ["deferred", "deferred"]
    view = manual_stack.get_job(user, job_id).json()
    assert (view["status"], view["attempts"]) == ("done", 1)  # one attempt used of 3
    row = _row(db, job_id)
    assert (row.attempts, row.deferrals, row.max_attempts) == (3, 2, 5)  # claims fence; budget kept
    history = _attempts(db, job_id)
    assert [(a.attempt, a.outcome, a.error_code) for a in history] == [
        (1, "deferred", "rate_limited"),
        (2, "deferred", "rate_limited"),
    ]
    assert handler_runs(calls_dir, job_id) == 3


def test_an_early_delivery_answers_2xx_and_runs_nothing(
    manual_stack: Stack, db: sa.Engine, user: str, calls_dir: Path
) -> None:
    job_id = _create(manual_stack, user, "later-twice:30 Early")
    first = manual_stack.deliver(job_id).json()
    assert first["outcome"] == "deferred"
    due = datetime.fromisoformat(first["next_attempt_at"])
    # A duplicate of the task arrives long before its time
    early = manual_stack.deliver(job_id)
    assert early.status_code == 200
    assert early.json()["outcome"] == "scheduled"
    assert datetime.fromisoformat(early.json()["next_attempt_at"]) == due
    assert handler_runs(calls_dir, job_id) == 1
    view = manual_stack.get_job(user, job_id).json()
    assert view["status"] == "queued" and datetime.fromisoformat(view["next_attempt_at"]) == due


def test_waiting_beyond_the_jobs_maximum_wait_gives_up(
    backoff_stack: Stack, db: sa.Engine, user: str
) -> None:
    # Given a provider that is never ready, and a job allowed to wait 1 s in all
    job_id = _create(backoff_stack, user, "later-always:0.6 Patience")
    assert backoff_stack.deliver(job_id).json()["outcome"] == "deferred"  # 0.6 s of 1
    _due_now(db, job_id)
    # When it would wait 0.6 s more, it stops: `error` with gave_up_waiting, no attempt used
    answer = backoff_stack.deliver(job_id)
    assert answer.status_code == 200 and answer.json()["outcome"] == "failed"
    view = backoff_stack.get_job(user, job_id).json()
    assert (view["status"], view["error"]["code"]) == ("error", "gave_up_waiting")
    assert view["attempts"] == 1  # the claim that gave up; none was spent on the wait itself


def test_a_database_fault_inside_a_run_is_not_the_jobs_fault(
    manual_stack: Stack, db: sa.Engine, user: str
) -> None:
    job_id = _create(manual_stack, user, "dbdown-once Cables")
    first = manual_stack.deliver(job_id)
    assert first.status_code == 200 and first.json()["outcome"] == "deferred"
    assert first.json()["error"]["code"] == "database_unavailable"
    _due_now(db, job_id)
    assert manual_stack.deliver(job_id).status_code == 200
    view = manual_stack.get_job(user, job_id).json()
    assert (view["status"], view["attempts"]) == ("done", 1)


def test_the_backoff_follows_the_policy_within_its_jitter(
    backoff_stack: Stack, db: sa.Engine, user: str
) -> None:
    # Given a job that fails every attempt, under a policy of base 1 s and cap 4 s (4 attempts)
    job_id = _create(backoff_stack, user, "fail-always Backoff")
    waits = []
    for attempt in (1, 2, 3):
        answer = backoff_stack.deliver(job_id)
        assert answer.status_code == 200 and answer.json()["outcome"] == "retry_scheduled"
        row = _row(db, job_id)
        ended = _attempts(db, job_id)[-1]
        assert (ended.attempt, ended.outcome) == (attempt, "retry")
        waits.append((row.run_after - ended.ended_at).total_seconds())
        # Full jitter: a draw from 0 to min(cap, base * 2^(n-1)); a little slack for the two clocks
        ceiling = min(CAP, BASE * 2 ** (attempt - 1))
        assert -0.05 <= waits[-1] <= ceiling + 0.05, (attempt, waits)
        _due_now(db, job_id)
    # The last attempt ends the job, and every attempt is on record with the raw error
    assert backoff_stack.deliver(job_id).json()["outcome"] == "failed"
    history = _attempts(db, job_id)
    assert [(a.attempt, a.outcome) for a in history] == [
        (1, "retry"),
        (2, "retry"),
        (3, "retry"),
        (4, "failed"),
    ]
    assert all("the model is down" in a.error_detail for a in history)
    assert all(a.started_at <= a.ended_at and a.instance for a in history)
    view = backoff_stack.get_job(user, job_id).json()
    assert (view["status"], view["error"]["code"], view["next_attempt_at"]) == (
        "error",
        "attempts_exhausted",
        None,
    )


def test_the_local_dispatcher_delivers_retries_at_their_time_without_rescue(
    sections_stack: Stack, db: sa.Engine, user: str
) -> None:
    # Given a lesson whose section 1 fails on its attempts 1 and 2 (the sections' policy: <= 2 s)
    job_id = _create(sections_stack, user, "flaky-section:1 Dispatch")
    # When it runs, it is done with no rescue_jobs run at all (there is none in this stack)
    body = sections_stack.wait_for(user, job_id, timeout=30)
    assert body["status"] == "done", body
    with db.connect() as conn:
        section = conn.execute(
            sa.text(
                "SELECT id, attempts, attempt_started_at FROM jobs WHERE parent_id = :id AND section_index = 1"
            ),
            {"id": job_id},
        ).one()
    assert section.attempts == 3
    # And the last retry ran at or after the time it was scheduled for
    dues = [
        datetime.fromisoformat(line["run_after"])
        for line in sections_stack.servers["process_job"].log_lines()
        if line.get("message") == "Job will be retried" and line.get("job_id") == str(section.id)
    ]
    assert len(dues) == 2
    assert section.attempt_started_at >= dues[-1] - timedelta(milliseconds=50)  # not before its time


def test_no_exception_text_reaches_a_user(
    manual_stack: Stack, db: sa.Engine, user: str, database_url: str
) -> None:
    # Given a generator whose errors carry a credential (an SDK quoting its request URL)
    body = lesson_body("secret Leaks", key="leaky")
    job_id = manual_stack.create(user, body).json()["job_id"]
    # When every attempt fails with it
    answers = [manual_stack.deliver(job_id) for _ in range(3)]
    # Then users, the task queue and the lesson never see it: codes and safe messages only
    seen = [
        *(a.text for a in answers),
        manual_stack.get_job(user, job_id).text,
        manual_stack.create(user, body).text,  # the replay
        manual_stack.cancel(user, job_id).text,  # 409: already final
        manual_stack.list_lessons(user).text,
    ]
    assert manual_stack.get_job(user, job_id).json()["error"]["code"] == "attempts_exhausted"
    assert not [text for text in seen if SECRET in text or "models.example" in text]
    with db.connect() as conn:
        lessons = conn.execute(
            sa.text("SELECT count(*) FROM lessons WHERE user_id = :u"), {"u": user}
        ).scalar()
    assert lessons == 0
    # And operators do: the attempt's record and `jobs show` carry the raw error
    assert all(SECRET in a.error_detail for a in _attempts(db, job_id))
    shown = subprocess.run(
        [sys.executable, "-m", "common.cli", "jobs", "show", job_id],
        env={
            "PYTHONPATH": str(ROOT),
            "DYLEN_DATABASE_URL": database_url,
            "DYLEN_ENV_FILE": "/dev/null",
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert shown.returncode == 0, shown.stderr
    assert SECRET in shown.stdout and "history" in shown.stdout


def test_a_section_failing_with_a_secret_fails_its_lesson_with_a_safe_message(
    sections_stack: Stack, user: str
) -> None:
    job_id = _create(sections_stack, user, "secret-section:1 Leaks")
    body = sections_stack.wait_for(user, job_id, timeout=30)
    assert (body["status"], body["error"]["code"]) == ("error", "section_failed")
    assert SECRET not in sections_stack.get_job(user, job_id).text
    assert "Section 1 failed" in body["error"]["message"]


def test_the_attempt_that_finished_a_job_is_on_the_operators_record(
    manual_stack: Stack, app_env: dict[str, str], user: str
) -> None:
    import uuid

    from common.jobs import ops

    job_id = _create(manual_stack, user, "slow:0.3 Timing")
    assert manual_stack.deliver(job_id).status_code == 200
    shown = ops.show_job(job_id)
    (attempt,) = shown.attempts
    assert attempt.outcome == "done" and attempt.seconds is not None and attempt.seconds >= 0.3
    assert shown.job.id == uuid.UUID(job_id)

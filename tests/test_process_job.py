"""process_job's claim / lease / answer rule, delivered by the test itself (auto-process off)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sqlalchemy as sa

from tests.factories import job_row, lesson_count, make_job, make_user
from tests.support import Stack, handler_runs, lesson_body


def _queued_job(stack: Stack, user: str, topic: str) -> str:
    response = stack.create(user, lesson_body(topic))
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued"
    return job["job_id"]


def test_twenty_concurrent_deliveries_run_the_handler_once(
    manual_stack: Stack, user: str, db: sa.Engine, calls_dir: Path
) -> None:
    # Given a queued job whose handler takes a moment (so deliveries overlap)
    job_id = _queued_job(manual_stack, user, "slow:0.5 Volcanoes")
    # When Cloud Tasks (say) delivers it twenty times at once
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: manual_stack.deliver(job_id), range(20)))
    # Then one delivery ran it and every answer was 2xx: a duplicate is told the lease is held (the
    # owner finishes), that another delivery just won, or that the job is done; none slows the queue
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * 20, codes
    outcomes = [a.json().get("outcome") for a in answers]
    assert set(outcomes) <= {None, "lease_held", "contended", "already_final"}, outcomes
    assert outcomes.count(None) == 1  # the one that ran it reports its result
    assert handler_runs(calls_dir, job_id) == 1
    with db.connect() as conn:
        assert lesson_count(conn, job_id) == 1
        row = job_row(conn, job_id)
    assert row["status"] == "done"
    assert row["attempts"] == 1


def test_redelivery_of_a_done_job_is_2xx_and_a_no_op(
    manual_stack: Stack, user: str, db: sa.Engine, calls_dir: Path
) -> None:
    job_id = _queued_job(manual_stack, user, "Rivers")
    assert manual_stack.deliver(job_id).status_code == 200
    with db.connect() as conn:
        before = job_row(conn, job_id)
    again = manual_stack.deliver(job_id)
    assert again.status_code == 200
    assert again.json()["outcome"] == "already_final"
    with db.connect() as conn:
        after = job_row(conn, job_id)
        assert lesson_count(conn, job_id) == 1
    assert after == before
    assert handler_runs(calls_dir, job_id) == 1


def test_transient_failure_schedules_a_retry_with_2xx_keeps_a_safe_error_and_a_later_delivery_finishes(
    manual_stack: Stack, user: str, db: sa.Engine
) -> None:
    job_id = _queued_job(manual_stack, user, "fail-once Tides")
    first = manual_stack.deliver(job_id)
    assert first.status_code == 200, first.text
    assert first.json()["outcome"] == "retry_scheduled" and first.json()["next_attempt_at"]
    job = manual_stack.get_job(user, job_id).json()
    assert job["status"] == "queued"
    assert job["attempts"] == 1
    assert job["error"]["code"] == "handler_failed"
    # The user reads a safe message; the generator's own words are for operators only.
    assert "timed out" not in job["error"]["message"]
    with db.connect() as conn:
        (detail,) = conn.execute(
            sa.text("SELECT error_detail FROM job_attempts WHERE job_id = :id AND attempt = 1"),
            {"id": job_id},
        ).one()
    assert "timed out" in detail
    second = manual_stack.deliver(job_id)
    assert second.status_code == 200
    job = manual_stack.get_job(user, job_id).json()
    assert job["status"] == "done"
    assert job["attempts"] == 2
    assert job["error"] is None
    assert manual_stack.get_lesson(user, job["result"]["lesson_id"]).status_code == 200


def test_failing_every_attempt_ends_as_error_with_2xx_on_the_last(manual_stack: Stack, user: str) -> None:
    job_id = _queued_job(manual_stack, user, "fail-always Comets")
    codes = [manual_stack.deliver(job_id).status_code for _ in range(3)]  # max_attempts = 3 here
    assert codes == [200, 200, 200]
    job = manual_stack.get_job(user, job_id).json()
    assert job["status"] == "error"
    assert job["attempts"] == 3
    assert job["error"]["code"] == "attempts_exhausted"
    assert job["completed_at"] is not None
    # A late duplicate changes nothing.
    assert manual_stack.deliver(job_id).status_code == 200
    assert manual_stack.get_job(user, job_id).json()["attempts"] == 3


def test_permanent_failure_is_error_at_once_with_2xx(manual_stack: Stack, user: str) -> None:
    job_id = _queued_job(manual_stack, user, "permanent Alchemy")
    response = manual_stack.deliver(job_id)
    assert response.status_code == 200
    job = manual_stack.get_job(user, job_id).json()
    assert (job["status"], job["attempts"], job["error"]["code"]) == ("error", 1, "unsupported_topic")


def test_bad_stored_payload_is_a_permanent_error(manual_stack: Stack, db: sa.Engine, user: str) -> None:
    # Given a job whose stored payload no longer validates (e.g. written by an older version)
    with db.begin() as conn:
        make_user(conn, user)
        job_id = make_job(conn, user_id=user, payload={"topic": ""})
    # When it is delivered, it fails once and for all
    response = manual_stack.deliver(job_id)
    assert response.status_code == 200
    with db.connect() as conn:
        row = job_row(conn, job_id)
    assert row["status"] == "error"
    assert row["error_json"]["code"] == "invalid_payload"


def test_a_duplicate_during_a_live_lease_answers_2xx_and_runs_nothing(
    manual_stack: Stack, db: sa.Engine, user: str, calls_dir: Path
) -> None:
    with db.begin() as conn:
        make_user(conn, user)
        job_id = make_job(conn, user_id=user, status="running", attempts=1, lease_seconds=30)
        before = job_row(conn, job_id)
    response = manual_stack.deliver(job_id)
    assert response.status_code == 200
    assert response.json()["outcome"] == "lease_held"
    assert 1 <= response.json()["lease_seconds_left"] <= 30
    assert handler_runs(calls_dir, job_id) == 0
    with db.connect() as conn:
        assert job_row(conn, job_id) == before


def test_expired_lease_is_reclaimed_by_the_next_delivery(
    manual_stack: Stack, db: sa.Engine, user: str
) -> None:
    # Given an attempt that died holding the job (its lease has expired)
    with db.begin() as conn:
        make_user(conn, user)
        job_id = make_job(
            conn, user_id=user, status="running", attempts=1, lease_seconds=-1, payload={"topic": "Orbits"}
        )
    # When the task is delivered again, it runs as attempt 2
    response = manual_stack.deliver(job_id)
    assert response.status_code == 200
    with db.connect() as conn:
        row = job_row(conn, job_id)
        assert lesson_count(conn, job_id) == 1
    assert (row["status"], row["attempts"]) == ("done", 2)


def test_expired_lease_with_no_attempts_left_becomes_error(
    manual_stack: Stack, db: sa.Engine, user: str
) -> None:
    with db.begin() as conn:
        make_user(conn, user)
        job_id = make_job(conn, user_id=user, status="running", attempts=3, max_attempts=3, lease_seconds=-1)
    response = manual_stack.deliver(job_id)
    assert response.status_code == 200
    with db.connect() as conn:
        row = job_row(conn, job_id)
    assert row["status"] == "error"
    assert row["error_json"]["code"] == "attempts_exhausted"


def test_canceled_job_is_skipped(manual_stack: Stack, db: sa.Engine, user: str, calls_dir: Path) -> None:
    with db.begin() as conn:
        make_user(conn, user)
        job_id = make_job(conn, user_id=user, status="canceled")
    response = manual_stack.deliver(job_id)
    assert response.status_code == 200
    assert handler_runs(calls_dir, job_id) == 0
    with db.connect() as conn:
        assert job_row(conn, job_id)["status"] == "canceled"


def test_log_lines_name_the_job(manual_stack: Stack, user: str) -> None:
    job_id = _queued_job(manual_stack, user, "Logging")
    manual_stack.deliver(job_id, **{"X-Cloud-Trace-Context": "abc123def/1;o=1"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [
            line for line in manual_stack.servers["process_job"].log_lines() if line.get("job_id") == job_id
        ]
        messages = [line["message"] for line in lines]
        if "Job completed successfully." in messages:
            break
        time.sleep(0.05)
    assert f"Received task for job {job_id}" in messages
    assert "Job completed successfully." in messages
    assert all(line["severity"] in ("INFO", "WARNING", "ERROR") for line in lines)
    assert any(line.get("logging.googleapis.com/trace") == "abc123def" for line in lines)

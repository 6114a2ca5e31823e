"""cancel_job over HTTP, and cancel racing a running handler, through real processes and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from tests.factories import job_row, lesson_count, make_job, make_user
from tests.support import ROOT, TASK_SECRET, Stack, base_env, handler_runs, lesson_body

PROBLEM = "application/problem+json"


def _queued_job(stack: Stack, user: str, topic: str = "Glaciers") -> str:
    response = stack.create(user, lesson_body(topic))
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --- HTTP contract ---------------------------------------------------------------------------------


def test_owner_cancels_a_queued_job_and_gets_the_job_view(manual_stack: Stack, user: str) -> None:
    job_id = _queued_job(manual_stack, user)
    response = manual_stack.cancel(user, job_id)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["job_id"] == job_id
    assert body["status"] == "canceled"
    assert body["completed_at"] is not None
    assert body["result"] is None
    assert manual_stack.get_job(user, job_id).json()["status"] == "canceled"


@pytest.mark.parametrize("status", ["done", "error", "canceled"])
def test_cancel_of_a_final_job_is_409_problem_and_changes_nothing(
    manual_stack: Stack, user: str, db: sa.Engine, status: str
) -> None:
    with db.begin() as conn:
        make_user(conn, user)
        job_id = make_job(conn, user_id=user, status=status)
        before = job_row(conn, job_id)
    response = manual_stack.cancel(user, job_id)
    assert response.status_code == 409
    assert response.headers["Content-Type"].startswith(PROBLEM)
    problem = response.json()
    assert problem["status"] == 409
    assert status in problem["detail"]
    with db.connect() as conn:
        assert job_row(conn, job_id) == before


def test_second_cancel_is_409(manual_stack: Stack, user: str) -> None:
    job_id = _queued_job(manual_stack, user)
    assert manual_stack.cancel(user, job_id).status_code == 200
    again = manual_stack.cancel(user, job_id)
    assert again.status_code == 409
    assert again.headers["Content-Type"].startswith(PROBLEM)


def test_another_users_job_is_404_and_stays_queued(manual_stack: Stack, user: str) -> None:
    job_id = _queued_job(manual_stack, user)
    response = manual_stack.cancel(f"other-{uuid.uuid4().hex[:8]}", job_id)
    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith(PROBLEM)
    assert manual_stack.get_job(user, job_id).json()["status"] == "queued"


@pytest.mark.parametrize("path", ["not-a-uuid", str(uuid.uuid4()), "", "a/b"])
def test_malformed_unknown_or_missing_ids_are_404(manual_stack: Stack, user: str, path: str) -> None:
    response = manual_stack.http.post(
        f"{manual_stack.url('cancel_job')}/{path}", headers={"X-Dylen-User": user}, timeout=10
    )
    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith(PROBLEM)


def test_cancel_without_credentials_is_401(manual_stack: Stack, user: str) -> None:
    job_id = _queued_job(manual_stack, user)
    response = manual_stack.http.post(f"{manual_stack.url('cancel_job')}/{job_id}", timeout=10)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert manual_stack.get_job(user, job_id).json()["status"] == "queued"


def test_cancel_with_get_is_405(manual_stack: Stack, user: str) -> None:
    job_id = _queued_job(manual_stack, user)
    response = manual_stack.http.get(
        f"{manual_stack.url('cancel_job')}/{job_id}", headers={"X-Dylen-User": user}, timeout=10
    )
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.headers["Content-Type"].startswith(PROBLEM)


# --- the race: cancel while the handler runs ------------------------------------------------------


def _start_blocked_run(
    stack: Stack, user: str, gate: Path, calls_dir: Path, pool: ThreadPoolExecutor
) -> tuple[str, Future[requests.Response]]:
    """A job whose handler is running and held on `gate`; returns (job_id, future of the delivery)."""
    job_id = _queued_job(stack, user, f"block:{gate}")
    delivery = pool.submit(stack.deliver, job_id)
    _wait(lambda: handler_runs(calls_dir, job_id) == 1, "the handler to start")
    assert stack.get_job(user, job_id).json()["status"] == "running"
    return job_id, delivery


def test_cancel_while_the_handler_runs_ends_canceled_with_no_lesson(
    manual_stack: Stack, user: str, db: sa.Engine, calls_dir: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Given a job whose handler is running (held on the gate file)
        job_id, delivery = _start_blocked_run(manual_stack, user, gate, calls_dir, pool)
        # When its owner cancels it through cancel_job, then the handler finishes
        canceled = manual_stack.cancel(user, job_id)
        assert canceled.status_code == 200, canceled.text
        assert canceled.json()["status"] == "canceled"
        gate.touch()
        answer = delivery.result(timeout=30)
    # Then process_job answered 2xx (retrying cannot help) and its writes were discarded
    assert 200 <= answer.status_code < 300, answer.text
    assert answer.json()["outcome"] == "superseded"
    with db.connect() as conn:
        row = job_row(conn, job_id)
        assert lesson_count(conn, job_id) == 0
    assert row["status"] == "canceled"
    assert row["result_json"] is None
    assert manual_stack.list_lessons(user).json()["lessons"] == []
    # And a later delivery skips it without running the handler again
    again = manual_stack.deliver(job_id)
    assert again.status_code == 200
    assert again.json()["outcome"] == "already_final"
    assert handler_runs(calls_dir, job_id) == 1
    assert manual_stack.get_job(user, job_id).json()["status"] == "canceled"


def test_retry_of_a_canceled_job_runs_to_done_via_the_dispatcher_and_the_stale_attempt_cannot_finish(
    manual_stack: Stack, user: str, db: sa.Engine, calls_dir: Path, tmp_path: Path, database_url: str
) -> None:
    gate = tmp_path / "gate"
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Given a running job (attempt 1 held on the gate) that was canceled
        job_id, stale = _start_blocked_run(manual_stack, user, gate, calls_dir, pool)
        assert manual_stack.cancel(user, job_id).status_code == 200
        # When an operator retries it while attempt 1 is still running; the CLI dispatches to process_job
        env = base_env(
            database_url,
            PYTHONPATH=str(ROOT),
            DYLEN_JOBS_AUTO_PROCESS="true",
            DYLEN_PROCESS_JOB_URL=manual_stack.url("process_job") + "/",
            DYLEN_TASK_SECRET=TASK_SECRET,
        )
        cli = subprocess.Popen(
            [sys.executable, "-m", "common.cli", "jobs", "retry", job_id],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # the dispatched delivery claims attempt 2 and blocks on the same gate
            _wait(lambda: handler_runs(calls_dir, job_id) == 2, "the retried attempt to start")
            gate.touch()
            out, err = cli.communicate(timeout=30)
        finally:
            if cli.poll() is None:
                cli.kill()
        stale_answer = stale.result(timeout=30)
    assert cli.returncode == 0, err
    assert f"requeued {job_id}" in out
    assert "dispatched 1" in out
    # Then attempt 2 finished the job; attempt 1's finish was a no-op (attempts never reset)
    assert stale_answer.status_code == 200
    assert stale_answer.json()["outcome"] == "superseded"
    done = manual_stack.wait_for(user, job_id)
    assert done["status"] == "done"
    assert done["attempts"] == 2
    assert (calls_dir / job_id).read_text().split() == ["1", "2"]
    with db.connect() as conn:
        assert lesson_count(conn, job_id) == 1
    assert [x["lesson_id"] for x in manual_stack.list_lessons(user).json()["lessons"]] == [
        done["result"]["lesson_id"]
    ]

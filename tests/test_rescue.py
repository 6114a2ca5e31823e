"""rescue_jobs: stale queued and lease-expired running jobs get exactly one new dispatch."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from common.jobs import rescue
from common.jobs.model import Job
from tests.factories import job_row, make_job, make_user
from tests.faults import kill_all, lessons_per_job, start_stack
from tests.faults import rescue as call_rescue
from tests.support import Stack, handler_runs, lesson_body


def _age(db: sa.Engine, job_id: str, seconds: int) -> None:
    with db.begin() as conn:
        conn.execute(
            sa.text("UPDATE jobs SET dispatched_at = now() - make_interval(secs => :s) WHERE id = :id"),
            {"id": job_id, "s": seconds},
        )


class Recorder:
    """The dispatch seam: records what would be handed to the queue (or refuses, to test failures)."""

    def __init__(self, *, ok: bool = True) -> None:
        self.ok = ok
        self.jobs: list[Job] = []
        self.lock = threading.Lock()

    def __call__(self, job: Job) -> bool:
        with self.lock:
            self.jobs.append(job)
        return self.ok

    def ids(self) -> list[str]:
        return [str(job.id) for job in self.jobs]


@pytest.fixture
def owner(db: sa.Engine, user: str) -> str:
    with db.begin() as conn:
        make_user(conn, user)
    return user


def _job(db: sa.Engine, owner: str, **kwargs: object) -> str:
    with db.begin() as conn:
        return make_job(conn, user_id=owner, **kwargs)  # type: ignore[arg-type]


def test_stale_queued_job_is_redispatched_with_a_new_stamp(app_env: dict, db: sa.Engine, owner: str) -> None:
    stale = _job(db, owner)
    _age(db, stale, 3600)
    fresh = _job(db, owner)
    with db.connect() as conn:
        before = job_row(conn, stale)["dispatched_at"]
    recorder = Recorder()
    report = rescue.rescue_jobs(stale_after_seconds=60, dispatch=recorder)
    assert uuid.UUID(stale) in report.redispatched
    assert uuid.UUID(fresh) not in report.redispatched
    assert stale in recorder.ids() and fresh not in recorder.ids()
    with db.connect() as conn:
        row = job_row(conn, stale)
    assert row["status"] == "queued"
    assert row["dispatched_at"] > before
    # The dispatched job carries the new stamp, so its Cloud Tasks name is new too.
    dispatched = next(job for job in recorder.jobs if str(job.id) == stale)
    assert dispatched.dispatched_at == row["dispatched_at"]


def test_expired_running_job_goes_back_to_queued_and_is_dispatched(
    app_env: dict, db: sa.Engine, owner: str
) -> None:
    expired = _job(db, owner, status="running", attempts=1, max_attempts=3, lease_seconds=-5)
    live = _job(db, owner, status="running", attempts=1, max_attempts=3, lease_seconds=600)
    recorder = Recorder()
    report = rescue.rescue_jobs(stale_after_seconds=60, dispatch=recorder)
    assert uuid.UUID(expired) in report.redispatched
    assert live not in recorder.ids()
    with db.connect() as conn:
        row = job_row(conn, expired)
        assert job_row(conn, live)["status"] == "running"
    assert row["status"] == "queued"
    assert row["lease_expires_at"] is None
    assert row["attempts"] == 1
    assert row["error_json"]["code"] == "lease_expired"


def test_expired_running_job_out_of_attempts_becomes_error(app_env: dict, db: sa.Engine, owner: str) -> None:
    job_id = _job(db, owner, status="running", attempts=3, max_attempts=3, lease_seconds=-5)
    recorder = Recorder()
    report = rescue.rescue_jobs(stale_after_seconds=60, dispatch=recorder)
    assert uuid.UUID(job_id) in report.exhausted
    assert job_id not in recorder.ids()
    with db.connect() as conn:
        row = job_row(conn, job_id)
    assert row["status"] == "error"
    assert row["error_json"]["code"] == "attempts_exhausted"
    assert row["completed_at"] is not None


@pytest.mark.parametrize("status", ["done", "error", "canceled"])
def test_final_jobs_are_never_touched(app_env: dict, db: sa.Engine, owner: str, status: str) -> None:
    job_id = _job(db, owner, status=status, lease_seconds=-5)
    _age(db, job_id, 3600)
    with db.connect() as conn:
        before = job_row(conn, job_id)
    recorder = Recorder()
    rescue.rescue_jobs(stale_after_seconds=60, dispatch=recorder)
    assert job_id not in recorder.ids()
    with db.connect() as conn:
        assert job_row(conn, job_id) == before


def test_failed_dispatch_is_counted_and_the_job_stays_stale_for_the_next_run(
    app_env: dict, db: sa.Engine, owner: str
) -> None:
    job_id = _job(db, owner)
    _age(db, job_id, 3600)
    report = rescue.rescue_jobs(stale_after_seconds=60, dispatch=Recorder(ok=False))
    assert uuid.UUID(job_id) in report.failed
    with db.connect() as conn:
        assert job_row(conn, job_id)["status"] == "queued"
    # The very next run picks it up again instead of waiting a whole stale window.
    recorder = Recorder()
    again = rescue.rescue_jobs(stale_after_seconds=60, dispatch=recorder)
    assert uuid.UUID(job_id) in again.redispatched


def test_work_per_call_is_bounded(app_env: dict, db: sa.Engine, owner: str) -> None:
    ids = [_job(db, owner) for _ in range(6)]
    for job_id in ids:
        _age(db, job_id, 7200)  # older than anything other tests leave behind
    first = rescue.rescue_jobs(limit=4, stale_after_seconds=60, dispatch=Recorder())
    assert len(first.redispatched) == 4
    second = rescue.rescue_jobs(limit=100, stale_after_seconds=60, dispatch=Recorder())
    mine = {uuid.UUID(i) for i in ids}
    assert mine <= set(first.redispatched) | set(second.redispatched)


def test_concurrent_rescuers_never_dispatch_a_job_twice(app_env: dict, db: sa.Engine, owner: str) -> None:
    ids = [_job(db, owner) for _ in range(60)]
    with db.begin() as conn:
        conn.execute(
            sa.text("UPDATE jobs SET dispatched_at = now() - interval '2 hours' WHERE id::text = ANY(:ids)"),
            {"ids": ids},
        )
    recorder = Recorder()
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait(5)
            for _ in range(5):
                rescue.rescue_jobs(limit=7, stale_after_seconds=60, dispatch=recorder)
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    dispatched = [i for i in recorder.ids() if i in set(ids)]
    assert sorted(dispatched) == sorted(ids)  # every job once, none twice


# --- through the real function -------------------------------------------------------------------


@pytest.fixture(scope="module")
def rescue_stack(database_url: str, logs_dir: Path, calls_dir: Path) -> Stack:
    stack = start_stack(
        database_url,
        logs_dir,
        names=("create_job", "get_job", "rescue_jobs"),
        DYLEN_JOBS_AUTO_PROCESS="false",
        DYLEN_RESCUE_AFTER_SECONDS="1",
        DYLEN_LESSON_GENERATOR="tests.generators:generate",
        DYLEN_TEST_CALLS_DIR=str(calls_dir),
    )
    yield stack
    kill_all(stack)


def test_rescue_jobs_function_finishes_a_job_whose_dispatch_never_happened(
    rescue_stack: Stack, db: sa.Engine, user: str
) -> None:
    # Given a job accepted while dispatch was off (as if the queue had refused it)
    created = rescue_stack.create(user, lesson_body("Rescued topic"))
    assert created.status_code == 202
    job_id = created.json()["job_id"]
    _age(db, job_id, 60)
    # When the scheduler calls rescue_jobs
    body = call_rescue(rescue_stack)
    assert set(body) >= {"redispatched", "failed"}
    assert body["redispatched"] >= 1 and body["failed"] == 0
    # Then the job runs to done with exactly one lesson
    done = rescue_stack.wait_for(user, job_id, timeout=20)
    assert done["status"] == "done"
    assert lessons_per_job(db, [job_id]) == {job_id: 1}


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"X-Dylen-Task-Secret": "wrong"}, 403), ({"X-Dylen-User": "someone"}, 401)],
)
def test_rescue_jobs_requires_task_auth(rescue_stack: Stack, headers: dict, status: int) -> None:
    response = rescue_stack.http.post(rescue_stack.url("rescue_jobs") + "/", headers=headers, timeout=10)
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/problem+json")


def test_rescue_jobs_only_answers_post_at_its_root(rescue_stack: Stack) -> None:
    http = rescue_stack.http
    assert http.get(rescue_stack.url("rescue_jobs") + "/", timeout=10).status_code == 405
    response = http.post(
        rescue_stack.url("rescue_jobs") + "/x",
        headers={"X-Dylen-Task-Secret": "test-task-secret"},
        timeout=10,
    )
    assert response.status_code == 404


def test_rescuers_racing_deliveries_still_run_each_job_once(
    rescue_stack: Stack, db: sa.Engine, user: str, calls_dir: Path
) -> None:
    # Given stale jobs that direct deliveries and rescue runs (which dispatch them too) race for
    ids = [rescue_stack.create(user, lesson_body(f"Race {i}")).json()["job_id"] for i in range(12)]
    with db.begin() as conn:
        conn.execute(
            sa.text("UPDATE jobs SET dispatched_at = now() - interval '1 hour' WHERE id::text = ANY(:ids)"),
            {"ids": ids},
        )
    errors: list[str] = []

    def deliver_all() -> None:
        for job_id in ids:
            response = rescue_stack.deliver(job_id)
            if response.status_code not in (200, 503):
                errors.append(f"{response.status_code} {response.text[:200]}")

    def rescue_repeatedly() -> None:
        for _ in range(4):
            call_rescue(rescue_stack)

    threads = [threading.Thread(target=deliver_all) for _ in range(3)]
    threads += [threading.Thread(target=rescue_repeatedly) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    for job_id in ids:
        rescue_stack.wait_for(user, job_id, statuses=("done",), timeout=20)
    # Then every job ran its handler once and has exactly one lesson
    assert lessons_per_job(db, ids) == dict.fromkeys(ids, 1)
    assert {job_id: handler_runs(calls_dir, job_id) for job_id in ids} == dict.fromkeys(ids, 1)

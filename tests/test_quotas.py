"""Tier limits on lesson jobs: the daily quota and the active-job limit, through real create_job
processes on real PostgreSQL, exact under concurrency.

Jobs stay `queued` (auto-process off) unless a test moves them, so what counts is what the test did.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from tests.factories import make_user
from tests.support import (
    ROOT,
    FunctionServer,
    Stack,
    StackFactory,
    lesson_body,
    session,
    user_jobs_by_status,
)

DAILY = "free=10,starter=50,plus=200,pro=500"  # the defaults
ACTIVE = "free=2,starter=5,plus=10,pro=20"  # the defaults
OUT_OF_REACH = "free=1000000"


@pytest.fixture(scope="module")
def daily_stack(make_stack: StackFactory) -> Stack:
    """The default daily quota; the active limit out of reach (jobs stay queued here)."""
    return make_stack(
        DYLEN_JOBS_AUTO_PROCESS="false", DYLEN_TIER_DAILY_JOBS=DAILY, DYLEN_TIER_ACTIVE_JOBS=OUT_OF_REACH
    )


@pytest.fixture(scope="module")
def active_stack(make_stack: StackFactory) -> Stack:
    """The default active limit; the daily quota out of reach."""
    return make_stack(
        DYLEN_JOBS_AUTO_PROCESS="false", DYLEN_TIER_DAILY_JOBS=OUT_OF_REACH, DYLEN_TIER_ACTIVE_JOBS=ACTIVE
    )


@pytest.fixture(scope="module")
def second_create_job(daily_stack: Stack, logs_dir: Path) -> Iterator[FunctionServer]:
    """Another create_job process on the same database and configuration as daily_stack's."""
    server = FunctionServer("create_job", daily_stack.servers["create_job"].env, logs_dir).start()
    yield server
    server.stop()


def key() -> str:
    return uuid.uuid4().hex


def set_status(db: sa.Engine, job_id: str, status: str) -> None:
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET status = :s WHERE id = :id"), {"s": status, "id": job_id})


def seconds_to_utc_midnight() -> float:
    now = datetime.now(UTC)
    return (datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC) - now).total_seconds()


def assert_limited(
    response: requests.Response, *, slug: str, limit: int, used: int, tier: str
) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["type"].endswith("/" + slug)
    assert (problem["status"], problem["limit"], problem["used"], problem["tier"]) == (429, limit, used, tier)
    return problem


def parallel_creates(urls: list[str], user: str, n: int) -> list[requests.Response]:
    def one(i: int) -> requests.Response:
        with session() as http:
            return http.post(
                urls[i % len(urls)] + "/",
                json=lesson_body(f"Parallel {i}", key=key()),
                headers={"X-Dylen-User": user},
                timeout=60,
            )

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(one, range(n)))
    # Every answer is an acceptance or a refusal; anything else is shown, not just counted.
    others = [(r.status_code, r.text[:200]) for r in responses if r.status_code not in (202, 429)]
    assert not others, others
    return responses


# --- the daily quota --------------------------------------------------------------------------------


def test_the_tenth_is_accepted_the_eleventh_is_429_until_utc_midnight(
    daily_stack: Stack, db: sa.Engine, user: str
) -> None:
    first = daily_stack.create(user, lesson_body(key="first"))
    assert first.status_code == 202
    for i in range(2, 11):
        assert daily_stack.create(user, lesson_body(key=f"k{i}")).status_code == 202, i
    before = seconds_to_utc_midnight()
    refused = daily_stack.create(user, lesson_body(key="eleventh"))
    after = seconds_to_utc_midnight()
    assert_limited(refused, slug="quota-exceeded", limit=10, used=10, tier="free")
    assert after - 2 <= int(refused.headers["Retry-After"]) <= before + 2
    assert user_jobs_by_status(db, user) == {"queued": 10}  # nothing written

    # A replay of a key after the quota is spent is the same job, not a 429.
    again = daily_stack.create(user, lesson_body(key="first"))
    assert again.status_code == 200
    assert again.json()["job_id"] == first.json()["job_id"]
    # ... and the same key with another request is still 409, not 429.
    assert daily_stack.create(user, lesson_body("Other", key="first")).status_code == 409


def test_canceled_and_error_jobs_that_spent_nothing_give_the_quota_back_done_does_not(
    daily_stack: Stack, db: sa.Engine, user: str
) -> None:
    # Spent is spent (tests/test_spending.py): here nothing ran, the jobs stay queued until moved
    ids = [daily_stack.create(user, lesson_body(key=f"k{i}")).json()["job_id"] for i in range(10)]
    assert daily_stack.create(user, lesson_body(key="over")).status_code == 429

    assert daily_stack.cancel(user, ids[0]).status_code == 200
    assert daily_stack.create(user, lesson_body(key="after-cancel")).status_code == 202
    assert daily_stack.create(user, lesson_body(key="over-2")).status_code == 429

    set_status(db, ids[1], "error")  # failed before any attempt: it never cost the user anything
    assert daily_stack.create(user, lesson_body(key="after-error")).status_code == 202

    with db.begin() as conn:  # failed after an attempt ran: that attempt was spent
        conn.execute(sa.text("UPDATE jobs SET status = 'error', attempts = 1 WHERE id = :id"), {"id": ids[3]})
    assert daily_stack.create(user, lesson_body(key="over-after-spent-error")).status_code == 429

    set_status(db, ids[2], "done")  # a delivered lesson still counts
    assert_limited(
        daily_stack.create(user, lesson_body(key="over-3")),
        slug="quota-exceeded",
        limit=10,
        used=10,
        tier="free",
    )


def test_a_tier_change_takes_effect_on_the_next_create(
    daily_stack: Stack, user: str, database_url: str
) -> None:
    for i in range(10):
        assert daily_stack.create(user, lesson_body(key=f"k{i}")).status_code == 202
    assert daily_stack.create(user, lesson_body(key="over")).status_code == 429
    env = {**daily_stack.servers["create_job"].env, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "common.cli", "users", "set-tier", user, "starter"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert daily_stack.create(user, lesson_body(key="as-starter")).status_code == 202

    show = subprocess.run(
        [sys.executable, "-m", "common.cli", "users", "show", user],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert show.returncode == 0, show.stderr
    assert "tier     starter" in show.stdout
    assert "daily    11 of 50 lesson jobs" in show.stdout
    assert "active   11 of 1000000 lesson jobs queued, running or mid-call" in show.stdout


def test_usage_is_in_list_lessons(daily_stack: Stack, db: sa.Engine, user: str) -> None:
    fresh = daily_stack.list_lessons(user).json()["usage"]
    assert fresh["tier"] == "free"
    assert (fresh["daily"]["used"], fresh["daily"]["limit"], fresh["active"]["used"]) == (0, 10, 0)
    ids = [daily_stack.create(user, lesson_body(key=f"k{i}")).json()["job_id"] for i in range(3)]
    set_status(db, ids[0], "canceled")
    usage = daily_stack.list_lessons(user).json()["usage"]
    assert usage["daily"]["used"] == 2 and usage["active"]["used"] == 2
    resets = datetime.fromisoformat(usage["daily"]["resets_at"])
    assert resets == datetime.combine(datetime.now(UTC).date() + timedelta(days=1), datetime.min.time(), UTC)


# --- the active limit ----------------------------------------------------------------------------


def test_active_limit_frees_up_when_a_job_finishes(active_stack: Stack, db: sa.Engine, user: str) -> None:
    a = active_stack.create(user, lesson_body(key="a")).json()["job_id"]
    b = active_stack.create(user, lesson_body(key="b")).json()["job_id"]
    refused = active_stack.create(user, lesson_body(key="c"))
    assert_limited(refused, slug="too-many-active-jobs", limit=2, used=2, tier="free")
    assert 1 <= int(refused.headers["Retry-After"]) <= 10
    set_status(db, a, "running")  # running still counts
    assert active_stack.create(user, lesson_body(key="c")).status_code == 429
    set_status(db, a, "done")
    assert active_stack.create(user, lesson_body(key="c")).status_code == 202
    assert active_stack.cancel(user, b).status_code == 200
    assert active_stack.create(user, lesson_body(key="d")).status_code == 202
    assert active_stack.create(user, lesson_body(key="e")).status_code == 429
    assert active_stack.create(user, lesson_body(key="a")).status_code == 200  # a replay


def test_a_tier_missing_from_the_maps_gets_free_limits(active_stack: Stack, db: sa.Engine, user: str) -> None:
    with db.begin() as conn:
        make_user(conn, user, tier="legacy")
    for k in ("a", "b"):
        assert active_stack.create(user, lesson_body(key=k)).status_code == 202
    assert_limited(
        active_stack.create(user, lesson_body(key="c")),
        slug="too-many-active-jobs",
        limit=2,
        used=2,
        tier="legacy",
    )
    assert any(
        line.get("tier") == "legacy" and "free tier's limits" in line.get("message", "")
        for line in active_stack.servers["create_job"].log_lines()
    )


# --- exact under concurrency -----------------------------------------------------------------------


@pytest.mark.parametrize("round_", [1, 2, 3])
def test_fifty_parallel_creates_accept_exactly_the_quota_left(
    daily_stack: Stack, db: sa.Engine, user: str, round_: int
) -> None:
    assert daily_stack.create(user, lesson_body(key="spent")).status_code == 202  # 9 left
    codes = [r.status_code for r in parallel_creates([daily_stack.url("create_job")], user, 50)]
    assert (codes.count(202), codes.count(429)) == (9, 41), codes
    assert user_jobs_by_status(db, user) == {"queued": 10}


def test_fifty_parallel_creates_over_two_processes(
    daily_stack: Stack, second_create_job: FunctionServer, db: sa.Engine, user: str
) -> None:
    urls = [daily_stack.url("create_job"), second_create_job.url]
    codes = [r.status_code for r in parallel_creates(urls, user, 50)]
    assert (codes.count(202), codes.count(429)) == (10, 40), codes
    codes = [r.status_code for r in parallel_creates(urls, user, 50)]  # spent: nothing written
    assert codes.count(429) == 50
    assert user_jobs_by_status(db, user) == {"queued": 10}


def test_fifty_parallel_creates_respect_the_active_limit(
    active_stack: Stack, db: sa.Engine, user: str
) -> None:
    for _ in range(2):
        responses = parallel_creates([active_stack.url("create_job")], user, 50)
        accepted = [r.json()["job_id"] for r in responses if r.status_code == 202]
        assert len(accepted) == 2 and sum(r.status_code == 429 for r in responses) == 48
        for job_id in accepted:  # both finish: two more may start
            set_status(db, job_id, "done")
    assert user_jobs_by_status(db, user) == {"done": 4}


# --- in process: the injected clock, and what is never limited --------------------------------------


@pytest.fixture
def in_process(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from common.platform.config import reset_settings

    monkeypatch.setenv("DYLEN_JOBS_AUTO_PROCESS", "false")
    monkeypatch.setenv("DYLEN_TIER_DAILY_JOBS", "free=2")
    monkeypatch.setenv("DYLEN_TIER_ACTIVE_JOBS", "free=0")  # nothing limited may be created at all
    reset_settings()
    yield
    reset_settings()


def test_the_daily_quota_resets_at_utc_midnight(app_env: dict[str, str], user: str) -> None:
    from common.accounts import users
    from common.accounts.tiers import TIER_ADMISSION
    from common.jobs import transitions
    from common.jobs.model import Job
    from common.platform.db import connection

    late = datetime(2031, 3, 4, 23, 59, 58, 500000, tzinfo=UTC)

    def insert(k: str, now: datetime) -> Any:
        with connection() as conn:
            return transitions.create(
                conn, user_id=user, job_kind="lesson", idempotency_key=k,
                request_json={"job_kind": "lesson", "payload": {"topic": k}}, max_attempts=3,
                limits=transitions.Limits(daily={"free": 2}, active={"free": 100}), now=now,
            )  # fmt: skip

    assert insert("a", late).created_at == late
    assert insert("b", late + timedelta(seconds=1)) is not None
    refused = insert("c", late + timedelta(seconds=1))
    assert isinstance(refused, transitions.Refused)
    assert (refused.outcome, refused.limit, refused.used) == ("quota-exceeded", 2, 2)
    assert refused.resets_at == datetime(2031, 3, 5, tzinfo=UTC)
    assert TIER_ADMISSION.refusal(refused).headers["Retry-After"] == "1"  # 0.5 s, rounded up
    next_day = datetime(2031, 3, 5, 0, 0, 0, 1, tzinfo=UTC)
    assert isinstance(insert("c", next_day), Job)
    with connection() as conn:
        usage = users.usage(conn, user_id=user, job_kind="lesson", now=next_day)
    assert (usage.daily_used, usage.active_used) == (1, 3)


def test_maintenance_jobs_are_not_limited(in_process: None, user: str) -> None:
    from common.accounts.tiers import TooManyActiveJobs
    from common.jobs import service

    with pytest.raises(TooManyActiveJobs):
        service.create_job(user, lesson_body(key=key()))
    created = service.submit_job(
        user_id=None,
        job_kind="maintenance.archive_lessons",
        idempotency_key=f"test-{key()}",
        request_json={"job_kind": "maintenance.archive_lessons", "payload": {}},
    )
    assert created.created
    service.cancel(created.job.id, owner=None)  # out of the way of other tests' rescue runs


def test_the_429_is_as_openapi_documents_it(active_stack: Stack, user: str) -> None:
    import schemathesis

    operation = schemathesis.openapi.from_path(str(ROOT / "openapi.yaml"))["/create_job"]["POST"]
    for k in ("a", "b", "c"):
        response = active_stack.create(user, lesson_body(key=k))
    assert response.status_code == 429
    operation.validate_response(response)

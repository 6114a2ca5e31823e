"""Tiers bound what is spent: a lesson job counts for the day once anything of it ran (an attempt, a
model call), whatever its end; it is active while a model call of it can still run; a cancel stops
the calls it can; the user's tokens of the day are held to a budget at create; one user's calls in
flight never exceed their tier's share; operators give back a day's quota. Real processes (the
counting generator: every plan and section a model call) on real PostgreSQL, and in-process checks
of the database functions with an injected clock."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from tests.factories import make_job, make_user
from tests.faults import kill_all, start_stack, wait_until
from tests.generators import COUNTING_MODEL, COUNTING_TOKENS
from tests.support import (
    ROOT,
    FunctionServer,
    Stack,
    counted_calls,
    lesson_body,
    most_at_once,
    session,
)

DAILY = 10  # the free tier's lesson jobs a day (the default)
CALLS_PER_JOB = 1 + 2  # a plan and the two sections of a `highlights` lesson
TOKENS_PER_CALL = sum(COUNTING_TOKENS)
NAMES = ("create_job", "get_job", "cancel_job", "list_lessons")
COMMON = {
    "DYLEN_LESSON_GENERATOR": "tests.generators:counting",
    "DYLEN_JOB_MAX_ATTEMPTS": "1",  # a failing call is not retried: the bound is the formula
    "DYLEN_TIER_DAILY_JOBS": f"free={DAILY}",
    "DYLEN_TIER_ACTIVE_JOBS": "free=2",
    # 'tiny' (a tier of these tests) spends two calls' tokens a day; free's is out of reach here
    "DYLEN_TIER_DAILY_TOKENS": f"free=1000000000,tiny={2 * TOKENS_PER_CALL}",
    "DYLEN_TIER_CONCURRENT_CALLS": "free=2",
}


# This module's stacks are its own and stop with it: every process holds database connections.
@pytest.fixture(scope="module")
def spending(database_url: str, logs_dir: Path, calls_dir: Path) -> Iterator[Stack]:
    """Local dispatch on: lessons run as they would deployed."""
    stack = start_stack(database_url, logs_dir, names=NAMES, DYLEN_TEST_CALLS_DIR=str(calls_dir), **COMMON)
    yield stack
    kill_all(stack)


@pytest.fixture(scope="module")
def second_create_job(spending: Stack, logs_dir: Path) -> Iterator[FunctionServer]:
    server = FunctionServer("create_job", spending.servers["create_job"].env, logs_dir).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def manual(database_url: str, logs_dir: Path, calls_dir: Path) -> Iterator[Stack]:
    """Auto-process off: the test delivers each task, so it knows what ran."""
    stack = start_stack(
        database_url,
        logs_dir,
        names=NAMES,
        DYLEN_TEST_CALLS_DIR=str(calls_dir),
        DYLEN_JOBS_AUTO_PROCESS="false",
        **COMMON,
    )
    yield stack
    kill_all(stack)


def _accepted(response: requests.Response) -> str:
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def _usage(stack: Stack, user: str) -> dict[str, Any]:
    response = stack.list_lessons(user)
    assert response.status_code == 200, response.text
    usage: dict[str, Any] = response.json()["usage"]
    return usage


def _quiet(stack: Stack, user: str) -> None:
    """Until nothing of the user's can still spend: no job live, no call in flight."""
    wait_until(lambda: _usage(stack, user)["active"]["used"] == 0, timeout=30, what="the user's jobs to end")


def _ledger(db: sa.Engine, user: str) -> list[Any]:
    with db.connect() as conn:
        return list(
            conn.execute(sa.text("SELECT * FROM model_calls WHERE user_id = :u ORDER BY id"), {"u": user})
        )


def _in_flight(db: sa.Engine, job_id: str) -> int:
    with db.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM model_calls WHERE job_id = :id AND ended_at IS NULL"),
                {"id": job_id},
            ).scalar_one()
        )


def _sections(db: sa.Engine, job_id: str) -> list[Any]:
    with db.connect() as conn:
        return list(
            conn.execute(
                sa.text("SELECT id, status FROM jobs WHERE parent_id = :id ORDER BY section_index"),
                {"id": job_id},
            )
        )


def _limited(response: requests.Response, slug: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem["type"].endswith("/" + slug), problem
    return problem


def _seconds_to_utc_midnight() -> float:
    now = datetime.now(UTC)
    return (datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC) - now).total_seconds()


def _parallel_creates(urls: list[str], user: str, n: int, *, tag: str) -> list[requests.Response]:
    def one(i: int) -> requests.Response:
        with session() as http:
            return http.post(
                urls[i % len(urls)] + "/",
                json=lesson_body(f"Parallel {tag}.{i}"),
                headers={"X-Dylen-User": user},
                timeout=30,
            )

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


# --- spent is spent, end to end -----------------------------------------------------------------------


def test_a_free_users_model_calls_in_a_day_never_exceed_daily_jobs_times_calls_per_job(
    spending: Stack,
    second_create_job: FunctionServer,
    db: sa.Engine,
    user: str,
    calls_dir: Path,
    tmp_path: Path,
) -> None:
    stack = spending
    replays: list[tuple[dict[str, Any], str]] = []  # (request, its job id)

    def create(topic: str) -> str:
        body = lesson_body(topic)
        replays.append((body, _accepted(stack.create(user, body))))
        return replays[-1][1]

    # Cancel at once, over and over (the issue: 1,867 plan calls in 60 s, quota used 0)
    for i in range(3):
        assert stack.cancel(user, create(f"At once {i}")).status_code in (200, 409)
    _quiet(stack, user)

    # Cancel after the plan, its two sections claimed but not yet calling: they never call
    gate = tmp_path / "after-plan"
    planned = create(f"wait:{gate} After plan")
    wait_until(
        lambda: [s.status for s in _sections(db, planned)] == ["running", "running"],
        timeout=20,
        what="both sections claimed",
    )
    assert stack.cancel(user, planned).status_code == 200
    gate.touch()
    _quiet(stack, user)
    assert [c.what for c in counted_calls(calls_dir, user) if c.job_id == planned] == ["plan"]

    # Cancel mid-sections: the job stays active while its calls run, and still counts after
    gate = tmp_path / "mid-sections"
    mid = create(f"hold:{gate} Mid sections")
    wait_until(lambda: _in_flight(db, mid) == 2, timeout=20, what="both section calls in flight")
    assert stack.cancel(user, mid).status_code == 200
    assert _usage(stack, user)["active"]["used"] == 1  # canceled, and still spending
    gate.touch()
    _quiet(stack, user)
    assert stack.get_job(user, mid).json()["status"] == "canceled"  # their results were discarded

    # Failing topics: an error after a call costs the job
    for topic in ("fail-plan Broken", "fail-section:1 Broken section"):
        assert stack.wait_for(user, create(topic))["status"] == "error"
    _quiet(stack, user)

    # Parallel creates over two processes, canceled at once or left to run, until the day is spent
    urls = [stack.url("create_job"), second_create_job.url]
    for round_ in range(12):
        answers = _parallel_creates(urls, user, 6, tag=str(round_))
        assert {a.status_code for a in answers} <= {202, 429}, [a.text for a in answers]
        for n, answer in enumerate(a for a in answers if a.status_code == 202):
            if n % 2 == 0:
                stack.cancel(user, answer.json()["job_id"])
        _quiet(stack, user)
        if any(a.status_code == 429 and a.json()["type"].endswith("/quota-exceeded") for a in answers):
            break

    # Then 429 until UTC midnight; a replay is still its job (200), and starts nothing
    problem = _limited(stack.create(user, lesson_body("One more")), "quota-exceeded")
    assert (problem["limit"], problem["used"], problem["tier"]) == (DAILY, DAILY, "free")
    for body, job_id in replays:
        again = stack.create(user, body)
        assert (again.status_code, again.json()["job_id"]) == (200, job_id)

    calls = counted_calls(calls_dir, user)
    ledger = _ledger(db, user)
    assert len(ledger) == len(calls) <= DAILY * CALLS_PER_JOB
    assert len({c.job_id for c in calls}) <= DAILY
    assert all(row.ended_at is not None for row in ledger)
    assert _usage(stack, user)["daily"]["used"] == DAILY


def test_one_users_calls_in_flight_never_exceed_the_tiers_share(
    spending: Stack, db: sa.Engine, calls_dir: Path
) -> None:
    heavy, light = f"user-{uuid.uuid4().hex[:12]}", f"user-{uuid.uuid4().hex[:12]}"
    # A `detailed` lesson: six sections at once, each call 0.4 s; the free tier's share is 2
    big = _accepted(spending.create(heavy, lesson_body("slow:0.4 Burst", depth="detailed")))
    wait_until(lambda: _in_flight(db, big) >= 1 and len(_sections(db, big)) == 6, timeout=20, what="sections")
    # Another user's lesson meanwhile is not stuck behind the burst
    small = _accepted(spending.create(light, lesson_body("slow:0.1 Meanwhile")))
    assert spending.wait_for(light, small, timeout=30)["status"] == "done"
    light_done = time.time()
    assert spending.wait_for(heavy, big, timeout=60)["status"] == "done"
    calls = counted_calls(calls_dir, heavy)
    assert len(calls) == 1 + 6
    assert most_at_once(calls) == 2  # the share, and the share was used
    assert light_done < max(c.end for c in calls)
    # Waiting for the share is a deferral: no section used more than its one attempt
    with db.connect() as conn:
        used = conn.execute(
            sa.text("SELECT max(attempts - deferrals) FROM jobs WHERE parent_id = :id"), {"id": big}
        ).scalar_one()
    assert used == 1


# --- a cancel stops what it can, and gives back what was not spent ------------------------------------


def test_a_cancel_before_any_model_call_gives_the_quota_back_after_one_it_does_not(
    manual: Stack, db: sa.Engine, user: str
) -> None:
    def daily() -> tuple[int, int]:
        usage = _usage(manual, user)
        return usage["daily"]["used"], usage["active"]["used"]

    untouched = _accepted(manual.create(user, lesson_body("Never claimed")))
    assert daily() == (1, 1)
    assert manual.cancel(user, untouched).status_code == 200
    assert daily() == (0, 0)

    # Claimed, but the claim given back (the provider said "not now") before any call
    deferred = _accepted(manual.create(user, lesson_body("later-plan:60 Not now")))
    assert manual.deliver(deferred).json()["outcome"] == "deferred"
    assert manual.cancel(user, deferred).status_code == 200
    assert daily() == (0, 0)

    # Planned (one model call made), then canceled: spent
    planned = _accepted(manual.create(user, lesson_body("Planned")))
    assert manual.deliver(planned).json()["status"] == "running"
    assert manual.cancel(user, planned).status_code == 200
    assert daily() == (1, 0)
    for section in _sections(db, planned):  # their tasks still arrive: nothing runs
        assert manual.deliver(str(section.id)).json()["outcome"] == "already_final"

    # Failed after its call: spent
    failed = _accepted(manual.create(user, lesson_body("fail-plan Broken")))
    assert manual.deliver(failed).json()["outcome"] == "failed"
    assert daily() == (2, 0)
    assert [(r.purpose, r.outcome) for r in _ledger(db, user)] == [("plan", "ok"), ("plan", "error")]


def test_a_section_claimed_before_the_cancel_makes_no_model_call_after_it(
    manual: Stack, db: sa.Engine, user: str, calls_dir: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    job_id = _accepted(manual.create(user, lesson_body(f"wait:{gate} Canceled between")))
    assert manual.deliver(job_id).json()["status"] == "running"  # planned
    first, second = (str(s.id) for s in _sections(db, job_id))
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(manual.deliver, first)  # claimed, waiting at the gate before its call
        wait_until(lambda: _sections(db, job_id)[0].status == "running", timeout=20, what="the claim")
        assert manual.cancel(user, job_id).status_code == 200
        gate.touch()
        # The attempt ends quietly: its job is no longer its to fail
        assert answer.result(timeout=30).json()["outcome"] == "superseded"
    assert manual.deliver(second).json()["outcome"] == "already_final"
    assert [c.what for c in counted_calls(calls_dir, user)] == ["plan"]
    assert [r.purpose for r in _ledger(db, user)] == ["plan"]


# --- token budgets ----------------------------------------------------------------------------------------


def test_the_token_budget_answers_429_once_spent_and_an_operator_refund_gives_it_back(
    spending: Stack, db: sa.Engine, user: str
) -> None:
    import schemathesis

    with db.begin() as conn:
        make_user(conn, user, tier="tiny")
    budget = 2 * TOKENS_PER_CALL
    # Under budget at create: the lesson runs, and overshoots by at most its own cost
    job_id = _accepted(spending.create(user, lesson_body("Within budget")))
    assert spending.wait_for(user, job_id)["status"] == "done"
    spent = CALLS_PER_JOB * TOKENS_PER_CALL
    assert budget <= spent <= budget + CALLS_PER_JOB * TOKENS_PER_CALL
    before = _seconds_to_utc_midnight()
    refused = spending.create(user, lesson_body("Over budget"))
    after = _seconds_to_utc_midnight()
    problem = _limited(refused, "token-budget-exceeded")
    assert (problem["limit"], problem["used"], problem["tier"]) == (budget, spent, "tiny")
    assert after - 2 <= int(refused.headers["Retry-After"]) <= before + 2
    operation = schemathesis.openapi.from_path(str(ROOT / "openapi.yaml"))["/create_job"]["POST"]
    operation.validate_response(refused)
    usage = _usage(spending, user)
    assert usage["tokens"] == {"limit": budget, "used": spent}
    assert usage["daily"]["used"] == 1

    # A failure of ours: the operator gives back the day's tokens (never more than were spent)
    env = {**spending.servers["create_job"].env, "PYTHONPATH": str(ROOT)}
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "common.cli", "users", "refund", user, "--jobs", "5", "--tokens", "100000"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"gave back 1 lesson jobs and {spent} tokens" in run.stdout
    assert _usage(spending, user)["tokens"] == {"limit": budget, "used": 0}
    assert _usage(spending, user)["daily"]["used"] == 0
    assert (
        spending.wait_for(user, _accepted(spending.create(user, lesson_body("After refund"))))["status"]
        == "done"
    )


def _insert(user: str, key: str, now: datetime, tokens: dict[str, int]) -> Any:
    from common.jobs import transitions
    from common.platform.db import connection

    with connection() as conn:
        return transitions.create(
            conn, user_id=user, job_kind="lesson", idempotency_key=key,
            request_json={"job_kind": "lesson", "payload": {"topic": key}}, max_attempts=3,
            limits=transitions.Limits(daily={"free": 100}, active={"free": 100}, tokens=tokens), now=now,
        )  # fmt: skip


def _spend(user: str, input_tokens: int, output_tokens: int, *, at: datetime, db: sa.Engine) -> None:
    from common.models.lanes import CallContext, model_call

    with model_call(CallContext(user_id=user), COUNTING_MODEL, purpose="test") as call:
        call.usage(input_tokens, output_tokens)
    with db.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE model_calls SET started_at = :at WHERE id = (SELECT max(id) FROM model_calls "
                "WHERE user_id = :u)"
            ),
            {"at": at, "u": user},
        )


def test_the_token_budget_boundary_its_reset_at_utc_midnight_and_a_tier_change(
    app_env: dict[str, str], db: sa.Engine, user: str
) -> None:
    from common.accounts import users
    from common.accounts.tiers import TIER_ADMISSION, TokenBudgetExceeded
    from common.jobs import transitions
    from common.jobs.model import Job
    from common.models import lanes
    from common.platform.db import connection

    tokens = {"free": 1000, "plus": 5000}
    late = datetime(2031, 3, 4, 23, 59, 58, 500000, tzinfo=UTC)
    with db.begin() as conn:
        make_user(conn, user)
    _spend(user, 900, 99, at=late, db=db)
    assert isinstance(_insert(user, "a", late, tokens), Job)  # 999 of 1000
    _spend(user, 1, 0, at=late, db=db)
    refused = _insert(user, "b", late + timedelta(seconds=1), tokens)  # 1000 of 1000
    assert isinstance(refused, transitions.Refused)
    assert (refused.outcome, refused.limit, refused.used, refused.tier) == (
        "token-budget-exceeded",
        1000,
        1000,
        "free",
    )
    assert refused.resets_at == datetime(2031, 3, 5, tzinfo=UTC)
    error = TIER_ADMISSION.refusal(refused)
    assert isinstance(error, TokenBudgetExceeded) and error.headers["Retry-After"] == "1"  # 0.5 s, rounded up
    # A new UTC day has a new budget
    assert isinstance(_insert(user, "b", datetime(2031, 3, 5, 0, 0, 0, 1, tzinfo=UTC), tokens), Job)
    # A tier change takes effect at the next create
    with db.begin() as conn:
        make_user(conn, user, tier="plus")
    assert isinstance(_insert(user, "c", late + timedelta(seconds=1), tokens), Job)
    # A call not settled yet counts its estimate
    context = lanes.CallContext(user_id=user)
    lanes.take_slot(context, COUNTING_MODEL, purpose="test", prompt_version=None, estimated_tokens=4000,
                    lease_seconds=30)  # fmt: skip
    with db.begin() as conn:
        conn.execute(
            sa.text("UPDATE model_calls SET started_at = :at WHERE user_id = :u"), {"at": late, "u": user}
        )
    with connection() as conn:
        assert users.usage(conn, user_id=user, job_kind="lesson", now=late).tokens_used == 5000
    assert _insert(user, "d", late, tokens).outcome == "token-budget-exceeded"


# --- the share, in process: exact across sessions -------------------------------------------------------


def test_the_share_holds_across_sessions_for_any_model_and_follows_the_tier(
    app_env: dict[str, str], db: sa.Engine, monkeypatch: pytest.MonkeyPatch, user: str
) -> None:
    from common.models.lanes import CallContext, model_call
    from common.models.settings import model_settings
    from common.platform.errors import RetryLater

    with db.begin() as conn:
        make_user(conn, user)
    context = CallContext(user_id=user, shares={"free": 2, "plus": 5})
    lock = threading.Lock()
    inside = most = 0

    def one(i: int) -> None:
        nonlocal inside, most
        while True:
            try:  # three models: the share is the user's, whatever the model
                with model_call(context, f"m-{i % 3}-{user}", purpose="test"):
                    with lock:
                        inside += 1
                        most = max(most, inside)
                    time.sleep(0.05)
                    with lock:
                        inside -= 1
                return
            except RetryLater:  # over the share past its short wait: as a deferred job, again later
                time.sleep(0.05)

    def burst() -> int:
        nonlocal most
        most = 0
        with ThreadPoolExecutor(8) as pool:  # each its own database session, as instances are
            list(pool.map(one, range(24)))
        return most

    assert burst() == 2
    with db.begin() as conn:
        make_user(conn, user, tier="plus")
    assert burst() == 5
    # Over the share past its short wait: RetryLater (a deferral), nothing taken
    monkeypatch.setenv("DYLEN_MODEL_SLOT_WAIT_SECONDS", "0")
    model_settings.reset()
    one_share = CallContext(user_id=user, shares={"free": 1})
    with db.begin() as conn:
        make_user(conn, user, tier="free")
    with (
        model_call(one_share, "m-a", purpose="test"),
        pytest.raises(RetryLater) as later,
        model_call(one_share, "m-b", purpose="test"),
    ):
        pass
    assert later.value.reason == "user_share" and 1 <= later.value.after_seconds <= 2
    with (  # no shares given: not held to one
        model_call(CallContext(user_id=user), "m-a", purpose="test"),
        model_call(CallContext(user_id=user), "m-b", purpose="test"),
    ):
        pass
    model_settings.reset()  # the next reader loads the environment as monkeypatch leaves it


def test_a_call_for_a_job_that_ended_is_not_made(app_env: dict[str, str], db: sa.Engine, user: str) -> None:
    from common.models.lanes import CallContext, JobEnded, model_call
    from common.platform.errors import PermanentJobError

    with db.begin() as conn:
        make_user(conn, user)
        ended = {
            status: make_job(conn, user_id=user, status=status) for status in ("canceled", "error", "done")
        }
        live = make_job(conn, user_id=user, status="running")
    for job_id in ended.values():
        with (
            pytest.raises(JobEnded) as stopped,
            model_call(CallContext(uuid.UUID(job_id), user_id=user), "m", purpose="x"),
        ):
            pass
        assert isinstance(stopped.value, PermanentJobError) and stopped.value.code == "job_ended"
    with model_call(CallContext(uuid.UUID(live), user_id=user), "m", purpose="x"):
        pass
    assert [row.job_id for row in _ledger(db, user)] == [uuid.UUID(live)]


# --- settings and the operator's refund ---------------------------------------------------------------------


def test_the_tier_settings_of_spending(app_env: dict[str, str]) -> None:
    from common.accounts.settings import tier_settings
    from common.platform.errors import ConfigError

    defaults = tier_settings.load({})
    assert defaults.daily_tokens == {"free": 200000, "starter": 1000000, "plus": 4000000, "pro": 10000000}
    assert defaults.concurrent_calls == {"free": 2, "starter": 4, "plus": 8, "pro": 16}
    for env in (
        {"DYLEN_TIER_DAILY_TOKENS": "pro=1"},
        {"DYLEN_TIER_DAILY_TOKENS": "free=lots"},
        {"DYLEN_TIER_CONCURRENT_CALLS": "free=0"},
    ):
        with pytest.raises(ConfigError, match=next(iter(env))):
            tier_settings.load(env)


def test_users_refund_gives_back_at_most_the_day_and_users_show_reports_tokens(
    app_env: dict[str, str], db: sa.Engine, user: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from common import cli

    with db.begin() as conn:
        make_user(conn, user)
        for status in ("done", "error", "canceled"):  # spent; spent (an attempt ran); not spent
            make_job(conn, user_id=user, status=status, attempts=0 if status == "canceled" else 1)
    _spend(user, 700, 300, at=datetime.now(UTC), db=db)
    assert cli.main(["users", "show", user]) == 0
    out = capsys.readouterr().out
    assert "daily    2 of " in out and "tokens   1000 of 1000000000000 model tokens today (UTC)" in out
    assert cli.main(["users", "refund", user, "--jobs", "1", "--tokens", "400"]) == 0
    assert "gave back 1 lesson jobs and 400 tokens of today (UTC)\n" in capsys.readouterr().out
    assert cli.main(["users", "refund", user, "--jobs", "3", "--tokens", "4000"]) == 0
    assert (
        "gave back 1 lesson jobs and 600 tokens of today (UTC) (all the day counted)"
        in capsys.readouterr().out
    )
    assert cli.main(["users", "show", user]) == 0
    out = capsys.readouterr().out
    assert "daily    0 of " in out and "tokens   0 of " in out
    assert cli.main(["users", "refund", "no-such-user", "--jobs", "1"]) != 0

"""`python -m common.cli jobs ...` against the real test database: in-process and as a real process.

The database is shared by the whole run, so every assertion is scoped to this test's own user (or a
job kind made up for the test), never to global counts.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from common import cli
from common.platform.config import reset_settings
from tests.factories import job_row, make_failed_fanout, make_job, make_user
from tests.support import ROOT, base_env, free_port


@dataclass
class Run:
    code: int
    out: str
    err: str


Cli = Callable[..., Run]


@pytest.fixture
def jobs_cli(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Cli]:
    """`common.cli.main(["jobs", ...])` in this process, on the test database, dispatch off."""
    monkeypatch.setenv("DYLEN_JOBS_AUTO_PROCESS", "false")
    reset_settings()
    from common.platform.log import logger

    streams = [(h, h.stream) for h in logger.handlers if type(h) is logging.StreamHandler]

    def run(*args: str) -> Run:
        capsys.readouterr()
        code = cli.main(["jobs", *args])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    yield run
    for handler, stream in streams:  # the CLI sends log lines to stderr; give them back
        handler.stream = stream


def run_process(database_url: str, *args: str, stdin: str | None = None, **env: str) -> Run:
    """The CLI as an operator runs it: its own process, configured by the environment only."""
    full_env = base_env(
        database_url, PYTHONPATH=str(ROOT), DYLEN_JOBS_AUTO_PROCESS="false", DYLEN_ENV_FILE=os.devnull, **env
    )
    done = subprocess.run(
        [sys.executable, "-m", "common.cli", "jobs", *args],
        env=full_env,
        cwd=ROOT,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def _set(db: sa.Engine, job_id: str, sql: str) -> None:
    with db.begin() as conn:
        conn.execute(sa.text(f"UPDATE jobs SET {sql} WHERE id = :id"), {"id": job_id})


def _error(message: str = "boom") -> dict[str, Any]:
    return {"code": "handler_failed", "message": message, "attempt": 1}


@pytest.fixture
def owner(db: sa.Engine, user: str) -> str:
    with db.begin() as conn:
        make_user(conn, user)
    return user


# --- list ------------------------------------------------------------------------------------------


def test_list_filters_by_user_status_kind_and_age(jobs_cli: Cli, db: sa.Engine, owner: str) -> None:
    with db.begin() as conn:
        queued = make_job(conn, user_id=owner, status="queued")
        failed = make_job(conn, user_id=owner, status="error", error=_error("the model is down"))
        old = make_job(conn, user_id=owner, status="queued")
    _set(db, old, "created_at = now() - interval '2 hours'")

    everything = jobs_cli("list", "--user", owner, "--json")
    assert everything.code == 0, everything.err
    listed = json.loads(everything.out)
    assert {j["job_id"] for j in listed} == {queued, failed, old}
    assert [j["job_id"] for j in listed][-1] == old  # newest first
    assert all(j["user_id"] == owner for j in listed)

    by_status = json.loads(jobs_cli("list", "--user", owner, "--status", "error", "--json").out)
    assert [j["job_id"] for j in by_status] == [failed]
    assert by_status[0]["error"]["message"] == "the model is down"
    several = json.loads(jobs_cli("list", "--user", owner, "--status", "error,queued", "--json").out)
    assert len(several) == 3
    by_kind = json.loads(jobs_cli("list", "--user", owner, "--kind", "lesson", "--json").out)
    assert len(by_kind) == 3
    stuck = json.loads(
        jobs_cli("list", "--user", owner, "--status", "queued", "--older-than", "1h", "--json").out
    )
    assert [j["job_id"] for j in stuck] == [old]
    assert json.loads(jobs_cli("list", "--user", owner, "--older-than", "3h", "--json").out) == []
    limited = json.loads(jobs_cli("list", "--user", owner, "--limit", "2", "--json").out)
    assert len(limited) == 2


def test_list_by_a_section_kind_lists_the_sections_other_lists_roll_them_up(
    jobs_cli: Cli, db: sa.Engine, user: str
) -> None:
    with db.begin() as conn:
        parent, sections = make_failed_fanout(conn, user_id=user)
    listed = json.loads(jobs_cli("list", "--kind", "lesson.section", "--user", user, "--json").out)
    assert {j["job_id"] for j in listed} == set(sections)
    plain = json.loads(jobs_cli("list", "--user", user, "--json").out)
    assert [j["job_id"] for j in plain] == [parent]


def test_list_prints_a_readable_table(jobs_cli: Cli, db: sa.Engine, owner: str) -> None:
    with db.begin() as conn:
        failed = make_job(conn, user_id=owner, status="error", error=_error("the model is down"))
    result = jobs_cli("list", "--user", owner)
    assert result.code == 0
    header, row = result.out.strip().splitlines()
    assert header.split() == ["JOB", "ID", "KIND", "STATUS", "USER", "ATTEMPTS", "AGE", "UPDATED", "ERROR"]
    assert row.split()[:5] == [failed, "lesson", "error", owner, "0/3"]
    assert "handler_failed: the model is down" in row
    nothing = jobs_cli("list", "--user", f"nobody-{uuid.uuid4().hex[:8]}")
    assert (nothing.code, nothing.out.strip()) == (0, "No jobs match.")


# --- show ------------------------------------------------------------------------------------------


def test_show_gives_attempts_timings_error_and_result(jobs_cli: Cli, db: sa.Engine, owner: str) -> None:
    with db.begin() as conn:
        job_id = make_job(conn, user_id=owner, status="error", attempts=3, error=_error("gave up"))
    _set(db, job_id, "started_at = now() - interval '90 seconds', completed_at = now()")
    text = jobs_cli("show", job_id)
    assert text.code == 0, text.err
    assert f"job         {job_id}" in text.out
    assert "status      error" in text.out
    assert "attempts    3 of 3" in text.out
    assert "took        1m30s" in text.out
    assert '"message": "gave up"' in text.out
    detail = json.loads(jobs_cli("show", job_id, "--json").out)
    assert detail["status"] == "error"
    assert (detail["attempts"], detail["max_attempts"]) == (3, 3)
    assert detail["started_at"] and detail["completed_at"] and detail["created_at"]
    assert detail["error"]["message"] == "gave up"
    assert detail["result"] is None
    assert detail["request"]["job_kind"] == "lesson"


# --- cancel ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["queued", "running"])
def test_cancel_a_live_job(jobs_cli: Cli, db: sa.Engine, owner: str, status: str) -> None:
    with db.begin() as conn:
        job_id = make_job(
            conn, user_id=owner, status=status, attempts=1 if status == "running" else 0, lease_seconds=60
        )
    result = jobs_cli("cancel", job_id)
    assert result.code == 0, result.err
    assert f"canceled {job_id}" in result.out
    with db.connect() as conn:
        row = job_row(conn, job_id)
    assert row["status"] == "canceled"
    assert row["lease_expires_at"] is None
    assert row["completed_at"] is not None


@pytest.mark.parametrize("status", ["done", "error", "canceled"])
def test_cancel_a_final_job_is_refused(jobs_cli: Cli, db: sa.Engine, owner: str, status: str) -> None:
    with db.begin() as conn:
        job_id = make_job(conn, user_id=owner, status=status)
        before = job_row(conn, job_id)
    result = jobs_cli("cancel", job_id)
    assert result.code != 0
    assert (
        result.err
        == f"error: Job {job_id} is already {status}; only queued or running jobs can be canceled.\n"
    )
    with db.connect() as conn:
        assert job_row(conn, job_id) == before


# --- retry -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["error", "canceled"])
def test_retry_one_requeues_with_fresh_attempts_and_a_new_dispatch_time(
    jobs_cli: Cli, db: sa.Engine, owner: str, status: str
) -> None:
    with db.begin() as conn:
        job_id = make_job(
            conn, user_id=owner, status=status, attempts=3, max_attempts=3, error=_error("down")
        )
    _set(
        db,
        job_id,
        "dispatched_at = now() - interval '1 hour', started_at = now() - interval '1 hour', completed_at = now()",
    )
    with db.connect() as conn:
        before = job_row(conn, job_id)
    result = jobs_cli("retry", job_id)
    assert result.code == 0, result.err
    assert f"requeued {job_id} (attempts 3, now up to 8)" in result.out
    assert "not dispatched (DYLEN_JOBS_AUTO_PROCESS=false)" in result.out
    with db.connect() as conn:
        row = job_row(conn, job_id)
    assert row["status"] == "queued"
    # attempts stay (the finish's fencing token); the budget is fresh: 5 more (DYLEN_JOB_MAX_ATTEMPTS)
    assert (row["attempts"], row["max_attempts"]) == (3, 8)
    assert row["dispatched_at"] - before["dispatched_at"] > timedelta(minutes=59)
    assert row["started_at"] is None and row["completed_at"] is None and row["lease_expires_at"] is None
    assert row["error_json"] == before["error_json"]  # kept as history until the job is done


@pytest.mark.parametrize("status", ["queued", "running", "done"])
def test_retry_of_a_job_that_is_not_error_or_canceled_is_refused(
    jobs_cli: Cli, db: sa.Engine, owner: str, status: str
) -> None:
    with db.begin() as conn:
        job_id = make_job(conn, user_id=owner, status=status)
        before = job_row(conn, job_id)
    result = jobs_cli("retry", job_id)
    assert result.code != 0
    assert f"is {status}; only error or canceled jobs can be retried" in result.err
    with db.connect() as conn:
        assert job_row(conn, job_id) == before


def test_retry_never_requeues_a_job_that_has_a_lesson(jobs_cli: Cli, db: sa.Engine, owner: str) -> None:
    # Cannot arise through the product (the lesson commits with `done`); the guard still holds.
    with db.begin() as conn:
        job_id = make_job(conn, user_id=owner, status="error")
        conn.execute(
            sa.text(
                "INSERT INTO lessons (id, user_id, job_id, topic, title, content) "
                "VALUES (:id, :user, :job, 't', 'T', '{}')"
            ),
            {"id": str(uuid.uuid4()), "user": owner, "job": job_id},
        )
    result = jobs_cli("retry", job_id)
    assert result.code != 0
    assert "already has a lesson" in result.err
    with db.connect() as conn:
        assert job_row(conn, job_id)["status"] == "error"


def _bulk_fixture(db: sa.Engine, owner: str) -> dict[str, str]:
    with db.begin() as conn:
        jobs = {
            "recent_error_1": make_job(conn, user_id=owner, status="error", error=_error()),
            "recent_error_2": make_job(conn, user_id=owner, status="error", error=_error()),
            "old_error": make_job(conn, user_id=owner, status="error", error=_error()),
            "recent_canceled": make_job(conn, user_id=owner, status="canceled"),
            "done": make_job(conn, user_id=owner, status="done"),
        }
    for name, job_id in jobs.items():
        ago = "3 hours" if name == "old_error" else "1 minute"
        _set(db, job_id, f"completed_at = now() - interval '{ago}'")
    return jobs


def _statuses(db: sa.Engine, jobs: dict[str, str]) -> dict[str, str]:
    with db.connect() as conn:
        return {name: job_row(conn, job_id)["status"] for name, job_id in jobs.items()}


def test_bulk_retry_with_yes_requeues_exactly_the_matching_jobs(
    jobs_cli: Cli, db: sa.Engine, owner: str
) -> None:
    jobs = _bulk_fixture(db, owner)
    result = jobs_cli(
        "retry", "--status", "error", "--kind", "lesson", "--since", "1h", "--user", owner, "--yes"
    )
    assert result.code == 0, result.err
    assert "2 job(s) match" in result.out
    assert "retried 2 job(s)" in result.out
    assert _statuses(db, jobs) == {
        "recent_error_1": "queued",
        "recent_error_2": "queued",
        "old_error": "error",
        "recent_canceled": "canceled",
        "done": "done",
    }
    # without --status, both error and canceled jobs qualify
    again = jobs_cli("retry", "--user", owner, "--yes")
    assert "retried 2 job(s)" in again.out
    assert _statuses(db, jobs)["old_error"] == _statuses(db, jobs)["recent_canceled"] == "queued"
    nothing = jobs_cli("retry", "--user", owner, "--yes")
    assert (nothing.code, nothing.out.strip()) == (0, "No jobs match; nothing to retry.")


def test_bulk_retry_asks_and_aborts_without_an_answer(database_url: str, db: sa.Engine, owner: str) -> None:
    jobs = _bulk_fixture(db, owner)
    before = _statuses(db, jobs)
    args = ("retry", "--status", "error", "--since", "1h", "--user", owner)
    no_stdin = run_process(database_url, *args)  # stdin at EOF: never assume yes
    assert no_stdin.code == 1
    assert "2 job(s) match" in no_stdin.out
    assert "Retry 2 job(s)? [y/N]" in no_stdin.out
    assert "Aborted; nothing was retried." in no_stdin.err
    assert "Traceback" not in no_stdin.err
    declined = run_process(database_url, *args, stdin="n\n")
    assert declined.code == 1
    assert _statuses(db, jobs) == before
    accepted = run_process(database_url, *args, stdin="y\n")
    assert accepted.code == 0, accepted.err
    assert "retried 2 job(s)" in accepted.out
    assert _statuses(db, jobs)["recent_error_1"] == "queued"
    assert _statuses(db, jobs)["old_error"] == "error"


# --- stats -----------------------------------------------------------------------------------------


@pytest.fixture
def fresh_kind(db: sa.Engine) -> Iterator[str]:
    """A job kind only this test uses, so its counts are exact; its rows are removed afterwards."""
    kind = f"opsstat-{uuid.uuid4().hex[:8]}"
    yield kind
    with db.begin() as conn:
        conn.execute(sa.text("DELETE FROM jobs WHERE job_kind = :k"), {"k": kind})


def test_stats_counts_by_kind_and_status_oldest_queued_and_error_rate(
    jobs_cli: Cli, db: sa.Engine, owner: str, fresh_kind: str
) -> None:
    with db.begin() as conn:
        made = {
            s: make_job(conn, user_id=owner, job_kind=fresh_kind, status=s) for s in ("running", "canceled")
        }
        oldest = make_job(conn, user_id=owner, job_kind=fresh_kind, status="queued")
        finished = [
            make_job(conn, user_id=owner, job_kind=fresh_kind, status=s) for s in ("done", "done", "error")
        ]
    # Waiting for 30 days: older than anything another test leaves queued
    _set(db, oldest, "dispatched_at = now() - interval '30 days'")
    for job_id in finished:
        _set(db, job_id, "completed_at = now()")
    assert made

    summary = json.loads(jobs_cli("stats", "--json").out)
    assert summary["counts"][fresh_kind] == {"queued": 1, "running": 1, "done": 2, "error": 1, "canceled": 1}
    assert summary["oldest_queued"]["job_id"] == oldest
    assert summary["oldest_queued"]["job_kind"] == fresh_kind
    assert 30 * 86400 <= summary["oldest_queued"]["age_seconds"] < 31 * 86400
    hour = summary["last_hour"]
    assert hour["done"] >= 2 and hour["error"] >= 1
    assert hour["error_rate"] == pytest.approx(hour["error"] / (hour["done"] + hour["error"]))

    text = jobs_cli("stats")
    assert text.code == 0
    lines = text.out.splitlines()
    assert lines[0].split() == ["KIND", "QUEUED", "RUNNING", "DONE", "ERROR", "CANCELED", "TOTAL"]
    assert f"{fresh_kind} 1 1 2 1 1 6" in [" ".join(line.split()) for line in lines]
    assert f"oldest queued: 30d0h ({fresh_kind} {oldest})" in text.out
    assert "error rate, last hour: " in text.out
    # a kind that exists only in the table is a valid filter
    listed = json.loads(jobs_cli("list", "--kind", fresh_kind, "--json").out)
    assert len(listed) == 6


# --- bad input and an unreachable database: a clear message, non-zero, no traceback ---------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--older-than", "10x"], "Malformed duration '10x'"),
        (["list", "--older-than=-5m"], "Malformed duration '-5m'"),
        (["list", "--older-than", "0m"], "Malformed duration '0m'"),
        (["list", "--older-than", "9999999999999999999999d"], "is too long: at most 36500d"),
        (["list", "--user", "a\x00b"], "The user 'a\\x00b' must not contain NUL characters"),
        (["list", "--kind", "lesson\x00"], "must not contain NUL characters"),
        (
            ["list", "--status", "stuck"],
            "Unknown status stuck: use one of queued, running, done, error, canceled",
        ),
        (["list", "--kind", "no-such-kind"], "Unknown job kind no-such-kind: known kinds are lesson"),
        (["list", "--limit", "0"], "--limit must be at least 1"),
        (["show", "not-a-uuid"], "Malformed job id 'not-a-uuid'"),
        (["show", "00000000-0000-0000-0000-000000000000"], "No job 00000000-0000-0000-0000-000000000000"),
        (["cancel", "00000000-0000-0000-0000-000000000000"], "No job 00000000-0000-0000-0000-000000000000"),
        (["cancel", "12"], "Malformed job id '12'"),
        (["retry", "00000000-0000-0000-0000-000000000000"], "No job 00000000-0000-0000-0000-000000000000"),
        (["retry", "zzz"], "Malformed job id 'zzz'"),
        (["retry"], "Give a job id, or at least one filter"),
        (["retry", "--status", "queued", "--yes"], "Unknown status queued: use one of error, canceled"),
        (["retry", "--since", "soon", "--yes"], "Malformed duration 'soon'"),
        (["retry", str(uuid.uuid4()), "--status", "error"], "Give either a job id or filters, not both"),
    ],
)
def test_bad_input_is_a_clear_error(jobs_cli: Cli, args: list[str], message: str) -> None:
    result = jobs_cli(*args)
    assert result.code == 2
    assert result.err.startswith("error: ")
    assert message in result.err
    assert result.out == ""


def test_as_a_process_output_is_clean_and_errors_have_no_traceback(
    database_url: str, db: sa.Engine, owner: str
) -> None:
    with db.begin() as conn:
        job_id = make_job(conn, user_id=owner, status="queued")
    listed = run_process(database_url, "list", "--user", owner, "--json")
    assert listed.code == 0, listed.err
    assert [j["job_id"] for j in json.loads(listed.out)] == [job_id]
    cancel = run_process(database_url, "cancel", job_id)
    assert cancel.code == 0 and f"canceled {job_id}" in cancel.out
    again = run_process(database_url, "cancel", job_id)
    assert again.code == 2
    assert (
        again.err.strip()
        == f"error: Job {job_id} is already canceled; only queued or running jobs can be canceled."
    )
    bad = run_process(database_url, "list", "--status", "bogus")
    assert bad.code == 2 and "Traceback" not in bad.err and "Unknown status bogus" in bad.err
    usage = run_process(database_url, "frobnicate")
    assert usage.code == 2 and "Traceback" not in usage.err and "invalid choice" in usage.err


def test_unreachable_database_is_a_clear_error(database_url: str) -> None:
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    result = run_process(
        database_url, "stats", DYLEN_DATABASE_URL=closed, DYLEN_DB_CONNECT_TIMEOUT_SECONDS="2"
    )
    assert result.code == 2
    assert result.err.startswith("error: Cannot reach the database:")
    assert "Traceback" not in result.err
    assert result.out == ""


def test_missing_database_is_a_clear_error(database_url: str) -> None:
    missing = sa.engine.make_url(database_url).set(database=f"absent_{uuid.uuid4().hex[:8]}")
    result = run_process(
        database_url, "list", DYLEN_DATABASE_URL=missing.render_as_string(hide_password=False)
    )
    assert result.code == 2
    assert result.err.startswith("error: Database error:")
    assert "does not exist" in result.err
    assert "Traceback" not in result.err

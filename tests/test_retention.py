"""Retention: the daily maintenance deletes finished jobs past DYLEN_JOB_RETENTION_DAYS in bounded
batches, with their sections and attempts; lessons stay (their job_id nulled); all-time totals and
everything live or recent are untouched."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from tests.factories import make_job, make_user


def _age(conn: sa.Connection, job_id: str, days: int) -> None:
    conn.execute(
        sa.text(
            "UPDATE jobs SET created_at = now() - make_interval(days => :d), "
            "completed_at = CASE WHEN status IN ('done', 'error', 'canceled') "
            "THEN now() - make_interval(days => :d) END WHERE id = :id"
        ),
        {"id": job_id, "d": days},
    )


def _counts(kinds: tuple[str, ...]) -> dict[tuple[str, str], int]:
    from common.jobs import totals
    from common.platform.db import connection

    with connection() as conn:
        return {(r.job_kind, r.status): int(r.n) for r in totals.all_time_counts(conn) if r.job_kind in kinds}


def test_old_finished_jobs_go_in_batches_lessons_and_totals_stay(
    app_env: dict[str, str], db: sa.Engine
) -> None:
    from common.jobs.retention import prune_finished

    kind, section = f"rt-{uuid.uuid4().hex[:8]}", f"rt-{uuid.uuid4().hex[:8]}.section"
    old: dict[str, str] = {}
    with db.begin() as conn:
        # Given, 40 days ago: a done job with its lesson and a record of a failed attempt, two
        # failed and one canceled job, and a done parent with two sections
        user = make_user(conn)
        for name, status in (
            ("done", "done"),
            ("error1", "error"),
            ("error2", "error"),
            ("canceled", "canceled"),
        ):
            old[name] = make_job(conn, user_id=user, job_kind=kind, status=status, attempts=1)
        old["parent"] = make_job(conn, user_id=user, job_kind=kind, status="done", attempts=1)
        sections = [
            make_job(conn, user_id=user, job_kind=section, status="done", attempts=1) for _ in range(2)
        ]
        for index, section_id in enumerate(sections):
            conn.execute(
                sa.text("UPDATE jobs SET parent_id = :p, section_index = :i WHERE id = :id"),
                {"p": old["parent"], "i": index, "id": section_id},
            )
        lesson_id = str(uuid.uuid4())
        conn.execute(
            sa.text(
                "INSERT INTO lessons (id, user_id, job_id, topic, title, content) "
                "VALUES (:id, :u, :job, 't', 'T', '{}')"
            ),
            {"id": lesson_id, "u": user, "job": old["done"]},
        )
        conn.execute(
            sa.text(
                "INSERT INTO job_attempts (job_id, attempt, outcome, error_code) VALUES (:j, 1, 'retry', 'x')"
            ),
            {"j": old["done"]},
        )
        for job_id in [*old.values(), *sections]:
            _age(conn, job_id, 40)
        # (done jobs that old are in the stored done total: the mark passed them when they finished)
        conn.execute(
            sa.text("INSERT INTO job_done_totals (job_kind, n) VALUES (:k, 2), (:s, 2)"),
            {"k": kind, "s": section},
        )
        # And what must stay: done 10 days ago, queued for 40 days (live), failed yesterday
        kept = [
            make_job(conn, user_id=user, job_kind=kind, status="done", attempts=1),
            make_job(conn, user_id=user, job_kind=kind, status="queued"),
            make_job(conn, user_id=user, job_kind=kind, status="error", attempts=1),
        ]
        for job_id, days in zip(kept, (10, 40, 1), strict=True):
            _age(conn, job_id, days)
    before = _counts((kind, section))

    # When retention runs with 30 days, two jobs per batch
    pruned = prune_finished(days=30, batch=2)

    # Then the old finished jobs went, in three batches, with their sections and attempts
    assert (pruned.jobs, pruned.rows, pruned.batches, pruned.complete) == (5, 7, 3, True)
    with db.connect() as conn:
        left = {
            r.id
            for r in conn.execute(
                sa.text("SELECT id::text FROM jobs WHERE job_kind IN (:k, :s)"), {"k": kind, "s": section}
            )
        }
        attempts = conn.execute(
            sa.text("SELECT count(*) FROM job_attempts WHERE job_id = :j"), {"j": old["done"]}
        ).scalar_one()
        lesson: Any = conn.execute(
            sa.text("SELECT job_id, title FROM lessons WHERE id = :id"), {"id": lesson_id}
        ).one()
    assert left == set(kept)
    assert attempts == 0
    # The lesson stays, its link to the deleted job nulled on purpose
    assert (lesson.job_id, lesson.title) == (None, "T")
    # And the all-time totals an operator reads are the same before and after
    assert _counts((kind, section)) == before
    assert before[(kind, "error")] == 3 and before[(kind, "done")] == 2

    # A second run finds nothing more to delete
    assert prune_finished(days=30, batch=2).jobs == 0


def test_the_daily_maintenance_job_reports_what_it_pruned(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime, timedelta

    from common.jobs import processor
    from common.lessons.archive.kind import enqueue_daily_archive
    from common.platform.config import reset_settings

    monkeypatch.setenv("DYLEN_JOBS_AUTO_PROCESS", "false")  # this test delivers the job itself
    reset_settings()

    # A day of its own (the job is one per UTC day), so this run is the first of that day
    day = datetime(2100, 1, 1, tzinfo=UTC) + timedelta(days=uuid.uuid4().int % 30000)
    created = enqueue_daily_archive(day)
    answer = processor.process_job(created.job.id)
    assert answer.status == 200, answer.body
    assert {"lessons_archived", "jobs_pruned", "prune_complete"} <= set(answer.body["result"])
    assert answer.body["result"]["prune_complete"] is True

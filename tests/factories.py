"""Factories for Given steps: rows written straight to the test database."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa


def make_user(conn: sa.Connection, user_id: str | None = None, *, tier: str = "free") -> str:
    user_id = user_id or f"user-{uuid.uuid4().hex[:12]}"
    conn.execute(
        sa.text(
            "INSERT INTO users (id, tier) VALUES (:id, :tier) ON CONFLICT (id) DO UPDATE SET tier = :tier"
        ),
        {"id": user_id, "tier": tier},
    )
    return user_id


def make_job(
    conn: sa.Connection,
    *,
    user_id: str | None,
    payload: Any = None,
    job_kind: str = "lesson",
    status: str = "queued",
    attempts: int = 0,
    max_attempts: int = 3,
    lease_seconds: float | None = None,
    error: dict[str, Any] | None = None,
) -> str:
    job_id = str(uuid.uuid4())
    conn.execute(
        sa.text(
            "INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json, attempts, "
            "max_attempts, lease_expires_at, error_json, dispatched_at) VALUES (:id, :user_id, :kind, :status, "
            ":key, CAST(:request AS jsonb), :attempts, :max_attempts, "
            "CASE WHEN CAST(:lease AS float8) IS NULL THEN NULL "
            "ELSE now() + make_interval(secs => CAST(:lease AS float8)) END, CAST(:error AS jsonb), now())"
        ),
        {
            "id": job_id,
            "user_id": user_id,
            "kind": job_kind,
            "status": status,
            "key": uuid.uuid4().hex,
            "request": json.dumps(
                {"job_kind": job_kind, "payload": payload if payload is not None else {"topic": "x"}}
            ),
            "attempts": attempts,
            "max_attempts": max_attempts,
            "lease": lease_seconds,
            "error": json.dumps(error) if error else None,
        },
    )
    return job_id


def make_lesson(
    conn: sa.Connection,
    *,
    user_id: str,
    created_at: datetime | None = None,
    archived_at: datetime | None = None,
    topic: str = "Factory topic",
) -> str:
    job_id = make_job(conn, user_id=user_id, status="done")
    lesson_id = str(uuid.uuid4())
    conn.execute(
        sa.text(
            "INSERT INTO lessons (id, user_id, job_id, topic, title, content, created_at, archived_at) "
            "VALUES (:id, :user_id, :job_id, :topic, :title, '{\"sections\": []}', coalesce(:created_at, now()), "
            ":archived_at)"
        ),
        {
            "id": lesson_id,
            "user_id": user_id,
            "job_id": job_id,
            "topic": topic,
            "title": topic.title(),
            "created_at": created_at,
            "archived_at": archived_at,
        },
    )
    return lesson_id


def job_row(conn: sa.Connection, job_id: str) -> Any:
    return conn.execute(sa.text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one()


def section_rows(conn: sa.Connection, parent_id: str) -> list[Any]:
    """A parent's sections in plan order: id (text), section_index, status, attempts."""
    return list(
        conn.execute(
            sa.text(
                "SELECT id::text AS id, section_index, status, attempts, job_kind, user_id FROM jobs "
                "WHERE parent_id = :id ORDER BY section_index"
            ),
            {"id": parent_id},
        )
    )


def lesson_count(conn: sa.Connection, job_id: str) -> int:
    return int(
        conn.execute(sa.text("SELECT count(*) FROM lessons WHERE job_id = :id"), {"id": job_id}).scalar_one()
    )


def make_history(
    conn: sa.Connection,
    *,
    prefix: str,
    users: int,
    lessons: int,
    tiers: tuple[str, ...] = ("free", "starter", "plus", "pro", "legacy"),
    base: datetime,
) -> None:
    """Bulk Given step: `users` users (`<prefix>00000`...) cycling through `tiers`, owning `lessons`
    lessons in one set-based insert (each with its done job). Skewed: user k gets about
    lessons / (2 * sqrt(users * k)) of them, so the first users hold hundreds and most a handful.
    Every three consecutive lessons share a created_at, so ranking leans on the id tie-break."""
    params = {"prefix": prefix, "users": users, "lessons": lessons, "tiers": list(tiers), "base": base}
    conn.execute(
        sa.text(
            "INSERT INTO users (id, tier) SELECT :prefix || lpad(k::text, 5, '0'), "
            "(CAST(:tiers AS text[]))[mod(k, cardinality(CAST(:tiers AS text[]))) + 1] "
            "FROM generate_series(0, :users - 1) AS k"
        ),
        params,
    )
    conn.execute(
        sa.text(
            """
            WITH src AS (
                SELECT g, least(:users - 1, floor(:users * power(g / CAST(:lessons AS float8), 2)))::int AS k
                  FROM generate_series(0, :lessons - 1) AS g
            ), j AS (
                INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json,
                                  attempts, max_attempts)
                SELECT gen_random_uuid(), :prefix || lpad(k::text, 5, '0'), 'lesson', 'done',
                       'bulk-' || g, '{}', 1, 1
                  FROM src
                RETURNING id, user_id, idempotency_key
            )
            INSERT INTO lessons (id, user_id, job_id, topic, title, content, created_at)
            SELECT gen_random_uuid(), j.user_id, j.id, 'Bulk', 'Bulk', '{}',
                   CAST(:base AS timestamptz)
                   + (CAST(substr(j.idempotency_key, 6) AS integer) / 3) * interval '1 second'
              FROM j
            """
        ),
        params,
    )


def job_value(*, max_attempts: int = 5) -> Any:
    """A queued common.jobs.queries.Job in memory, for dispatcher tests that need no row."""
    from datetime import UTC

    from common.jobs.model import Job

    return Job.queued(
        id=uuid.uuid4(),
        user_id="u",
        job_kind="lesson",
        idempotency_key="k",
        request_json={},
        max_attempts=max_attempts,
        now=datetime.now(UTC),
    )


def make_failed_job(
    conn: sa.Connection, *, user_id: str, code: str = "generator_failed", topic: str = "Tides"
) -> str:
    """A lesson job that ended `error` (out of attempts) with `code`, finished now."""
    job_id = make_job(
        conn,
        user_id=make_user(conn, user_id),
        status="error",
        attempts=3,
        max_attempts=3,
        payload={"topic": topic},
        error={"code": code, "message": "the model said no", "attempt": 3},
    )
    conn.execute(sa.text("UPDATE jobs SET completed_at = now() WHERE id = :id"), {"id": job_id})
    return job_id


def make_failed_fanout(
    conn: sa.Connection,
    *,
    user_id: str,
    code: str = "section_failed",
    section_code: str = "attempts_exhausted",
    topic: str = "Rivers",
) -> tuple[str, list[str]]:
    """A planned lesson job that failed the way fail_parents leaves one: its section 1 `error` after
    3 failed attempts (on record, raw errors included), section 0 `done`, section 2 `canceled`, and
    the parent `error` with `code`. Returns (parent id, section ids in plan order)."""
    headings = ["Sources", "Meanders", "Deltas"]
    parent = make_job(
        conn,
        user_id=make_user(conn, user_id),
        status="error",
        attempts=1,
        max_attempts=3,
        payload={"topic": topic, "depth": "detailed"},
        error={
            "code": code,
            "message": "Section 1 failed: The job failed on every attempt it had.",
            "section_index": 1,
        },
    )
    plan = {"title": topic, "sections": [{"heading": h} for h in headings]}
    conn.execute(
        sa.text(
            "UPDATE jobs SET plan = CAST(:plan AS jsonb), started_at = now() - interval '40 seconds', "
            "attempt_started_at = now() - interval '40 seconds', completed_at = now() WHERE id = :id"
        ),
        {"plan": json.dumps(plan), "id": parent},
    )
    conn.execute(
        sa.text(
            "INSERT INTO job_attempts (job_id, attempt, started_at, ended_at, outcome, instance) "
            "VALUES (:id, 1, now() - interval '40 seconds', now() - interval '39 seconds', 'planned', 'i-1')"
        ),
        {"id": parent},
    )
    sections = []
    for index, (heading, status) in enumerate(zip(headings, ("done", "error", "canceled"), strict=True)):
        section = str(uuid.uuid4())
        failed = status == "error"
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json, attempts, "
                "max_attempts, error_json, dispatched_at, created_at, started_at, attempt_started_at, "
                "completed_at, parent_id, section_index) "
                "VALUES (:id, :user, 'lesson.section', :status, :key, CAST(:request AS jsonb), :attempts, 3, "
                "CAST(:error AS jsonb), now() - interval '39 seconds', now() - interval '39 seconds', "
                "now() - interval '38 seconds', now() - interval '5 seconds', "
                "now() - interval '2 seconds', :parent, :index)"
            ),
            {
                "id": section,
                "user": user_id,
                "status": status,
                "key": f"{parent}:{index}",
                "request": json.dumps(
                    {"job_kind": "lesson.section", "section_index": index, "heading": heading}
                ),
                "attempts": 3 if failed else (1 if status == "done" else 0),
                "error": json.dumps(
                    {"code": section_code, "message": "The job failed on every attempt it had.", "attempt": 3}
                )
                if failed
                else None,
                "parent": parent,
                "index": index,
            },
        )
        if failed:
            for attempt in (1, 2, 3):
                conn.execute(
                    sa.text(
                        "INSERT INTO job_attempts (job_id, attempt, started_at, ended_at, outcome, error_code, "
                        "error_message, error_detail, instance) VALUES (:id, :n, now() - interval '30 seconds', "
                        "now() - interval '29 seconds', CASE WHEN :n = 3 THEN 'failed' ELSE 'retry' END, "
                        "'handler_failed', 'This attempt failed; the job will be retried.', "
                        "'RuntimeError: transient: section 1 model is down', 'i-2')"
                    ),
                    {"id": section, "n": attempt},
                )
        sections.append(section)
    return parent, sections

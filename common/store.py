"""All SQL of the product, in one small layer. Callers pass a Connection from db.transaction().

Statements that decide correctness (the claim, the conditional finish) are single set-based UPDATEs,
so concurrent deliveries of one job are serialised by PostgreSQL's row lock, not by the application.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

JOB_COLUMNS = (
    "id, user_id, job_kind, status, idempotency_key, request_json, result_json, error_json, "
    "attempts, max_attempts, lease_expires_at, dispatched_at, created_at, updated_at, "
    "started_at, completed_at"
)


@dataclass(frozen=True)
class Job:
    id: uuid.UUID
    user_id: str | None
    job_kind: str
    status: str
    idempotency_key: str
    request_json: dict[str, Any]
    result_json: dict[str, Any] | None
    error_json: dict[str, Any] | None
    attempts: int
    max_attempts: int
    lease_expires_at: datetime | None
    dispatched_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> Job:
        return cls(**{key: row._mapping[key] for key in cls.__dataclass_fields__})


def _jsonb(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


# --- jobs -----------------------------------------------------------------------------------------

_INSERT_JOB = text(
    f"""
    WITH upsert_user AS (
        INSERT INTO users (id) SELECT CAST(:user_id AS text) WHERE CAST(:user_id AS text) IS NOT NULL
        ON CONFLICT (id) DO NOTHING
    )
    INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json,
                      attempts, max_attempts, dispatched_at)
    VALUES (:id, :user_id, :job_kind, 'queued', :idempotency_key, CAST(:request_json AS jsonb),
            0, :max_attempts, now())
    ON CONFLICT (user_id, job_kind, idempotency_key) DO NOTHING
    RETURNING {JOB_COLUMNS}
    """
)


def insert_job(
    conn: Connection,
    *,
    user_id: str | None,
    job_kind: str,
    idempotency_key: str,
    request_json: dict[str, Any],
    max_attempts: int,
) -> Job | None:
    """Insert a queued job (upserting its user in the same statement); None if the key exists."""
    row = conn.execute(
        _INSERT_JOB,
        {
            "id": uuid.uuid4(),
            "user_id": user_id,
            "job_kind": job_kind,
            "idempotency_key": idempotency_key,
            "request_json": _jsonb(request_json),
            "max_attempts": max_attempts,
        },
    ).first()
    return Job.from_row(row) if row else None


def find_job_by_key(
    conn: Connection, *, user_id: str | None, job_kind: str, idempotency_key: str
) -> Job | None:
    row = conn.execute(
        text(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE user_id IS NOT DISTINCT FROM CAST(:user_id AS text) "
            "AND job_kind = :job_kind AND idempotency_key = :key"
        ),
        {"user_id": user_id, "job_kind": job_kind, "key": idempotency_key},
    ).first()
    return Job.from_row(row) if row else None


def get_job(conn: Connection, job_id: uuid.UUID) -> Job | None:
    row = conn.execute(text(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = :id"), {"id": job_id}).first()
    return Job.from_row(row) if row else None


@dataclass(frozen=True)
class Claim:
    """Outcome of one claim statement: `claimed` is True only for the delivery that won."""

    claimed: bool
    job: Job | None  # None: no such job
    now: datetime | None = None


# One round trip: try the claim; when it loses, return the row as it stood so the caller can
# answer (final, lease held, out of attempts) without a second query.
_CLAIM = text(
    f"""
    WITH claimed AS (
        UPDATE jobs
           SET status = 'running',
               attempts = attempts + 1,
               lease_expires_at = now() + make_interval(secs => :lease_seconds),
               started_at = coalesce(started_at, now()),
               updated_at = now()
         WHERE id = :id
           AND attempts < max_attempts
           AND (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))
        RETURNING {JOB_COLUMNS}
    )
    SELECT true AS claimed, now() AS db_now, {JOB_COLUMNS} FROM claimed
    UNION ALL
    SELECT false, now(), {JOB_COLUMNS} FROM jobs
     WHERE id = :id AND NOT EXISTS (SELECT 1 FROM claimed)
    """
)


def claim_job(conn: Connection, job_id: uuid.UUID, *, lease_seconds: int) -> Claim:
    row = conn.execute(_CLAIM, {"id": job_id, "lease_seconds": lease_seconds}).first()
    if row is None:
        return Claim(claimed=False, job=None)
    return Claim(claimed=bool(row.claimed), job=Job.from_row(row), now=row.db_now)


_FINISH_GUARD = "WHERE id = :id AND status = 'running' AND attempts = :attempt"


def complete_job(conn: Connection, job_id: uuid.UUID, *, attempt: int, result: dict[str, Any]) -> bool:
    """`running` -> `done`, only if this attempt still holds the claim (not canceled, not stolen)."""
    updated = conn.execute(
        text(
            "UPDATE jobs SET status = 'done', result_json = CAST(:result AS jsonb), "
            "error_json = NULL, lease_expires_at = NULL, completed_at = now(), updated_at = now() "
            + _FINISH_GUARD
        ),
        {"id": job_id, "attempt": attempt, "result": _jsonb(result)},
    )
    return updated.rowcount == 1


def fail_job(
    conn: Connection,
    job_id: uuid.UUID,
    *,
    attempt: int,
    error: dict[str, Any],
    final: bool,
) -> bool:
    """Record a failed attempt: back to `queued` (error kept) or, when `final`, `error`."""
    updated = conn.execute(
        text(
            "UPDATE jobs SET status = CASE WHEN :final THEN 'error' ELSE 'queued' END, "
            "error_json = CAST(:error AS jsonb), lease_expires_at = NULL, "
            "completed_at = CASE WHEN :final THEN now() END, updated_at = now() " + _FINISH_GUARD
        ),
        {"id": job_id, "attempt": attempt, "error": _jsonb(error), "final": final},
    )
    return updated.rowcount == 1


def expire_exhausted_job(conn: Connection, job_id: uuid.UUID, *, error: dict[str, Any]) -> bool:
    """A `running` job whose lease expired with no attempts left becomes `error`."""
    updated = conn.execute(
        text(
            "UPDATE jobs SET status = 'error', error_json = CAST(:error AS jsonb), "
            "lease_expires_at = NULL, completed_at = now(), updated_at = now() "
            "WHERE id = :id AND attempts >= max_attempts AND "
            "(status = 'queued' OR (status = 'running' AND lease_expires_at < now()))"
        ),
        {"id": job_id, "error": _jsonb(error)},
    )
    return updated.rowcount == 1


# --- lessons --------------------------------------------------------------------------------------

LESSON_COLUMNS = "id, user_id, job_id, topic, title, content, created_at, archived_at"


def insert_lesson(
    conn: Connection,
    *,
    lesson_id: uuid.UUID,
    user_id: str,
    job_id: uuid.UUID,
    topic: str,
    title: str,
    content: dict[str, Any],
) -> None:
    conn.execute(
        text(
            "INSERT INTO lessons (id, user_id, job_id, topic, title, content) "
            "VALUES (:id, :user_id, :job_id, :topic, :title, CAST(:content AS jsonb))"
        ),
        {
            "id": lesson_id,
            "user_id": user_id,
            "job_id": job_id,
            "topic": topic,
            "title": title,
            "content": _jsonb(content),
        },
    )


def get_lesson(conn: Connection, lesson_id: uuid.UUID) -> Any:
    return conn.execute(
        text(f"SELECT {LESSON_COLUMNS} FROM lessons WHERE id = :id"), {"id": lesson_id}
    ).first()


def list_visible_lessons(
    conn: Connection,
    *,
    user_id: str,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[Any]:
    """Newest first, keyset-paged on (created_at, id); archived lessons never appear."""
    params: dict[str, Any] = {"user_id": user_id, "limit": limit}
    keyset = ""
    if after is not None:
        keyset = "AND (created_at, id) < (:after_created, :after_id)"
        params.update(after_created=after[0], after_id=after[1])
    return list(
        conn.execute(
            text(
                "SELECT id, job_id, topic, title, created_at FROM lessons "
                f"WHERE user_id = :user_id AND archived_at IS NULL {keyset} "
                "ORDER BY created_at DESC, id DESC LIMIT :limit"
            ),
            params,
        )
    )


# --- archiving (lesson history limits) ------------------------------------------------------------
#
# A user's visible history is their newest N non-archived lessons (newest by created_at, then id).
# Rather than ranking the whole table, each user's "first doomed" lesson is found by walking the
# partial index lessons_user_visible_idx (the (N+1)-th newest visible lesson, N+1 index entries), and
# it plus every older visible lesson created before the run's cutoff is archived. Archiving only
# lessons older than that boundary never changes it, so a batch can stop anywhere and the next batch
# (or a re-run after a crash) picks up exactly the rest.


def _over_limit_ctes(users_where: str) -> str:
    """CTEs `limits`, `walked` (users matching `users_where`) and `first_doomed` (per over-limit user)."""
    return f"""
    limits AS (
        SELECT tier, keep FROM unnest(CAST(:tiers AS text[]), CAST(:keeps AS integer[])) AS t(tier, keep)
    ),
    walked AS (
        SELECT u.id AS user_id, u.tier, coalesce(limits.keep, :fallback_keep) AS keep
          FROM users u LEFT JOIN limits ON limits.tier = u.tier
         WHERE {users_where}
    ),
    first_doomed AS (
        SELECT w.user_id, w.tier, f.created_at, f.id
          FROM walked w
         CROSS JOIN LATERAL (
               SELECT created_at, id FROM lessons
                WHERE user_id = w.user_id AND archived_at IS NULL
                ORDER BY created_at DESC, id DESC
               OFFSET w.keep LIMIT 1
         ) f
    )"""


# Lessons created at or after the cutoff are never archived by this run (the next run sees them),
# but they do count toward the N a user keeps: the limit is about what the user sees.
_DOOMED_OF = """
    SELECT id FROM lessons
     WHERE user_id = fd.user_id AND archived_at IS NULL
       AND (created_at, id) <= (fd.created_at, fd.id)
       AND created_at < :cutoff"""

_ARCHIVE_BATCH = text(
    f"""
    WITH {_over_limit_ctes("u.id > :after_user AND u.id <= :through_user")},
    doomed AS (
        SELECT d.id FROM first_doomed fd CROSS JOIN LATERAL ({_DOOMED_OF} LIMIT :batch_size) d
         LIMIT :batch_size
    )
    -- = ANY(ARRAY(...)): primary-key lookups for the batch's ids; an IN (subquery) may be planned as
    -- a semi-join that scans the whole table once per batch.
    UPDATE lessons SET archived_at = now()
     WHERE id = ANY(ARRAY(SELECT id FROM doomed)) AND archived_at IS NULL
    RETURNING user_id
    """
)

_PREVIEW_ARCHIVE = text(
    f"""
    WITH {_over_limit_ctes("true")}
    SELECT fd.tier, count(*) AS users_over_limit, sum(n.lessons) AS lessons
      FROM first_doomed fd
     CROSS JOIN LATERAL (SELECT count(*) AS lessons FROM ({_DOOMED_OF}) d) n
     WHERE n.lessons > 0
     GROUP BY fd.tier
     ORDER BY fd.tier
    """
)


@dataclass(frozen=True)
class TierLimits:
    """Visible-history limit per tier; tiers not in `limits` get `fallback` (the free tier's)."""

    limits: dict[str, int]
    fallback: int

    def params(self) -> dict[str, Any]:
        return {
            "tiers": list(self.limits),
            "keeps": list(self.limits.values()),
            "fallback_keep": self.fallback,
        }


def database_now(conn: Connection) -> datetime:
    return conn.execute(text("SELECT clock_timestamp()")).scalar_one()


def user_window_end(conn: Connection, *, after_user: str, size: int) -> str | None:
    """The id `size` users past `after_user` in id order (or the last one); None when none are left."""
    return conn.execute(
        text("SELECT max(id) FROM (SELECT id FROM users WHERE id > :after ORDER BY id LIMIT :size) AS w"),
        {"after": after_user, "size": size},
    ).scalar_one()


def archive_batch(
    conn: Connection,
    *,
    limits: TierLimits,
    after_user: str,
    through_user: str,
    cutoff: datetime,
    batch_size: int,
) -> list[str]:
    """Archive up to `batch_size` over-limit lessons of users in (after_user, through_user].

    Returns the owner of each archived lesson. Fewer than `batch_size` means the window is done.
    """
    rows = conn.execute(
        _ARCHIVE_BATCH,
        {
            **limits.params(),
            "after_user": after_user,
            "through_user": through_user,
            "cutoff": cutoff,
            "batch_size": batch_size,
        },
    )
    return [row.user_id for row in rows]


@dataclass(frozen=True)
class TierPreview:
    tier: str
    users_over_limit: int
    lessons: int


def preview_archive(conn: Connection, *, limits: TierLimits, cutoff: datetime) -> list[TierPreview]:
    """What a run with this cutoff would archive, per tier (read-only)."""
    rows = conn.execute(
        _PREVIEW_ARCHIVE,
        {**limits.params(), "cutoff": cutoff},
    )
    return [TierPreview(r.tier, int(r.users_over_limit), int(r.lessons)) for r in rows]


def unknown_tiers(conn: Connection, known: list[str]) -> list[str]:
    rows = conn.execute(
        text("SELECT DISTINCT tier FROM users WHERE NOT (tier = ANY(CAST(:known AS text[]))) ORDER BY tier"),
        {"known": known},
    )
    return [row.tier for row in rows]


def set_user_tier(conn: Connection, *, user_id: str, tier: str) -> bool:
    """False when there is no such user (tiers are set on existing users only)."""
    updated = conn.execute(
        text("UPDATE users SET tier = :tier WHERE id = :id"), {"id": user_id, "tier": tier}
    )
    return updated.rowcount == 1

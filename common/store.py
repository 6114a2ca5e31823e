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

from common.db import Connection, Statement

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
    def queued(
        cls,
        *,
        id: uuid.UUID,
        user_id: str | None,
        job_kind: str,
        idempotency_key: str,
        request_json: dict[str, Any],
        max_attempts: int,
        now: datetime,
    ) -> Job:
        """A job as insert_job stores it: queued, dispatched now, no attempt yet."""
        return cls(
            id=id,
            user_id=user_id,
            job_kind=job_kind,
            status="queued",
            idempotency_key=idempotency_key,
            request_json=request_json,
            result_json=None,
            error_json=None,
            attempts=0,
            max_attempts=max_attempts,
            lease_expires_at=None,
            dispatched_at=now,
            created_at=now,
            updated_at=now,
            started_at=None,
            completed_at=None,
        )

    @classmethod
    def from_row(cls, row: Any) -> Job:
        return cls(**{key: getattr(row, key) for key in cls.__dataclass_fields__})


# Built once: json.dumps(..., ensure_ascii=False) builds an encoder per call.
_JSONB = json.JSONEncoder(ensure_ascii=False)


def _jsonb(value: Any) -> str | None:
    return None if value is None else _JSONB.encode(value)


# --- jobs -----------------------------------------------------------------------------------------

# Only the id (drawn by the server, no syscall and UUID object on the hot path here) and created_at
# come back: every other column of a new job is known here, and now() is the same for created_at,
# updated_at and dispatched_at within the statement.
_INSERT_JOB = Statement(
    """
    WITH upsert_user AS (
        INSERT INTO users (id) SELECT CAST(:user_id AS text) WHERE CAST(:user_id AS text) IS NOT NULL
        ON CONFLICT (id) DO NOTHING
    )
    INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json,
                      attempts, max_attempts, dispatched_at)
    VALUES (gen_random_uuid(), CAST(:user_id AS text), :job_kind, 'queued', :idempotency_key,
            CAST(:request_json AS jsonb), 0, :max_attempts, now())
    ON CONFLICT (user_id, job_kind, idempotency_key) DO NOTHING
    RETURNING id, created_at
    """,
    prepare=True,
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
            "user_id": user_id,
            "job_kind": job_kind,
            "idempotency_key": idempotency_key,
            "request_json": _jsonb(request_json),
            "max_attempts": max_attempts,
        },
    ).first()
    if row is None:
        return None
    return Job.queued(
        id=row.id,
        user_id=user_id,
        job_kind=job_kind,
        idempotency_key=idempotency_key,
        request_json=request_json,
        max_attempts=max_attempts,
        now=row.created_at,
    )


_FIND_JOB_BY_KEY = Statement(
    f"SELECT {JOB_COLUMNS} FROM jobs WHERE user_id IS NOT DISTINCT FROM CAST(:user_id AS text) "
    "AND job_kind = :job_kind AND idempotency_key = :key",
    prepare=True,
)
_GET_JOB = Statement(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = CAST(:id AS uuid)", prepare=True)


def find_job_by_key(
    conn: Connection, *, user_id: str | None, job_kind: str, idempotency_key: str
) -> Job | None:
    row = conn.execute(
        _FIND_JOB_BY_KEY, {"user_id": user_id, "job_kind": job_kind, "key": idempotency_key}
    ).first()
    return Job.from_row(row) if row else None


def get_job(conn: Connection, job_id: uuid.UUID) -> Job | None:
    row = conn.execute(_GET_JOB, {"id": job_id}).first()
    return Job.from_row(row) if row else None


@dataclass(frozen=True)
class Claim:
    """Outcome of one claim statement: `claimed` is True only for the delivery that won."""

    claimed: bool
    job: Job | None  # None: no such job
    now: datetime | None = None


# One round trip: try the claim; when it loses, return the row as it stood so the caller can
# answer (final, lease held, out of attempts) without a second query.
_CLAIM = Statement(
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
    """,
    prepare=True,
)


def claim_job(conn: Connection, job_id: uuid.UUID, *, lease_seconds: int) -> Claim:
    row = conn.execute(_CLAIM, {"id": job_id, "lease_seconds": lease_seconds}).first()
    if row is None:
        return Claim(claimed=False, job=None)
    return Claim(claimed=bool(row.claimed), job=Job.from_row(row), now=row.db_now)


_FINISH_GUARD = "WHERE id = :id AND status = 'running' AND attempts = :attempt"

_COMPLETE_JOB = Statement(
    "UPDATE jobs SET status = 'done', result_json = CAST(:result AS jsonb), "
    "error_json = NULL, lease_expires_at = NULL, completed_at = now(), updated_at = now() " + _FINISH_GUARD,
    prepare=True,
)


def complete_job(conn: Connection, job_id: uuid.UUID, *, attempt: int, result: dict[str, Any]) -> bool:
    """`running` -> `done`, only if this attempt still holds the claim (not canceled, not stolen)."""
    updated = conn.execute(_COMPLETE_JOB, {"id": job_id, "attempt": attempt, "result": _jsonb(result)})
    return updated.rowcount == 1


_COMPLETE_JOB_WITH_LESSON = Statement(
    f"""
    WITH done AS (
        UPDATE jobs SET status = 'done', result_json = CAST(:result AS jsonb),
               error_json = NULL, lease_expires_at = NULL, completed_at = now(),
               updated_at = now()
        {_FINISH_GUARD}
        RETURNING id, user_id
    )
    INSERT INTO lessons (id, user_id, job_id, topic, title, content)
    SELECT CAST(:lesson_id AS uuid), user_id, id, CAST(:topic AS text), CAST(:title AS text),
           CAST(:content AS jsonb)
      FROM done
    RETURNING id
    """,
    prepare=True,
)


def complete_job_with_lesson(
    conn: Connection,
    *,
    job_id: uuid.UUID,
    attempt: int,
    result: dict[str, Any],
    lesson_id: uuid.UUID,
    topic: str,
    title: str,
    content: dict[str, Any],
) -> bool:
    """The guarded `done` transition and the lesson insert as one statement: both or neither.

    If the claim was lost (canceled, or a newer attempt), the UPDATE matches nothing and no lesson
    is written; lessons.job_id being unique stops a second lesson whatever happens.
    """
    row = conn.execute(
        _COMPLETE_JOB_WITH_LESSON,
        {
            "id": job_id,
            "attempt": attempt,
            "result": _jsonb(result),
            "lesson_id": lesson_id,
            "topic": topic,
            "title": title,
            "content": _jsonb(content),
        },
    ).first()
    return row is not None


_FAIL_JOB = Statement(
    "UPDATE jobs SET status = CASE WHEN CAST(:final AS boolean) THEN 'error' ELSE 'queued' END, "
    "error_json = CAST(:error AS jsonb), lease_expires_at = NULL, "
    "completed_at = CASE WHEN CAST(:final AS boolean) THEN now() END, updated_at = now() " + _FINISH_GUARD,
    prepare=True,
)


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
        _FAIL_JOB, {"id": job_id, "attempt": attempt, "error": _jsonb(error), "final": final}
    )
    return updated.rowcount == 1


def expire_exhausted_job(conn: Connection, job_id: uuid.UUID, *, error: dict[str, Any]) -> bool:
    """A `running` job whose lease expired with no attempts left becomes `error`."""
    updated = conn.execute(
        Statement(
            "UPDATE jobs SET status = 'error', error_json = CAST(:error AS jsonb), "
            "lease_expires_at = NULL, completed_at = now(), updated_at = now() "
            "WHERE id = :id AND attempts >= max_attempts AND "
            "(status = 'queued' OR (status = 'running' AND lease_expires_at < now()))"
        ),
        {"id": job_id, "error": _jsonb(error)},
    )
    return updated.rowcount == 1


# --- rescue ---------------------------------------------------------------------------------------

# One statement claims a bounded batch: rows another rescuer or a process_job claim holds are skipped
# (SKIP LOCKED), and `dispatched_at` moves forward in the same UPDATE, so a concurrent rescuer no
# longer sees them as stale and never dispatches them twice. Running jobs whose lease expired go back
# to `queued` (or `error` when out of attempts); a stale attempt's finish then fails its guard.
_RESCUE = Statement(
    f"""
    WITH picked AS (
        SELECT id, dispatched_at AS previous_dispatched_at FROM jobs
         WHERE (status = 'queued'
                AND (dispatched_at IS NULL OR dispatched_at < now() - make_interval(secs => :stale)))
            OR (status = 'running' AND lease_expires_at < now())
         ORDER BY dispatched_at NULLS FIRST
         LIMIT :limit
         FOR UPDATE SKIP LOCKED
    )
    UPDATE jobs
       SET status = CASE WHEN jobs.attempts >= jobs.max_attempts THEN 'error' ELSE 'queued' END,
           error_json = CASE
               WHEN jobs.attempts >= jobs.max_attempts THEN jsonb_build_object(
                   'code', 'attempts_exhausted',
                   'message', 'No attempts left after the last lease expired.',
                   'attempt', jobs.attempts)
               WHEN jobs.status = 'running' THEN jsonb_build_object(
                   'code', 'lease_expired',
                   'message', 'The attempt did not finish within its lease; retrying.',
                   'attempt', jobs.attempts)
               ELSE jobs.error_json END,
           completed_at = CASE WHEN jobs.attempts >= jobs.max_attempts THEN now() END,
           lease_expires_at = NULL,
           dispatched_at = now(),
           updated_at = now()
      FROM picked
     WHERE jobs.id = picked.id
       AND (jobs.status = 'queued' OR (jobs.status = 'running' AND jobs.lease_expires_at < now()))
    RETURNING picked.previous_dispatched_at, {", ".join("jobs." + c.strip() for c in JOB_COLUMNS.split(","))}
    """
)


@dataclass(frozen=True)
class Rescued:
    job: Job
    previous_dispatched_at: datetime | None


def rescue_stale_jobs(conn: Connection, *, stale_after_seconds: int, limit: int) -> list[Rescued]:
    """Claim up to `limit` stale queued / lease-expired running jobs: `queued` + new dispatch stamp,
    or `error` (attempts_exhausted). The caller dispatches the queued ones after commit."""
    rows = conn.execute(_RESCUE, {"stale": stale_after_seconds, "limit": limit})
    return [Rescued(Job.from_row(row), row.previous_dispatched_at) for row in rows]


def restore_dispatch_stamp(
    conn: Connection, job_id: uuid.UUID, *, ours: datetime | None, previous: datetime | None
) -> bool:
    """After a failed dispatch: put `dispatched_at` back so the next rescue run sees the job as stale
    at once (unless something touched the job meanwhile)."""
    updated = conn.execute(
        Statement(
            "UPDATE jobs SET dispatched_at = :previous "
            "WHERE id = :id AND status = 'queued' AND dispatched_at IS NOT DISTINCT FROM :ours"
        ),
        {"id": job_id, "ours": ours, "previous": previous},
    )
    return updated.rowcount == 1


# --- lessons --------------------------------------------------------------------------------------

LESSON_COLUMNS = "id, user_id, job_id, topic, title, content, created_at, archived_at"


def get_lesson(conn: Connection, lesson_id: uuid.UUID) -> Any:
    return conn.execute(
        Statement(f"SELECT {LESSON_COLUMNS} FROM lessons WHERE id = :id"), {"id": lesson_id}
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
            Statement(
                "SELECT id, job_id, topic, title, created_at FROM lessons "
                f"WHERE user_id = :user_id AND archived_at IS NULL {keyset} "
                "ORDER BY created_at DESC, id DESC LIMIT :limit"
            ),
            params,
        )
    )


# --- operator queries and the cancel / retry transitions ------------------------------------------

RETRYABLE_STATUSES = ("error", "canceled")


@dataclass(frozen=True)
class JobFilter:
    """Optional filters shared by `jobs list` and bulk `jobs retry`; None means "any"."""

    statuses: tuple[str, ...] | None = None
    kinds: tuple[str, ...] | None = None
    user_id: str | None = None
    created_before_seconds: float | None = None  # created more than this long ago
    finished_within_seconds: float | None = None  # completed_at within this window

    def where(self) -> tuple[str, dict[str, Any]]:
        clauses: list[str] = []
        params: dict[str, Any] = {}
        if self.statuses is not None:
            clauses.append("status = ANY(CAST(:statuses AS text[]))")
            params["statuses"] = list(self.statuses)
        if self.kinds is not None:
            clauses.append("job_kind = ANY(CAST(:kinds AS text[]))")
            params["kinds"] = list(self.kinds)
        if self.user_id is not None:
            clauses.append("user_id = :user_id")
            params["user_id"] = self.user_id
        if self.created_before_seconds is not None:
            clauses.append("created_at < now() - make_interval(secs => CAST(:created_before AS float8))")
            params["created_before"] = self.created_before_seconds
        if self.finished_within_seconds is not None:
            clauses.append("completed_at >= now() - make_interval(secs => CAST(:finished_within AS float8))")
            params["finished_within"] = self.finished_within_seconds
        return (" AND ".join(clauses) or "true"), params


def list_jobs(conn: Connection, job_filter: JobFilter, *, limit: int | None) -> list[Job]:
    """Newest first; `limit` None means every match (bulk retry confirms the exact set)."""
    where, params = job_filter.where()
    limit_sql = ""
    if limit is not None:
        limit_sql = "LIMIT :limit"
        params["limit"] = limit
    rows = conn.execute(
        Statement(f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where} ORDER BY created_at DESC, id DESC {limit_sql}"),
        params,
    )
    return [Job.from_row(row) for row in rows]


def job_kind_exists(conn: Connection, kind: str) -> bool:
    return bool(
        conn.execute(Statement("SELECT EXISTS (SELECT 1 FROM jobs WHERE job_kind = :k)"), {"k": kind}).scalar()
    )


def cancel_job(conn: Connection, job_id: uuid.UUID, *, owner: str | None) -> Job | None:
    """`queued|running` -> `canceled` (only the owner's job when `owner` is given); None if unchanged.

    A handler still running keeps running, but its finish is conditional on `running` with its own
    attempt number, so it becomes a no-op and its lesson insert rolls back.
    """
    row = conn.execute(
        Statement(
            "UPDATE jobs SET status = 'canceled', lease_expires_at = NULL, completed_at = now(), "
            "updated_at = now() "
            "WHERE id = :id AND status IN ('queued', 'running') "
            "AND (CAST(:owner AS text) IS NULL OR user_id = CAST(:owner AS text)) "
            f"RETURNING {JOB_COLUMNS}"
        ),
        {"id": job_id, "owner": owner},
    ).first()
    return Job.from_row(row) if row else None


def requeue_jobs(conn: Connection, job_ids: list[uuid.UUID], *, extra_attempts: int) -> list[Job]:
    """`error|canceled` -> `queued` with `extra_attempts` more attempts and a new `dispatched_at`.

    `attempts` is never reset: it is the fencing token of the conditional finish, so an attempt of
    the canceled run that is still going can never finish (or fail) the retried run. The budget is
    refreshed by raising `max_attempts` instead. `error_json` is kept as history (the job view shows
    the last error until the job is done, as for any retried attempt); timings of the old run are
    cleared. A job with a lesson is never requeued (cannot happen for error/canceled; a last guard).
    """
    rows = conn.execute(
        Statement(
            "UPDATE jobs SET status = 'queued', max_attempts = attempts + :extra, "
            "lease_expires_at = NULL, result_json = NULL, started_at = NULL, completed_at = NULL, "
            "dispatched_at = now(), updated_at = now() "
            "WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ('error', 'canceled') "
            "AND NOT EXISTS (SELECT 1 FROM lessons WHERE lessons.job_id = jobs.id) "
            f"RETURNING {JOB_COLUMNS}"
        ),
        {"ids": [str(i) for i in job_ids], "extra": extra_attempts},
    )
    return [Job.from_row(row) for row in rows]


def has_lesson(conn: Connection, job_id: uuid.UUID) -> bool:
    return bool(
        conn.execute(
            Statement("SELECT EXISTS (SELECT 1 FROM lessons WHERE job_id = :id)"), {"id": job_id}
        ).scalar()
    )


def job_counts(conn: Connection) -> list[Any]:
    """(job_kind, status, n) for every kind and status present."""
    return list(
        conn.execute(
            Statement("SELECT job_kind, status, count(*) AS n FROM jobs GROUP BY job_kind, status ORDER BY 1, 2")
        )
    )


def oldest_queued(conn: Connection) -> Any:
    """The queued job waiting longest since it was (re)dispatched: (id, job_kind, age_seconds), or None."""
    return conn.execute(
        Statement(
            "SELECT id, job_kind, EXTRACT(EPOCH FROM now() - coalesce(dispatched_at, created_at)) "
            "AS age_seconds FROM jobs WHERE status = 'queued' "
            "ORDER BY dispatched_at NULLS FIRST, id LIMIT 1"
        )
    ).first()


def finished_counts(conn: Connection, *, within_seconds: float) -> Any:
    """(done, error) among jobs that finished within the window; canceled jobs are not outcomes."""
    return conn.execute(
        Statement(
            "SELECT count(*) FILTER (WHERE status = 'done') AS done, "
            "count(*) FILTER (WHERE status = 'error') AS error FROM jobs "
            "WHERE status IN ('done', 'error') AND completed_at >= now() - make_interval(secs => CAST(:w AS float8))"
        ),
        {"w": within_seconds},
    ).one()


# --- archiving (lesson history limits) ------------------------------------------------------------
#
# A run snapshots a cutoff. A user's "boundary" is the newest of their visible lessons created before
# the cutoff that is beyond their limit: found on the partial index lessons_user_visible_idx, reading
# N+1 entries of that user, with no ranking of the table. The boundary and every older visible lesson
# are archived. A run computes every boundary once (an index-only probe per user, into a temporary
# table of the worker's connection), then batches walk the table in physical (block) order, so each
# reads and rewrites a compact run of pages, as a sequential scan would, instead of hopping between
# users' rows scattered over the whole heap. Archiving never moves a boundary (only older lessons go),
# so a batch can stop anywhere, batches on disjoint block ranges can run concurrently, and the next
# one (or a re-run after a crash, which computes the boundaries again) finds exactly the rest.
# The price: every run reads the whole heap once, sequentially, even when little is over the limit.

_LIMITS_CTE = """
    limits AS (
        SELECT tier, keep FROM unnest(CAST(:tiers AS text[]), CAST(:keeps AS integer[])) AS t(tier, keep)
    )"""


def _boundaries(users_where: str) -> str:
    return f"""
    SELECT u.id AS user_id, u.tier, f.created_at, f.id
      FROM users u
      LEFT JOIN limits ON limits.tier = u.tier
     CROSS JOIN LATERAL (
           SELECT created_at, id FROM lessons
            WHERE user_id = u.id AND archived_at IS NULL AND created_at < :cutoff
            ORDER BY created_at DESC, id DESC
           OFFSET coalesce(limits.keep, :fallback_keep) LIMIT 1
     ) f
     WHERE {users_where}"""


# Lesson `l` is archived when it is visible, older than the cutoff, and not newer than its owner's
# boundary `b`.
_DOOMED = """
    l.archived_at IS NULL AND l.created_at < :cutoff AND (l.created_at, l.id) <= (b.created_at, b.id)"""


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
    return conn.execute(Statement("SELECT clock_timestamp()")).value()


def lesson_blocks(conn: Connection) -> int:
    """How many heap blocks lessons has now: the end of the archiver's walk."""
    return int(
        conn.execute(
            Statement("SELECT pg_relation_size('lessons') / current_setting('block_size')::integer")
        ).value()
    )


# A run computes every boundary once, into a temporary table of the connection that runs its
# batches (one row per user over the limit), instead of looking them up again in every batch for
# each user the batch meets: with lessons spread over the heap a batch meets thousands of users, and
# the repeated lookups cost as much as the batch's writes (1M-lesson bench: a 10,000-row batch met
# ~7,000 users and spent ~0.4 s of its ~0.9 s probing them; the hash join on the table takes ~25 ms).
# The boundaries stay right for the whole run: archiving only removes lessons older than a boundary,
# and lessons created after the cutoff do not count. A crashed run loses the table with its
# connection; the retry computes it again from the lessons still visible.
_CREATE_BOUNDARIES = Statement(
    "CREATE TEMPORARY TABLE archive_boundaries "
    "(user_id text PRIMARY KEY, created_at timestamptz NOT NULL, id uuid NOT NULL)"
)
_FILL_BOUNDARIES = Statement(
    f"""
    WITH {_LIMITS_CTE}
    INSERT INTO archive_boundaries (user_id, created_at, id)
    SELECT b.user_id, b.created_at, b.id FROM ({_boundaries("true")}) AS b
    """
)


def create_boundaries(conn: Connection, *, limits: TierLimits, cutoff: datetime) -> int:
    """Fill this connection's `archive_boundaries`; returns how many users are over their limit."""
    conn.execute(_CREATE_BOUNDARIES)
    users = int(conn.execute(_FILL_BOUNDARIES, {**limits.params(), "cutoff": cutoff}).rowcount)
    conn.execute_simple("ANALYZE archive_boundaries")  # temporary tables get no autovacuum
    return users


def drop_boundaries(conn: Connection) -> None:
    conn.execute_simple("DROP TABLE IF EXISTS archive_boundaries")


# The block range is a TID range scan (PostgreSQL 14+), hash-joined to the boundaries;
# ctid = ANY(ARRAY(...)) is a TID scan, so the batch rewrites exactly the rows it found, on the pages
# it just read, with no index lookups.
_ARCHIVE_BLOCKS = Statement(
    """
    UPDATE lessons SET archived_at = now()
     WHERE ctid = ANY(ARRAY(
               SELECT l.ctid FROM lessons l JOIN archive_boundaries b ON b.user_id = l.user_id
                WHERE l.ctid >= CAST(:first AS tid) AND l.ctid < CAST(:last AS tid)
                  AND l.archived_at IS NULL AND l.created_at < :cutoff
                  AND (l.created_at, l.id) <= (b.created_at, b.id)
                LIMIT :batch_size))
       AND archived_at IS NULL
    """
)


def archive_blocks(
    conn: Connection,
    *,
    first_block: int,
    last_block: int,
    cutoff: datetime,
    batch_size: int,
) -> int:
    """Archive up to `batch_size` doomed lessons stored in blocks [first_block, last_block), by the
    boundaries `create_boundaries` put on this connection.

    Fewer than `batch_size` means that block range is done.
    """
    return int(
        conn.execute(
            _ARCHIVE_BLOCKS,
            {
                "first": f"({first_block},0)",
                "last": f"({last_block},0)",
                "cutoff": cutoff,
                "batch_size": batch_size,
            },
        ).rowcount
    )


@dataclass(frozen=True)
class TierPreview:
    tier: str
    users_over_limit: int
    lessons: int


_PREVIEW_ARCHIVE = Statement(
    f"""
    WITH {_LIMITS_CTE},
    boundaries AS ({_boundaries("true")})
    SELECT b.tier, count(*) AS users_over_limit, sum(n.lessons) AS lessons
      FROM boundaries b
     CROSS JOIN LATERAL (
           SELECT count(*) AS lessons FROM lessons l WHERE l.user_id = b.user_id AND {_DOOMED}
     ) n
     GROUP BY b.tier
     ORDER BY b.tier
    """
)


def preview_archive(conn: Connection, *, limits: TierLimits, cutoff: datetime) -> list[TierPreview]:
    """What a run with this cutoff would archive, per tier (read-only)."""
    rows = conn.execute(_PREVIEW_ARCHIVE, {**limits.params(), "cutoff": cutoff})
    return [TierPreview(r.tier, int(r.users_over_limit), int(r.lessons)) for r in rows]


def unknown_tiers(conn: Connection, known: list[str]) -> list[str]:
    rows = conn.execute(
        Statement("SELECT DISTINCT tier FROM users WHERE NOT (tier = ANY(CAST(:known AS text[]))) ORDER BY tier"),
        {"known": known},
    )
    return [row.tier for row in rows]


def set_user_tier(conn: Connection, *, user_id: str, tier: str) -> bool:
    """False when there is no such user (tiers are set on existing users only)."""
    updated = conn.execute(
        Statement("UPDATE users SET tier = :tier WHERE id = :id"), {"id": user_id, "tier": tier}
    )
    return updated.rowcount == 1

"""The job system's SQL. Callers pass a Connection from common.platform.db.

Statements that decide correctness (the claim, the conditional finish) are single set-based UPDATEs,
so concurrent deliveries of one job are serialised by PostgreSQL's row lock, not by the application.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.jobs.model import JOB_COLUMNS, Job, Progress
from common.platform.db import Connection, Statement, jsonb

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
            "request_json": jsonb(request_json),
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


# A user's job of a quota-limited kind: the per-user lock, the usage count and the conditional insert
# run inside the database function insert_limited_job (migrations/versions/0002_job_quotas.py), whose
# statements each take a fresh snapshot after the lock; one statement in one round trip for us.
_INSERT_LIMITED_JOB = Statement(
    """
    SELECT outcome, id, created_at, tier, quota_limit, used, resets_at, db_now
      FROM insert_limited_job(CAST(:user_id AS text), CAST(:job_kind AS text),
                              CAST(:idempotency_key AS text), CAST(:request_json AS jsonb),
                              CAST(:max_attempts AS integer), CAST(:daily_limits AS jsonb),
                              CAST(:active_limits AS jsonb), CAST(:now AS timestamptz))
    """,
    prepare=True,
)


@dataclass(frozen=True)
class Refused:
    """Why insert_limited_job wrote nothing: `outcome` is 'quota-exceeded' or 'too-many-active-jobs'."""

    outcome: str
    tier: str
    limit: int
    used: int
    resets_at: datetime | None  # the daily quota's reset (the next UTC midnight)
    now: datetime  # the database's clock (or the injected one)


def insert_limited_job(
    conn: Connection,
    *,
    user_id: str,
    job_kind: str,
    idempotency_key: str,
    request_json: dict[str, Any],
    max_attempts: int,
    daily_limits: dict[str, int],
    active_limits: dict[str, int],
    now: datetime | None = None,
) -> Job | Refused | None:
    """Insert a queued job unless the user's tier limits refuse it (Refused); None if the key exists.
    `now` None is the database's clock; tests inject one to cross a UTC midnight."""
    row = conn.execute(
        _INSERT_LIMITED_JOB,
        {
            "user_id": user_id,
            "job_kind": job_kind,
            "idempotency_key": idempotency_key,
            "request_json": jsonb(request_json),
            "max_attempts": max_attempts,
            "daily_limits": jsonb(daily_limits),
            "active_limits": jsonb(active_limits),
            "now": now,
        },
    ).first()
    if row is None or row.outcome == "exists":
        return None
    if row.outcome != "created":
        return Refused(row.outcome, row.tier, row.quota_limit, row.used, row.resets_at, row.db_now)
    return Job.queued(
        id=row.id,
        user_id=user_id,
        job_kind=job_kind,
        idempotency_key=idempotency_key,
        request_json=request_json,
        max_attempts=max_attempts,
        now=row.created_at,
    )


@dataclass(frozen=True)
class Usage:
    """What a user's jobs of one kind count against their tier now (see job_usage in 0002)."""

    tier: str | None  # None: no such user yet (users appear with their first job)
    day_start: datetime
    daily_used: int
    active_used: int


_USAGE = Statement(
    """
    SELECT (SELECT tier FROM users WHERE id = CAST(:user_id AS text)) AS tier,
           day_start, daily_used, active_used
      FROM job_usage(CAST(:user_id AS text), CAST(:job_kind AS text),
                     coalesce(CAST(:now AS timestamptz), now()))
    """,
    prepare=True,
)


def job_usage(conn: Connection, *, user_id: str, job_kind: str, now: datetime | None = None) -> Usage:
    row = conn.execute(_USAGE, {"user_id": user_id, "job_kind": job_kind, "now": now}).one()
    return Usage(row.tier, row.day_start, row.daily_used, row.active_used)


_USAGES = Statement(
    """
    SELECT u.id, u.tier, usage.day_start, usage.daily_used, usage.active_used
      FROM users u
     CROSS JOIN LATERAL job_usage(u.id, CAST(:job_kind AS text), now()) AS usage
     WHERE u.id = ANY(CAST(:user_ids AS text[]))
    """
)


def job_usages(conn: Connection, *, user_ids: list[str], job_kind: str) -> dict[str, Usage]:
    """job_usage for several existing users in one statement (the operators' Users page)."""
    rows = conn.execute(_USAGES, {"user_ids": user_ids, "job_kind": job_kind})
    return {row.id: Usage(row.tier, row.day_start, row.daily_used, row.active_used) for row in rows}


_FIND_JOB_BY_KEY = Statement(
    f"SELECT {JOB_COLUMNS} FROM jobs WHERE user_id IS NOT DISTINCT FROM CAST(:user_id AS text) "
    "AND job_kind = :job_kind AND idempotency_key = :key",
    prepare=True,
)
_GET_JOB = Statement(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = CAST(:id AS uuid)", prepare=True)


# Progress is derived, never counted: the sections done and planned, read with the job.
_GET_JOB_WITH_PROGRESS = Statement(
    f"""
    SELECT {JOB_COLUMNS}, sections.done AS sections_done, sections.total AS sections
      FROM jobs,
           LATERAL (SELECT count(*) FILTER (WHERE s.status = 'done') AS done, count(*) AS total
                      FROM jobs s WHERE s.parent_id = jobs.id) AS sections
     WHERE jobs.id = CAST(:id AS uuid)
    """,
    prepare=True,
)


def get_job_with_progress(conn: Connection, job_id: uuid.UUID) -> tuple[Job, Progress] | None:
    row = conn.execute(_GET_JOB_WITH_PROGRESS, {"id": job_id}).first()
    if row is None:
        return None
    job = Job.from_row(row)
    return job, Progress.of(job, sections_done=int(row.sections_done), sections=int(row.sections))


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


# A section starts only while its parent waits on it (not canceled, not failed) and no sibling has
# failed: checked inside the claim, so nothing starts after a cancel or a failed section commits.
SECTION_MAY_START = """
    EXISTS (SELECT 1 FROM jobs parent
             WHERE parent.id = jobs.parent_id AND parent.status = 'running'
               AND parent.lease_expires_at IS NULL)
    AND NOT EXISTS (SELECT 1 FROM jobs sibling
                     WHERE sibling.parent_id = jobs.parent_id AND sibling.status = 'error')
"""

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
           AND (parent_id IS NULL OR {SECTION_MAY_START})
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


FINISH_GUARD = "WHERE id = :id AND status = 'running' AND attempts = :attempt"

_COMPLETE_JOB = Statement(
    "UPDATE jobs SET status = 'done', result_json = CAST(:result AS jsonb), "
    "error_json = NULL, lease_expires_at = NULL, completed_at = now(), updated_at = now() " + FINISH_GUARD,
    prepare=True,
)


def complete_job(conn: Connection, job_id: uuid.UUID, *, attempt: int, result: dict[str, Any]) -> bool:
    """`running` -> `done`, only if this attempt still holds the claim (not canceled, not stolen)."""
    updated = conn.execute(_COMPLETE_JOB, {"id": job_id, "attempt": attempt, "result": jsonb(result)})
    return updated.rowcount == 1


_FAIL_JOB = Statement(
    "UPDATE jobs SET status = CASE WHEN CAST(:final AS boolean) THEN 'error' ELSE 'queued' END, "
    "error_json = CAST(:error AS jsonb), lease_expires_at = NULL, "
    "completed_at = CASE WHEN CAST(:final AS boolean) THEN now() END, updated_at = now() " + FINISH_GUARD,
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
        _FAIL_JOB, {"id": job_id, "attempt": attempt, "error": jsonb(error), "final": final}
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
        {"id": job_id, "error": jsonb(error)},
    )
    return updated.rowcount == 1


# --- sections: a job that fans out into child jobs ------------------------------------------------
#
# Lock order, everywhere a parent and its sections change together: the parent row first, then the
# sections. A parent waiting on its sections is `running` with no lease.

_START_SECTIONS = Statement(
    f"""
    WITH parent AS (
        UPDATE jobs SET plan = CAST(:plan AS jsonb), lease_expires_at = NULL, updated_at = now()
        {FINISH_GUARD}
        RETURNING id, user_id
    )
    INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json,
                      attempts, max_attempts, dispatched_at, parent_id, section_index)
    SELECT gen_random_uuid(), parent.user_id, CAST(:kind AS text), 'queued',
           parent.id || ':' || (brief.n - 1),
           jsonb_build_object('job_kind', CAST(:kind AS text), 'section_index', brief.n - 1,
                              'heading', brief.value ->> 'heading'),
           0, :max_attempts, now(), parent.id, brief.n - 1
      FROM parent,
           jsonb_array_elements(CAST(:plan AS jsonb) -> 'sections') WITH ORDINALITY AS brief(value, n)
    RETURNING {JOB_COLUMNS}
    """
)


def start_sections(
    conn: Connection,
    job_id: uuid.UUID,
    *,
    attempt: int,
    plan: dict[str, Any],
    section_kind: str,
    max_attempts: int,
) -> list[Job] | None:
    """Store the plan, leave the job waiting (`running`, no lease) and insert one queued section
    per `plan["sections"]` entry, all in one statement; None if this attempt lost its claim."""
    rows = conn.execute(
        _START_SECTIONS,
        {
            "id": job_id,
            "attempt": attempt,
            "plan": jsonb(plan),
            "kind": section_kind,
            "max_attempts": max_attempts,
        },
    ).all()
    return [Job.from_row(row) for row in rows] or None


_GET_PLAN = Statement("SELECT request_json, plan FROM jobs WHERE id = :id", prepare=True)


def get_plan(conn: Connection, job_id: uuid.UUID) -> Any:
    """(request_json, plan) of a parent, for its sections to run."""
    return conn.execute(_GET_PLAN, {"id": job_id}).first()


# The parent is locked first (FOR UPDATE, re-checked after the wait): sections finishing at once
# finish one after another, so the statement that follows in the same transaction (the fan-in) sees
# every sibling that finished before. A parent no longer waiting (canceled, failed) discards it.
_FINISH_SECTION = Statement(
    """
    WITH parent AS (
        SELECT id FROM jobs
         WHERE id = :parent_id AND status = 'running' AND lease_expires_at IS NULL
         FOR UPDATE
    )
    UPDATE jobs SET status = 'done', result_json = CAST(:result AS jsonb), error_json = NULL,
           lease_expires_at = NULL, completed_at = now(), updated_at = now()
     WHERE id = :id AND status = 'running' AND attempts = :attempt
       AND parent_id = (SELECT id FROM parent)
    """,
    prepare=True,
)


def finish_section(conn: Connection, section: Job, *, attempt: int, result: dict[str, Any]) -> bool:
    """The section -> `done` (its result stored) if this attempt holds it and its parent still
    waits; run inside the transaction that then tries the fan-in."""
    updated = conn.execute(
        _FINISH_SECTION,
        {"id": section.id, "parent_id": section.parent_id, "attempt": attempt, "result": jsonb(result)},
    )
    return updated.rowcount == 1


# A waiting parent with a failed section fails (`section_failed`, naming the section and its error)
# and its unfinished sections are canceled, in one statement (the parent row first). The processor
# runs it right after a section's last attempt fails, and rescue_jobs for every parent, so a crash
# in between is repaired.
_FAIL_PARENTS = Statement(
    """
    WITH failed AS (
        UPDATE jobs parent
           SET status = 'error', lease_expires_at = NULL, completed_at = now(), updated_at = now(),
               error_json = jsonb_build_object(
                   'code', 'section_failed',
                   'message', format('Section %s failed: %s', section.section_index,
                                     coalesce(section.error_json ->> 'message', 'no message')),
                   'section_index', section.section_index,
                   'section_job_id', section.id,
                   'section_error', section.error_json)
          FROM (SELECT DISTINCT ON (s.parent_id) s.parent_id, s.id, s.section_index, s.error_json
                  FROM jobs s JOIN jobs p ON p.id = s.parent_id
                 WHERE s.status = 'error' AND p.status = 'running' AND p.lease_expires_at IS NULL
                   AND (CAST(:parent_id AS uuid) IS NULL OR p.id = CAST(:parent_id AS uuid))
                 ORDER BY s.parent_id, s.section_index) AS section
         WHERE parent.id = section.parent_id
           AND parent.status = 'running' AND parent.lease_expires_at IS NULL
        RETURNING parent.id
    )
    UPDATE jobs SET status = 'canceled', lease_expires_at = NULL, completed_at = now(),
           updated_at = now()
      FROM failed
     WHERE jobs.parent_id = failed.id AND jobs.status IN ('queued', 'running')
    RETURNING failed.id
    """
)


def fail_parents_of_failed_sections(conn: Connection, *, parent_id: uuid.UUID | None = None) -> int:
    """Apply the rule above to one parent (`parent_id`) or every waiting one (None)."""
    return len(conn.execute(_FAIL_PARENTS, {"parent_id": parent_id}).all())


_CANCEL_SECTIONS = Statement(
    "UPDATE jobs SET status = 'canceled', lease_expires_at = NULL, completed_at = now(), "
    "updated_at = now() WHERE parent_id = :id AND status IN ('queued', 'running')"
)


def cancel_sections(conn: Connection, parent_id: uuid.UUID) -> int:
    """Cancel a parent's unfinished sections (after the parent, in the same transaction)."""
    return conn.execute(_CANCEL_SECTIONS, {"id": parent_id}).rowcount


def list_sections(conn: Connection, parent_id: uuid.UUID) -> list[Job]:
    rows = conn.execute(
        Statement(f"SELECT {JOB_COLUMNS} FROM jobs WHERE parent_id = :id ORDER BY section_index"),
        {"id": parent_id},
    )
    return [Job.from_row(row) for row in rows]


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


# --- operator queries and the cancel / retry transitions ------------------------------------------


@dataclass(frozen=True)
class JobFilter:
    """Optional filters shared by `jobs list` and bulk `jobs retry`; None means "any"."""

    statuses: tuple[str, ...] | None = None
    kinds: tuple[str, ...] | None = None
    user_id: str | None = None
    created_before_seconds: float | None = None  # created more than this long ago
    finished_within_seconds: float | None = None  # completed_at within this window
    error_code: str | None = None  # error_json's code (the dashboard's failure groups)
    before: tuple[datetime, uuid.UUID] | None = None  # keyset cursor: older than this (created_at, id)

    def where(self) -> tuple[str, dict[str, Any]]:
        clauses: list[str] = ["parent_id IS NULL"]  # sections show under their parent
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
        if self.error_code is not None:
            clauses.append("error_json ->> 'code' = :error_code")
            params["error_code"] = self.error_code
        if self.before is not None:
            clauses.append("(created_at, id) < (CAST(:before_at AS timestamptz), CAST(:before_id AS uuid))")
            params["before_at"], params["before_id"] = self.before[0], str(self.before[1])
        return " AND ".join(clauses), params


def list_jobs(conn: Connection, job_filter: JobFilter, *, limit: int | None) -> list[Job]:
    """Newest first; `limit` None means every match (bulk retry confirms the exact set)."""
    where, params = job_filter.where()
    limit_sql = ""
    if limit is not None:
        limit_sql = "LIMIT :limit"
        params["limit"] = limit
    rows = conn.execute(
        Statement(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where} ORDER BY created_at DESC, id DESC {limit_sql}"
        ),
        params,
    )
    return [Job.from_row(row) for row in rows]


def job_kind_exists(conn: Connection, kind: str) -> bool:
    return bool(
        conn.execute(
            Statement("SELECT EXISTS (SELECT 1 FROM jobs WHERE job_kind = :k)"), {"k": kind}
        ).scalar()
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
            "WHERE id = :id AND status IN ('queued', 'running') AND parent_id IS NULL "
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

    A parent that had planned is not planned again: it waits on its sections again (`running`, no
    lease) and only its sections that did not finish are requeued; they come back in the same list
    (`parent_id` set). Sections are never retried on their own.
    """
    rows = conn.execute(
        Statement(
            f"""
            WITH retried AS (
                UPDATE jobs
                   SET status = CASE WHEN plan IS NULL THEN 'queued' ELSE 'running' END,
                       max_attempts = attempts + :extra, lease_expires_at = NULL, result_json = NULL,
                       started_at = CASE WHEN plan IS NULL THEN NULL ELSE started_at END,
                       completed_at = NULL, dispatched_at = now(), updated_at = now()
                 WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ('error', 'canceled')
                   AND parent_id IS NULL
                   AND NOT EXISTS (SELECT 1 FROM lessons WHERE lessons.job_id = jobs.id)
                RETURNING {JOB_COLUMNS}
            ), sections AS (
                UPDATE jobs
                   SET status = 'queued', max_attempts = jobs.attempts + :extra,
                       lease_expires_at = NULL, result_json = NULL, completed_at = NULL,
                       dispatched_at = now(), updated_at = now()
                  FROM retried
                 WHERE jobs.parent_id = retried.id AND jobs.status <> 'done'
                RETURNING {", ".join("jobs." + c.strip() for c in JOB_COLUMNS.split(","))}
            )
            SELECT * FROM retried UNION ALL SELECT * FROM sections
            """
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
            Statement(
                "SELECT job_kind, status, count(*) AS n FROM jobs GROUP BY job_kind, status ORDER BY 1, 2"
            )
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


# --- users ----------------------------------------------------------------------------------------


def set_user_tier(conn: Connection, *, user_id: str, tier: str) -> bool:
    """False when there is no such user (tiers are set on existing users only)."""
    updated = conn.execute(
        Statement("UPDATE users SET tier = :tier WHERE id = :id"), {"id": user_id, "tier": tier}
    )
    return updated.rowcount == 1

"""Reading jobs: the job system's queries that change nothing (every change is in transitions.py).
Callers pass a Connection from common.platform.db."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.jobs.model import JOB_COLUMNS, Job, Progress
from common.platform.db import Connection, Statement

# Two statements, not `user_id IS NOT DISTINCT FROM :user_id`: PostgreSQL can use no index for
# that, so every replay would scan the whole table; each of these is one probe of jobs_idempotency_uq.
_FIND_JOB_BY_KEY = Statement(
    f"SELECT {JOB_COLUMNS} FROM jobs WHERE user_id = CAST(:user_id AS text) "
    "AND job_kind = :job_kind AND idempotency_key = :key",
    prepare=True,
)
_FIND_OWNERLESS_JOB_BY_KEY = Statement(
    f"SELECT {JOB_COLUMNS} FROM jobs WHERE user_id IS NULL AND job_kind = :job_kind AND idempotency_key = :key"
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
    params = {"job_kind": job_kind, "key": idempotency_key}
    if user_id is None:
        row = conn.execute(_FIND_OWNERLESS_JOB_BY_KEY, params).first()
    else:
        row = conn.execute(_FIND_JOB_BY_KEY, {**params, "user_id": user_id}).first()
    return Job.from_row(row) if row else None


_GET_JOBS = Statement(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))")


def get_jobs(conn: Connection, job_ids: list[uuid.UUID]) -> list[Job]:
    rows = conn.execute(_GET_JOBS, {"ids": [str(i) for i in job_ids]})
    return [Job.from_row(row) for row in rows]


def get_job(conn: Connection, job_id: uuid.UUID) -> Job | None:
    row = conn.execute(_GET_JOB, {"id": job_id}).first()
    return Job.from_row(row) if row else None


_GET_PLAN = Statement("SELECT request_json, plan FROM jobs WHERE id = :id", prepare=True)


def get_plan(conn: Connection, job_id: uuid.UUID) -> Any:
    """(request_json, plan) of a parent, for its sections to run; None if there is no such job."""
    return conn.execute(_GET_PLAN, {"id": job_id}).first()


_LIST_SECTIONS = Statement(f"SELECT {JOB_COLUMNS} FROM jobs WHERE parent_id = :id ORDER BY section_index")


def list_sections(conn: Connection, parent_id: uuid.UUID) -> list[Job]:
    rows = conn.execute(_LIST_SECTIONS, {"id": parent_id})
    return [Job.from_row(row) for row in rows]


_ATTEMPTS = Statement(
    "SELECT attempt, started_at, ended_at, outcome, error_code, error_message, error_detail, instance "
    "FROM job_attempts WHERE job_id = :id ORDER BY attempt"
)


@dataclass(frozen=True)
class Attempt:
    """One attempt of a job, for operators: the raw error (`error_detail`) included."""

    attempt: int
    started_at: datetime | None
    ended_at: datetime | None
    outcome: str
    error_code: str | None
    error_message: str | None
    error_detail: str | None
    instance: str | None

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()


def list_attempts(conn: Connection, job: Job) -> list[Attempt]:
    """Every attempt on record, and the one that finished the job (its own row says how)."""
    attempts = [Attempt(*row) for row in conn.execute(_ATTEMPTS, {"id": job.id})]
    if job.status == "done" and all(a.attempt != job.attempts for a in attempts):
        attempts.append(
            Attempt(job.attempts, job.attempt_started_at, job.completed_at, "done", None, None, None, None)
        )
    return attempts


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
        if self.statuses is not None and len(self.statuses) == 1:
            # `=`, not `= ANY`: before PostgreSQL 17 an index read through `= ANY` gives no order, so
            # "newest errors first" would walk every job newest first instead of jobs_failed_idx.
            clauses.append("status = :status")
            params["status"] = self.statuses[0]
        elif self.statuses is not None:
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


_KIND_EXISTS = Statement("SELECT EXISTS (SELECT 1 FROM jobs WHERE job_kind = :k)")


def job_kind_exists(conn: Connection, kind: str) -> bool:
    return bool(conn.execute(_KIND_EXISTS, {"k": kind}).scalar())


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

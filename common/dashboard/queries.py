"""The dashboard's own SQL: the overview's counts and chart, the queue view, failure groups, users,
the sections' progress of listed jobs, the CSRF key. Every statement is declared here, at module
level.

Everything the overview and the queue view run is an index range (jobs_created_idx,
jobs_completed_idx) or the live rows (jobs_live_idx); bench/dashboard_bench.py times them over
1,000,000 jobs. Counts of what users asked for leave section kinds out (`leave_out`, from
common.jobs.kinds.section_kinds): a lesson counts once, however many sections it has. Job lists and
operator actions are not here: they are common.jobs.ops, the CLI's implementation.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from common.accounts import users as accounts
from common.accounts.tiers import usage_view
from common.lessons.kind import LessonKind
from common.platform.db import Connection, Statement

_LAST_DAY = Statement(
    "SELECT job_kind, status, count(*) AS n FROM jobs WHERE created_at >= now() - interval '24 hours' "
    "GROUP BY job_kind, status ORDER BY job_kind, status"
)

# One row per minute of the last 60 (the current one last), zeros included; index-only.
_PER_MINUTE = Statement(
    """
    WITH minutes AS (
        SELECT generate_series(date_trunc('minute', now()) - interval '59 minutes',
                               date_trunc('minute', now()), interval '1 minute') AS minute
    ), created AS (
        SELECT date_trunc('minute', created_at) AS minute, count(*) AS n FROM jobs
         WHERE created_at >= date_trunc('minute', now()) - interval '59 minutes'
           AND job_kind <> ALL(CAST(:leave_out AS text[]))
         GROUP BY 1
    ), finished AS (
        SELECT date_trunc('minute', completed_at) AS minute,
               count(*) FILTER (WHERE status = 'done') AS done,
               count(*) FILTER (WHERE status = 'error') AS failed
          FROM jobs
         WHERE completed_at >= date_trunc('minute', now()) - interval '59 minutes'
           AND status IN ('done', 'error') AND job_kind <> ALL(CAST(:leave_out AS text[]))
         GROUP BY 1
    )
    SELECT minutes.minute, coalesce(created.n, 0) AS created, coalesce(finished.done, 0) AS done,
           coalesce(finished.failed, 0) AS failed
      FROM minutes LEFT JOIN created USING (minute) LEFT JOIN finished USING (minute)
     ORDER BY minutes.minute
    """
)


def last_day_counts(conn: Connection) -> list[Any]:
    return conn.execute(_LAST_DAY).all()


def per_minute(conn: Connection, *, leave_out: Sequence[str]) -> list[Any]:
    return conn.execute(_PER_MINUTE, {"leave_out": list(leave_out)}).all()


# --- usage ---------------------------------------------------------------------------------------

# Jobs created per hour over the last 24 (the current hour last), zeros included, and how many of
# them are done and failed by now: one index-only range of jobs_created_idx (created_at, status,
# job_kind). Hours from an integer series: its 24 rows are known to the planner (see _LATENCY).
_PER_HOUR = Statement(
    """
    WITH hours AS (
        SELECT date_trunc('hour', now()) - (23 - i) * interval '1 hour' AS hour
          FROM generate_series(0, 23) AS i
    ), created AS (
        SELECT date_trunc('hour', created_at) AS hour, count(*) AS n,
               count(*) FILTER (WHERE status = 'done') AS done,
               count(*) FILTER (WHERE status = 'error') AS failed
          FROM jobs
         WHERE created_at >= date_trunc('hour', now()) - interval '23 hours'
           AND job_kind <> ALL(CAST(:leave_out AS text[]))
         GROUP BY 1
    )
    SELECT hours.hour, coalesce(created.n, 0) AS created, coalesce(created.done, 0) AS done,
           coalesce(created.failed, 0) AS failed
      FROM hours LEFT JOIN created USING (hour)
     ORDER BY hours.hour
    """
)

# The users with the most jobs created in the last 24 hours (a jobs_created_idx range, each row's
# user read from the heap): their own jobs by outcome, and the sections those planned.
_TOP_USERS = Statement(
    """
    SELECT user_id,
           count(*) FILTER (WHERE parent_id IS NULL) AS jobs,
           count(*) FILTER (WHERE parent_id IS NULL AND status = 'done') AS done,
           count(*) FILTER (WHERE parent_id IS NULL AND status = 'error') AS failed,
           count(*) FILTER (WHERE parent_id IS NULL AND status = 'canceled') AS canceled,
           count(*) FILTER (WHERE parent_id IS NULL AND status IN ('queued', 'running')) AS live,
           count(*) FILTER (WHERE parent_id IS NOT NULL) AS sections
      FROM jobs
     WHERE created_at >= now() - interval '24 hours' AND user_id IS NOT NULL
     GROUP BY user_id
     ORDER BY jobs DESC, user_id
     LIMIT :limit
    """
)


def per_hour(conn: Connection, *, leave_out: Sequence[str]) -> list[Any]:
    return conn.execute(_PER_HOUR, {"leave_out": list(leave_out)}).all()


def top_users(conn: Connection, *, limit: int) -> list[Any]:
    """(user_id, jobs, done, failed, canceled, live, sections) of the last 24 h, most jobs first."""
    return conn.execute(_TOP_USERS, {"limit": limit}).all()


# --- the queue -------------------------------------------------------------------------------------

# The live jobs by kind (jobs_live_idx: only queued and running rows are read). A queued job is ready
# once its run_after (a retry's backoff, a deferral) has passed, scheduled for later before; a running
# one is in flight while it holds a lease, waiting on its sections without one.
_QUEUE_NOW = Statement(
    """
    SELECT job_kind,
           count(*) FILTER (WHERE status = 'queued' AND (run_after IS NULL OR run_after <= now())) AS ready,
           count(*) FILTER (WHERE status = 'queued' AND run_after > now()) AS scheduled,
           count(*) FILTER (WHERE status = 'running' AND lease_expires_at IS NOT NULL) AS in_flight,
           count(*) FILTER (WHERE status = 'running' AND lease_expires_at IS NULL) AS waiting,
           EXTRACT(EPOCH FROM now() - min(coalesce(dispatched_at, created_at))
               FILTER (WHERE status = 'queued' AND (run_after IS NULL OR run_after <= now())))
               AS oldest_ready_seconds,
           min(run_after) FILTER (WHERE status = 'queued' AND run_after > now()) AS next_scheduled
      FROM jobs
     WHERE status IN ('queued', 'running')
     GROUP BY job_kind ORDER BY job_kind
    """
)

# Jobs finished (done or error) per kind and time bucket since :since: an index-only range of
# jobs_completed_idx (completed_at, status, job_kind). Hashed, not sorted: a sort of a day's rows
# spills to disk at the default work_mem.
_THROUGHPUT = Statement(
    """
    SELECT job_kind,
           date_bin(make_interval(secs => CAST(:step AS float8)), completed_at,
                    CAST(:since AS timestamptz)) AS at,
           count(*) AS finished, count(*) FILTER (WHERE status = 'error') AS failed
      FROM jobs
     WHERE completed_at >= CAST(:since AS timestamptz) AND status IN ('done', 'error')
     GROUP BY 1, 2
    """
)

# Percentiles of the wait before the first start and of the run, per kind and bucket, and per kind
# over the window (the GROUPING SET whose `at` is NULL), from the newest :per_bucket jobs of each
# kind (:kinds, those the window's throughput found) finished in each bucket: the heap rows read
# stay bounded however many jobs finish, and a busy kind never crowds a quiet one out of its sample. The buckets come from an
# integer series: its row count is known to the planner (a timestamp series is guessed at 1,000
# rows, which prices the plan over jit_above_cost and pays ~20 ms of JIT compilation per view).
_LATENCY = Statement(
    """
    WITH buckets AS (
        SELECT CAST(:since AS timestamptz) + i * make_interval(secs => CAST(:step AS float8)) AS at
          FROM generate_series(0, CAST(:buckets AS integer) - 1) AS i
    )
    SELECT k.job_kind, b.at,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY s.wait) AS wait_p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY s.wait) AS wait_p95,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY s.run) AS run_p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY s.run) AS run_p95
      FROM buckets b
     CROSS JOIN unnest(CAST(:kinds AS text[])) AS k(job_kind)
     CROSS JOIN LATERAL (
           SELECT EXTRACT(EPOCH FROM started_at - created_at) AS wait,
                  EXTRACT(EPOCH FROM completed_at - started_at) AS run
             FROM jobs
            WHERE completed_at >= b.at
              AND completed_at < b.at + make_interval(secs => CAST(:step AS float8))
              AND status IN ('done', 'error') AND job_kind = k.job_kind
            ORDER BY completed_at DESC LIMIT :per_bucket) s
     GROUP BY GROUPING SETS ((k.job_kind, b.at), (k.job_kind))
    """
)
LATENCY_SAMPLE = 100  # jobs per bucket the percentiles read


def queue_now(conn: Connection) -> list[Any]:
    return conn.execute(_QUEUE_NOW).all()


def throughput(conn: Connection, *, since: datetime, step_seconds: float) -> list[Any]:
    """Rows (job_kind, at, finished, failed): `at` is a bucket's start; buckets with none are absent."""
    return conn.execute(_THROUGHPUT, {"since": since, "step": step_seconds}).all()


def latency(
    conn: Connection, *, since: datetime, step_seconds: float, buckets: int, kinds: Sequence[str]
) -> list[Any]:
    """Rows (job_kind, at, wait_p50, wait_p95, run_p50, run_p95) in seconds, from a bounded sample
    (LATENCY_SAMPLE per kind and bucket) of `buckets` buckets from `since`; `at` None: the whole
    window."""
    params = {
        "since": since,
        "step": step_seconds,
        "buckets": buckets,
        "per_bucket": LATENCY_SAMPLE,
        "kinds": list(kinds),
    }
    return conn.execute(_LATENCY, params).all()


# --- failures --------------------------------------------------------------------------------------

FAILURE_WINDOW = "24h"  # "recent" failures: what the Failures page groups and a group retry takes

_FAILURE_GROUPS = Statement(
    """
    SELECT coalesce(error_json ->> 'code', '') AS code, count(*) AS n, max(completed_at) AS last_at,
           (array_agg(error_json ->> 'message' ORDER BY completed_at DESC))[1] AS message
      FROM jobs
     WHERE status = 'error' AND completed_at >= now() - interval '24 hours'
       AND job_kind <> ALL(CAST(:leave_out AS text[]))
     GROUP BY 1 ORDER BY n DESC, code
    """
)


def failure_groups(conn: Connection, *, leave_out: Sequence[str]) -> list[Any]:
    """(code, n, last_at, message) of `error` jobs finished in the last 24 h, biggest group first;
    a failed lesson is one failure, not one more per failed section (`leave_out`)."""
    return conn.execute(_FAILURE_GROUPS, {"leave_out": list(leave_out)}).all()


# --- jobs and their lesson -------------------------------------------------------------------------

_LESSON_OF = Statement("SELECT id, title, created_at, archived_at FROM lessons WHERE job_id = :id")

# Sections done and planned of each listed job (jobs_parent_section_uq); jobs without any are absent.
_PROGRESS = Statement(
    "SELECT parent_id, count(*) FILTER (WHERE status = 'done') AS done, count(*) AS total FROM jobs "
    "WHERE parent_id = ANY(CAST(:ids AS uuid[])) GROUP BY parent_id"
)


def lesson_of(conn: Connection, job_id: uuid.UUID) -> Any:
    """(id, title, created_at, archived_at) of the job's lesson, or None."""
    return conn.execute(_LESSON_OF, {"id": job_id}).first()


def progress(conn: Connection, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[int, int]]:
    """job id -> (sections done, sections planned), for the jobs that planned sections."""
    if not job_ids:
        return {}
    rows = conn.execute(_PROGRESS, {"ids": [str(i) for i in job_ids]})
    return {row.parent_id: (int(row.done), int(row.total)) for row in rows}


# --- users -----------------------------------------------------------------------------------------

_USERS = Statement(
    """
    SELECT u.id, u.tier, u.created_at,
           (SELECT count(*) FROM lessons l WHERE l.user_id = u.id AND l.archived_at IS NULL) AS visible,
           (SELECT count(*) FROM lessons l WHERE l.user_id = u.id AND l.archived_at IS NOT NULL)
               AS archived,
           (SELECT count(*) FROM jobs j WHERE j.user_id = u.id AND j.status IN ('queued', 'running')
               AND j.parent_id IS NULL) AS active
      FROM users u
     WHERE CAST(:user_id AS text) IS NULL OR u.id = CAST(:user_id AS text)
     ORDER BY u.created_at DESC, u.id LIMIT :limit
    """
)


def users(conn: Connection, *, user_id: str | None, limit: int) -> list[Any]:
    """One user (`user_id`) or the newest ones, with lesson counts (lessons_user_idx) and live jobs
    (their own, not their lessons' sections)."""
    return conn.execute(_USERS, {"user_id": user_id, "limit": limit}).all()


def quota_usage(conn: Connection, user_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Per user: today's and active lesson jobs against the tier's quotas, for the Users page, from
    the same usage function create_job's limits use (one statement for the whole page)."""
    usage = {}
    for user_id, counted in accounts.usages(conn, user_ids=user_ids, job_kind=LessonKind.kind).items():
        view = usage_view(counted)
        usage[user_id] = {
            "tier": view["tier"],
            "daily_used": view["daily"]["used"],
            "daily_limit": view["daily"]["limit"],
            "active_used": view["active"]["used"],
            "active_limit": view["active"]["limit"],
        }
    return usage


# --- CSRF ------------------------------------------------------------------------------------------

_SECRET = Statement("SELECT secret FROM dashboard_secret")


def dashboard_secret(conn: Connection) -> str:
    """The HMAC key of the dashboard's CSRF tokens (made by the migration, the same for every instance)."""
    return str(conn.execute(_SECRET).scalar())

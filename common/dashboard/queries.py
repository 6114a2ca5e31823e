"""The dashboard's own SQL: the overview's counts and chart, failure groups, users, the CSRF key.

Everything the overview runs is an index range or a small partial index (migration 0003_dashboard);
bench/dashboard_bench.py times it over 1,000,000 jobs. Job lists and operator actions are not here:
they are common.jobs.ops, the CLI's implementation.
"""

from __future__ import annotations

import uuid
from typing import Any

from common.accounts import users as accounts
from common.accounts.tiers import usage_view
from common.lessons.kind import LessonKind
from common.platform.db import Connection, Statement

_LAST_DAY = Statement(
    "SELECT job_kind, status, count(*) AS n FROM jobs WHERE created_at >= now() - interval '24 hours' "
    "GROUP BY job_kind, status ORDER BY job_kind, status"
)

# One row per minute of the last 60 (the current one last), zeros included.
_PER_MINUTE = Statement(
    """
    WITH minutes AS (
        SELECT generate_series(date_trunc('minute', now()) - interval '59 minutes',
                               date_trunc('minute', now()), interval '1 minute') AS minute
    ), created AS (
        SELECT date_trunc('minute', created_at) AS minute, count(*) AS n FROM jobs
         WHERE created_at >= date_trunc('minute', now()) - interval '59 minutes' GROUP BY 1
    ), finished AS (
        SELECT date_trunc('minute', completed_at) AS minute,
               count(*) FILTER (WHERE status = 'done') AS done,
               count(*) FILTER (WHERE status = 'error') AS failed
          FROM jobs
         WHERE completed_at >= date_trunc('minute', now()) - interval '59 minutes'
           AND status IN ('done', 'error')
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


def per_minute(conn: Connection) -> list[Any]:
    return conn.execute(_PER_MINUTE).all()


# --- failures --------------------------------------------------------------------------------------

FAILURE_WINDOW = "24h"  # "recent" failures: what the Failures page groups and a group retry takes


def failure_groups(conn: Connection) -> list[Any]:
    """(code, n, last_at, message) of `error` jobs finished in the last 24 h, biggest group first."""
    return conn.execute(
        Statement(
            """
            SELECT coalesce(error_json ->> 'code', '') AS code, count(*) AS n, max(completed_at) AS last_at,
                   (array_agg(error_json ->> 'message' ORDER BY completed_at DESC))[1] AS message
              FROM jobs
             WHERE status = 'error' AND completed_at >= now() - interval '24 hours'
             GROUP BY 1 ORDER BY n DESC, code
            """
        )
    ).all()


# --- job detail ------------------------------------------------------------------------------------


def lesson_of(conn: Connection, job_id: uuid.UUID) -> Any:
    """(id, title, created_at, archived_at) of the job's lesson, or None."""
    return conn.execute(
        Statement("SELECT id, title, created_at, archived_at FROM lessons WHERE job_id = :id"), {"id": job_id}
    ).first()


# --- users -----------------------------------------------------------------------------------------


def users(conn: Connection, *, user_id: str | None, limit: int) -> list[Any]:
    """One user (`user_id`) or the newest ones (users_created_idx), with lesson counts
    (lessons_user_visible_idx, lessons_user_archived_idx) and live jobs."""
    return conn.execute(
        Statement(
            """
            SELECT u.id, u.tier, u.created_at,
                   (SELECT count(*) FROM lessons l WHERE l.user_id = u.id AND l.archived_at IS NULL) AS visible,
                   (SELECT count(*) FROM lessons l WHERE l.user_id = u.id AND l.archived_at IS NOT NULL)
                       AS archived,
                   (SELECT count(*) FROM jobs j WHERE j.user_id = u.id AND j.status IN ('queued', 'running'))
                       AS active
              FROM users u
             WHERE CAST(:user_id AS text) IS NULL OR u.id = CAST(:user_id AS text)
             ORDER BY u.created_at DESC, u.id LIMIT :limit
            """
        ),
        {"user_id": user_id, "limit": limit},
    ).all()


def quota_usage(conn: Connection, user_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Per user: today's and active lesson jobs against the tier's quotas, for the Users page, from
    the same usage function create_job's limits use (one statement for the whole page)."""
    usage = {}
    for user_id, counted in accounts.usages(conn, user_ids=user_ids, job_kind=LessonKind.kind).items():
        view = usage_view(counted)
        usage[user_id] = {
            "daily_used": view["daily"]["used"],
            "daily_limit": view["daily"]["limit"],
            "active_used": view["active"]["used"],
            "active_limit": view["active"]["limit"],
        }
    return usage


# --- CSRF ------------------------------------------------------------------------------------------


def dashboard_secret(conn: Connection) -> str:
    """The HMAC key of the dashboard's CSRF tokens (made by the migration, the same for every instance)."""
    return str(conn.execute(Statement("SELECT secret FROM dashboard_secret")).scalar())

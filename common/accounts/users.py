"""The users table, what a user's jobs and model calls count against their tier (the `job_usage`
database function of migration 0009 is the one definition of that count), and operators' grants
(`quota_grants`: a day's quota given back)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from common.platform.db import Connection, Statement


@dataclass(frozen=True)
class Usage:
    """What a user's jobs of one kind, and their model calls, count against their tier now."""

    tier: str | None  # None: no such user yet (users appear with their first job)
    day_start: datetime
    daily_used: int
    active_used: int
    tokens_used: int  # tokens of the user's model calls started this UTC day, less grants


_USAGE = Statement(
    """
    SELECT (SELECT tier FROM users WHERE id = CAST(:user_id AS text)) AS tier,
           day_start, daily_used, active_used, tokens_used
      FROM job_usage(CAST(:user_id AS text), CAST(:job_kind AS text),
                     coalesce(CAST(:now AS timestamptz), now()))
    """,
    prepare=True,
)


def usage(conn: Connection, *, user_id: str, job_kind: str, now: datetime | None = None) -> Usage:
    row = conn.execute(_USAGE, {"user_id": user_id, "job_kind": job_kind, "now": now}).one()
    return Usage(row.tier, row.day_start, row.daily_used, row.active_used, int(row.tokens_used))


_USAGES = Statement(
    """
    SELECT u.id, u.tier, usage.day_start, usage.daily_used, usage.active_used, usage.tokens_used
      FROM users u
     CROSS JOIN LATERAL job_usage(u.id, CAST(:job_kind AS text), now()) AS usage
     WHERE u.id = ANY(CAST(:user_ids AS text[]))
    """
)


def usages(conn: Connection, *, user_ids: list[str], job_kind: str) -> dict[str, Usage]:
    """`usage` of several existing users in one statement (the operators' Users page)."""
    rows = conn.execute(_USAGES, {"user_ids": user_ids, "job_kind": job_kind})
    return {
        row.id: Usage(row.tier, row.day_start, row.daily_used, row.active_used, int(row.tokens_used))
        for row in rows
    }


_SET_TIER = Statement("UPDATE users SET tier = :tier WHERE id = :id")


def set_tier(conn: Connection, *, user_id: str, tier: str) -> bool:
    """False when there is no such user (tiers are set on existing users only)."""
    return conn.execute(_SET_TIER, {"id": user_id, "tier": tier}).rowcount == 1


# The same per-user lock as the limited create's (migration 0002), so a grant and a create of the
# user never interleave: the grant is clamped to what the count shows under that lock.
_LOCK_USER = Statement(
    "SELECT pg_advisory_xact_lock(hashtext('dylen.job_quota'), hashtext(CAST(:user_id AS text)))"
)
# Only what the day counts can be given back (never a negative day): at most its jobs and tokens.
_GRANT = Statement(
    """
    WITH amounts AS (
        SELECT (usage.day_start AT TIME ZONE 'UTC')::date AS day,
               least(CAST(:jobs AS integer), usage.daily_used) AS jobs,
               least(CAST(:tokens AS bigint), usage.tokens_used) AS tokens
          FROM job_usage(CAST(:user_id AS text), CAST(:job_kind AS text), now()) AS usage
         WHERE EXISTS (SELECT 1 FROM users WHERE id = CAST(:user_id AS text))
    ), granted AS (
        INSERT INTO quota_grants AS g (user_id, day, jobs, tokens)
        SELECT CAST(:user_id AS text), day, jobs, tokens FROM amounts
        ON CONFLICT (user_id, day) DO UPDATE
           SET jobs = g.jobs + EXCLUDED.jobs, tokens = g.tokens + EXCLUDED.tokens, updated_at = now()
    )
    SELECT jobs, tokens FROM amounts
    """
)


@dataclass(frozen=True)
class Grant:
    jobs: int
    tokens: int


def grant(conn: Connection, *, user_id: str, job_kind: str, jobs: int, tokens: int) -> Grant | None:
    """Give back up to `jobs` of today's (UTC) jobs and `tokens` of its tokens, never more than the
    day counts; what was given back, None when there is no such user. Run inside a transaction."""
    conn.execute(_LOCK_USER, {"user_id": user_id})
    row = conn.execute(
        _GRANT, {"user_id": user_id, "job_kind": job_kind, "jobs": jobs, "tokens": tokens}
    ).first()
    return Grant(int(row.jobs), int(row.tokens)) if row is not None else None

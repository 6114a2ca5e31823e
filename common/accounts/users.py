"""The users table and what a user's jobs count against their tier (the `job_usage` database
function of migration 0002 is the one definition of that count)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from common.platform.db import Connection, Statement


@dataclass(frozen=True)
class Usage:
    """What a user's jobs of one kind count against their tier now."""

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


def usage(conn: Connection, *, user_id: str, job_kind: str, now: datetime | None = None) -> Usage:
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


def usages(conn: Connection, *, user_ids: list[str], job_kind: str) -> dict[str, Usage]:
    """`usage` of several existing users in one statement (the operators' Users page)."""
    rows = conn.execute(_USAGES, {"user_ids": user_ids, "job_kind": job_kind})
    return {row.id: Usage(row.tier, row.day_start, row.daily_used, row.active_used) for row in rows}


_SET_TIER = Statement("UPDATE users SET tier = :tier WHERE id = :id")


def set_tier(conn: Connection, *, user_id: str, tier: str) -> bool:
    """False when there is no such user (tiers are set on existing users only)."""
    return conn.execute(_SET_TIER, {"id": user_id, "tier": tier}).rowcount == 1

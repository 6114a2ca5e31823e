"""The ledger's read side (get_job's `usage`, `jobs show`, `users show`, the dashboard) and its
retention. A call's `outcome` reads `in_flight` while it runs and `lost` once its lease passed
without a settle (its instance died mid-call)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.models.lanes import WINDOW_MARGIN_SECONDS
from common.models.settings import LaneLimits, model_settings
from common.platform.db import Connection, Statement, connection


@dataclass(frozen=True)
class Usage:
    calls: int
    input_tokens: int
    output_tokens: int
    cost: float | None  # US dollars from DYLEN_MODEL_PRICES; None when a model used has no price

    def view(self) -> dict[str, Any]:
        """What users see (get_job): no cost, no model names."""
        return {"calls": self.calls, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens}

    def text(self) -> str:
        cost = "" if self.cost is None else f", ~${self.cost:.4f}"
        return f"{self.calls} calls, {self.input_tokens} input + {self.output_tokens} output tokens{cost}"


def _usage(rows: Iterable[Any]) -> Usage:
    """Totals of per-model rows (model, calls, input_tokens, output_tokens), priced."""
    prices = model_settings().prices
    calls = input_tokens = output_tokens = 0
    cost: float | None = 0.0
    for row in rows:
        calls += row.calls
        input_tokens += row.input_tokens
        output_tokens += row.output_tokens
        price = prices.get(row.model)
        if price is None:
            if row.input_tokens or row.output_tokens:
                cost = None
        elif cost is not None:
            cost += price.cost(row.input_tokens, row.output_tokens)
    return Usage(calls, input_tokens, output_tokens, cost)


_TOTALS = """
    SELECT model, count(*)::integer AS calls, coalesce(sum(input_tokens), 0)::bigint AS input_tokens,
           coalesce(sum(output_tokens), 0)::bigint AS output_tokens
      FROM model_calls
"""
_JOB_USAGE = Statement(_TOTALS + " WHERE job_id = CAST(:job_id AS uuid) GROUP BY model", prepare=True)
_USER_USAGE = Statement(
    _TOTALS + " WHERE user_id = CAST(:user_id AS text) AND started_at >= CAST(:since AS timestamptz)"
    " GROUP BY model"
)


def job_usage(conn: Connection, job_id: uuid.UUID) -> Usage:
    """Every call made for the job (a lesson's sections included)."""
    return _usage(conn.execute(_JOB_USAGE, {"job_id": job_id}))


def usage_of_job(job_id: uuid.UUID) -> Usage:
    with connection() as conn:
        return job_usage(conn, job_id)


def user_usage(conn: Connection, user_id: str, *, since: datetime) -> Usage:
    return _usage(conn.execute(_USER_USAGE, {"user_id": user_id, "since": since}))


@dataclass(frozen=True)
class CallRecord:
    id: int
    model: str
    purpose: str
    section_index: int | None
    attempt: int | None
    prompt_version: str | None
    started_at: datetime
    latency_ms: int | None
    input_tokens: int | None
    output_tokens: int | None
    outcome: str  # ok | invalid | refused | rate_limited | error | timeout | in_flight | lost
    error_code: str | None

    def view(self) -> dict[str, Any]:
        return {**self.__dict__, "started_at": self.started_at.isoformat()}


_OUTCOME = "coalesce(outcome, CASE WHEN lease_expires_at < now() THEN 'lost' ELSE 'in_flight' END)"
_JOB_CALLS = Statement(
    f"""
    SELECT id, model, purpose, section_index, attempt, prompt_version, started_at, latency_ms,
           input_tokens, output_tokens, {_OUTCOME} AS outcome, error_code
      FROM model_calls WHERE job_id = CAST(:job_id AS uuid)
     ORDER BY started_at, id LIMIT CAST(:limit AS integer)
    """
)


def job_calls(conn: Connection, job_id: uuid.UUID, *, limit: int = 500) -> list[CallRecord]:
    """The job's calls in the order they started (operators: `jobs show`, the dashboard)."""
    return [CallRecord(*row) for row in conn.execute(_JOB_CALLS, {"job_id": job_id, "limit": limit})]


@dataclass(frozen=True)
class _Totals:
    model: str
    calls: int
    input_tokens: int
    output_tokens: int


def usage_of(calls: Iterable[CallRecord]) -> Usage:
    """The usage of some calls (e.g. one section's, of its lesson's calls), priced."""
    totals: dict[str, _Totals] = {}
    for call in calls:
        was = totals.get(call.model, _Totals(call.model, 0, 0, 0))
        totals[call.model] = _Totals(
            call.model,
            was.calls + 1,
            was.input_tokens + (call.input_tokens or 0),
            was.output_tokens + (call.output_tokens or 0),
        )
    return _usage(totals.values())


@dataclass(frozen=True)
class LaneState:
    model: str
    limits: LaneLimits
    calls_in_window: int
    tokens_in_window: int
    in_flight: int
    paused_until: datetime | None


_LANES = Statement(
    """
    SELECT l.model, l.paused_until,
           (SELECT count(*) FROM model_calls c
             WHERE c.model = l.model AND c.started_at > now() - make_interval(secs => CAST(:window AS double precision)))
               AS calls_in_window,
           (SELECT coalesce(sum(coalesce(c.input_tokens + c.output_tokens, c.estimated_tokens)), 0)
              FROM model_calls c
             WHERE c.model = l.model AND c.started_at > now() - make_interval(secs => CAST(:window AS double precision)))
               AS tokens_in_window,
           (SELECT count(*) FROM model_calls c
             WHERE c.model = l.model AND c.ended_at IS NULL AND c.lease_expires_at > now()) AS in_flight
      FROM model_lanes l ORDER BY l.model
    """
)


def lane_states(conn: Connection) -> list[LaneState]:
    """Each lane as the next take would see it (used this window, in flight, paused until)."""
    settings = model_settings()
    rows = conn.execute(_LANES, {"window": settings.window_seconds + WINDOW_MARGIN_SECONDS})
    return [
        LaneState(
            row.model,
            settings.limits.get(row.model, LaneLimits()),
            row.calls_in_window,
            row.tokens_in_window,
            row.in_flight,
            row.paused_until,
        )
        for row in rows
    ]


_DAILY = Statement(
    """
    SELECT date_trunc('day', started_at, 'UTC') AS day, model, count(*)::integer AS calls,
           coalesce(sum(input_tokens), 0)::bigint AS input_tokens,
           coalesce(sum(output_tokens), 0)::bigint AS output_tokens
      FROM model_calls
     WHERE started_at >= date_trunc('day', now(), 'UTC') - make_interval(days => CAST(:days AS integer) - 1)
     GROUP BY 1, 2 ORDER BY 1 DESC, 2
    """
)


def daily_totals(conn: Connection, *, days: int = 7) -> list[tuple[datetime, str, Usage]]:
    """(UTC day, model, usage) for the last `days` days, newest first."""
    return [(row.day, row.model, _usage([row])) for row in conn.execute(_DAILY, {"days": days})]


_TOP_USERS = Statement(
    """
    SELECT user_id, model, count(*)::integer AS calls,
           coalesce(sum(input_tokens), 0)::bigint AS input_tokens,
           coalesce(sum(output_tokens), 0)::bigint AS output_tokens
      FROM model_calls
     WHERE started_at >= CAST(:since AS timestamptz) AND user_id IS NOT NULL
     GROUP BY user_id, model
    """
)


def users_usage(conn: Connection, *, since: datetime, limit: int = 20) -> list[tuple[str, Usage]]:
    """The users who used the most tokens since `since`, with their usage."""
    by_user: dict[str, list[Any]] = {}
    for row in conn.execute(_TOP_USERS, {"since": since}):
        by_user.setdefault(row.user_id, []).append(row)
    usages = [(user, _usage(rows)) for user, rows in by_user.items()]
    usages.sort(key=lambda item: item[1].input_tokens + item[1].output_tokens, reverse=True)
    return usages[:limit]


# --- retention -------------------------------------------------------------------------------------

PRUNE_BATCH = 10_000
_PRUNE = Statement(
    """
    DELETE FROM model_calls
     WHERE id IN (SELECT id FROM model_calls
                   WHERE started_at < now() - make_interval(days => CAST(:days AS integer))
                   LIMIT CAST(:batch AS integer))
    """
)


def prune(*, older_than_days: int | None = None) -> int:
    """Delete call records older than the retention (DYLEN_MODEL_CALL_RETENTION_DAYS), in batches
    of PRUNE_BATCH rows, each its own statement; how many were deleted."""
    days = model_settings().retention_days if older_than_days is None else older_than_days
    deleted = 0
    while True:
        with connection() as conn:
            n = conn.execute(_PRUNE, {"days": days, "batch": PRUNE_BATCH}).rowcount
        deleted += n
        if n < PRUNE_BATCH:
            return deleted

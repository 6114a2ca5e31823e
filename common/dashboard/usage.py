"""The usage view: who uses the service and how much, over the last 24 hours: jobs created per hour
and how many of them are done and failed by now (sections counted under their lesson), and the
users with the most jobs, each with the sections their lessons planned and their tier's quotas."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import flask

from common.dashboard import charts, queries
from common.dashboard.render import chrome, live, render
from common.jobs.kinds import section_kinds
from common.models import ledger
from common.platform.db import connection

TOP_USERS = 20
REGIONS = {"usage-live": "_usage.html"}


def usage_context() -> dict[str, Any]:
    with connection() as conn:
        hours = queries.per_hour(conn, leave_out=list(section_kinds()))
        top = queries.top_users(conn, limit=TOP_USERS)
        quotas = queries.quota_usage(conn, [row.user_id for row in top])
    return {
        "chart": charts.line_chart(
            times=[h.hour for h in hours],
            series=[
                charts.Series(name, [float(getattr(h, name)) for h in hours])
                for name in ("created", "done", "failed")
            ],
            unit="jobs / hour, by creation",
            title="Jobs created per hour, and how they ended",
        ),
        "totals": {name: sum(int(getattr(h, name)) for h in hours) for name in ("created", "done", "failed")},
        "top": top,
        "quotas": quotas,
        "top_limit": TOP_USERS,
    }


def models_page(request: flask.Request, operator: str) -> flask.Response:
    """Each lane's state now; calls, tokens and estimated cost per day and model, and per user today."""
    now = datetime.now(UTC)
    with connection() as conn:
        lanes = ledger.lane_states(conn)
        days = ledger.daily_totals(conn, days=7)
        users = ledger.users_usage(conn, since=now.replace(hour=0, minute=0, second=0, microsecond=0))
    return render("models.html", lanes=lanes, days=days, users=users, now=now, **chrome(operator, "models"))


def usage_page(request: flask.Request, operator: str) -> flask.Response:
    return render("usage.html", **usage_context(), **chrome(operator, "usage", live="usage.json"))


def usage_live(request: flask.Request, operator: str) -> flask.Response:
    return live(REGIONS, {**usage_context(), **chrome(operator, "usage")})

"""How the dashboard answers: its templates (every value escaped), the filters they use, the chrome
every page shares (operator, CSRF token, notice), redirects, and the live regions' JSON.

A live page names the elements the poll replaces (`regions`: element id -> partial template); the
page includes those partials, and its `.json` twin renders the same partials with the same context,
so what a poll brings is exactly what a reload would show.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import flask
import jinja2

from common.dashboard.csrf import csrf_token
from common.jobs import ops
from common.jobs.model import Job
from common.platform.http import json_response

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
LIVE_EVERY_MS = 2000  # how often a live page polls its .json twin
# What a redirect after an action may say: a key, never text from the request.
NOTICES = {
    "retried": "Retried: the job is queued again.",
    "canceled": "Canceled.",
    "tier": "Tier updated.",
}

_env: jinja2.Environment | None = None
_env_lock = threading.Lock()


def _templates() -> jinja2.Environment:
    global _env
    with _env_lock:
        if _env is None:
            env = jinja2.Environment(
                loader=jinja2.FileSystemLoader(HERE / "templates"),
                autoescape=True,  # every value is escaped; nothing is marked safe
                undefined=jinja2.StrictUndefined,
            )
            env.filters["ago"] = ago
            env.filters["stamp"] = stamp
            env.filters["number"] = number
            env.filters["seconds"] = seconds
            env.filters["short"] = lambda value: str(value)[:8]
            env.globals["topic"] = topic
            env.globals["queued_for"] = queued_for
            env.globals["ran_for"] = ran_for
            env.filters["until"] = until
            _env = env
        return _env


def render(template: str, status: int = 200, **context: Any) -> flask.Response:
    html = _templates().get_template(template).render(**context)
    return flask.Response(html, status=status, mimetype="text/html")


def live(regions: Mapping[str, str], context: Mapping[str, Any], **data: Any) -> flask.Response:
    """The .json twin of a live page: each region's HTML, rendered from `context`, and `data`
    (`final`: nothing on the page can change any more, so the poll stops)."""
    env = _templates()
    html = {element: env.get_template(partial).render(**context) for element, partial in regions.items()}
    return json_response({"regions": html, **data})


def chrome(operator: str, active: str, **extra: Any) -> dict[str, Any]:
    """What every page's frame needs; `live` is the .json twin's URL on a live page."""
    notice = flask.request.args.get("notice")
    context = {
        "operator": operator,
        "csrf": csrf_token(operator),
        "active": active,
        "notice": NOTICES.get(notice or ""),
        "live": None,
        "live_every": LIVE_EVERY_MS,
    }
    context.update(extra)
    return context


def redirect(target: str) -> flask.Response:
    # Relative: resolved against the action's URL, which sits next to every page.
    return flask.Response(status=303, headers={"Location": target})


# --- filters and helpers the templates use ---------------------------------------------------------


def number(value: Any) -> str:
    """1,234,567; anything not a number (no limit, "-") as it is."""
    return f"{value:,}" if isinstance(value, int) else str(value if value is not None else "-")


def ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    return ops.format_duration((datetime.now(UTC) - value).total_seconds()) + " ago"


def until(value: datetime | None) -> str:
    """`in 12.0s` for a time ahead, `due` once it has passed."""
    if value is None:
        return "-"
    left = (value - datetime.now(UTC)).total_seconds()
    return "in " + ops.format_duration(left) if left > 0 else "due"


def stamp(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


def seconds(value: float | None) -> str:
    return "-" if value is None else ops.format_duration(float(value))


def topic(job: Job) -> str:
    """What a job is about: a lesson's topic, a section's heading; empty for other kinds."""
    request = job.request_json or {}
    payload = request.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("topic"), str):
        return str(payload["topic"])
    heading = request.get("heading")
    return heading if isinstance(heading, str) else ""


def queued_for(job: Job) -> float | None:
    """Seconds from creation to the first start, or waiting so far for a job not started yet."""
    if job.started_at is not None:
        return (job.started_at - job.created_at).total_seconds()
    if job.final:
        return None  # canceled before it started
    return (datetime.now(UTC) - job.created_at).total_seconds()


def ran_for(job: Job) -> float | None:
    """Seconds from the first start to the end, or running so far."""
    if job.started_at is None:
        return None
    end = job.completed_at or (None if job.final else datetime.now(UTC))
    return (end - job.started_at).total_seconds() if end else None

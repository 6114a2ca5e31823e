"""The operator dashboard: server-rendered pages over the job system, and its POST actions.

functions/dashboard/main.py hands every request to `handle`. Pages read through common.jobs.ops (the
CLI's filters and job views) and common.dashboard.queries; actions are ops.retry_job / retry_jobs /
cancel_job / set_tier, the CLI's implementation. Every link is relative and every path is one segment
(`jobs`, `job?id=`), so the pages work at `/` (gcloud run services proxy) and under `/dashboard/`
(`make run`'s gateway) alike.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import flask
import jinja2

from common.accounts import tiers
from common.accounts.settings import tier_settings
from common.dashboard import queries
from common.dashboard.csrf import check_csrf, csrf_token
from common.jobs import ops, totals
from common.jobs import queries as job_queries
from common.jobs.model import RETRYABLE_STATUSES, Job
from common.models import ledger
from common.platform.cursor import decode_cursor, encode_cursor
from common.platform.db import connection, named_errors
from common.platform.errors import DylenError, MalformedRequest, NotFound
from common.platform.http import Call, problem_response, serve
from common.platform.validation import parse_id

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
REFRESH_SECONDS = 5
# functions-framework answers /favicon.ico itself (404): the pages link assets/favicon.svg instead.
STATIC = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    # No inline script or style anywhere: the CSS and JS are files of this function.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
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
            env.filters["ago"] = _ago
            env.filters["stamp"] = _stamp
            env.filters["number"] = lambda n: f"{int(n):,}"
            _env = env
        return _env


def render(template: str, status: int = 200, **context: Any) -> flask.Response:
    context.setdefault("refresh", None)
    html = _templates().get_template(template).render(**context)
    return flask.Response(html, status=status, mimetype="text/html")


def _ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    return ops.format_duration((datetime.now(UTC) - value).total_seconds()) + " ago"


def _stamp(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


# --- the edge --------------------------------------------------------------------------------------


def secured(response: flask.Response) -> flask.Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


def error_page(request: flask.Request, error: DylenError) -> flask.Response:
    """HTML for a browser, problem+json for anything else; the status and headers are the error's."""
    wanted = request.accept_mimetypes.best_match(["application/problem+json", "text/html"])
    if wanted != "text/html":
        return problem_response(error)
    response = render("error.html", status=error.status, error=error, operator="", active="", notice=None)
    response.headers.update(error.headers)
    return response


def _page(call: Call) -> flask.Response:
    path = call.request.path.strip("/")
    method = call.request.method
    if path.startswith("assets/") and method in ("GET", "HEAD"):
        return _static(path.removeprefix("assets/"))
    routes = GET_ROUTES if method in ("GET", "HEAD") else POST_ROUTES
    view = routes.get(path)
    if view is None:
        raise NotFound(f"No dashboard page {path!r}.")
    assert call.operator is not None
    if method == "POST":
        check_csrf(call.request, call.operator)
    return view(call.request, call.operator)


def handle(request: flask.Request) -> flask.Response:
    return secured(
        serve(
            request, methods=("GET", "HEAD", "POST"), auth="operator", action=_page, render_error=error_page
        )
    )


def _static(name: str) -> flask.Response:
    if name not in STATIC:
        raise NotFound("No such file.")
    return flask.Response((HERE / "assets" / name).read_bytes(), mimetype=STATIC[name].split(";")[0])


def _redirect(target: str) -> flask.Response:
    # Relative: resolved against the action's URL, which sits next to every page.
    return flask.Response(status=303, headers={"Location": target})


def _context(operator: str, active: str, **extra: Any) -> dict[str, Any]:
    notice = flask.request.args.get("notice")
    return {
        "operator": operator,
        "csrf": csrf_token(operator),
        "active": active,
        "notice": NOTICES.get(notice or ""),
        **extra,
    }


# --- pages -----------------------------------------------------------------------------------------


def overview(request: flask.Request, operator: str) -> flask.Response:
    with connection() as conn:
        totals.advance_done_total(conn)
        all_time = totals.all_time_counts(conn)
        last_day = queries.last_day_counts(conn)
        minutes = queries.per_minute(conn)
        oldest = job_queries.oldest_queued(conn)
        finished = job_queries.finished_counts(conn, within_seconds=ops.ERROR_RATE_WINDOW_SECONDS)
    outcomes = int(finished.done) + int(finished.error)
    return render(
        "overview.html",
        refresh=REFRESH_SECONDS,
        all_time=count_table(all_time),
        last_day=count_table(last_day),
        chart=chart(minutes),
        oldest=oldest,
        oldest_age=ops.format_duration(float(oldest.age_seconds)) if oldest else None,
        finished=finished,
        error_rate=(f"{100 * int(finished.error) / outcomes:.1f}%" if outcomes else "-"),
        **_context(operator, "overview"),
    )


def count_table(rows: Sequence[Any]) -> dict[str, Any]:
    """{kinds: [...], cells: {kind: {status: n}}, totals: {status: n}} for a kind x status table."""
    cells: dict[str, dict[str, int]] = {}
    totals = dict.fromkeys(ops.STATUSES, 0)
    for row in rows:
        cells.setdefault(row.job_kind, dict.fromkeys(ops.STATUSES, 0))[row.status] = int(row.n)
        totals[row.status] += int(row.n)
    return {"statuses": ops.STATUSES, "kinds": sorted(cells), "cells": cells, "totals": totals}


CHART_W, CHART_H, CHART_PAD = 600, 160, 24
SERIES = (("created", "#2563eb"), ("done", "#16a34a"), ("failed", "#dc2626"))


def chart(minutes: Sequence[Any]) -> dict[str, Any]:
    """Polylines (SVG coordinates) of created / done / failed per minute, drawn on the server."""
    top = max([1] + [int(getattr(m, name)) for m in minutes for name, _ in SERIES])
    step = (CHART_W - 2 * CHART_PAD) / max(1, len(minutes) - 1)
    lines = []
    for name, colour in SERIES:
        points = " ".join(
            f"{CHART_PAD + i * step:.1f},{CHART_H - CHART_PAD - int(getattr(m, name)) * (CHART_H - 2 * CHART_PAD) / top:.1f}"
            for i, m in enumerate(minutes)
        )
        total = sum(int(getattr(m, name)) for m in minutes)
        lines.append({"name": name, "colour": colour, "points": points, "total": total})
    return {"w": CHART_W, "h": CHART_H, "pad": CHART_PAD, "top": top, "lines": lines}


def jobs_page(request: flask.Request, operator: str) -> flask.Response:
    args = request.args
    search = (args.get("q") or "").strip()
    if search:
        if (job_id := _uuid(search)) is not None:
            return _redirect(f"job?id={job_id}")
        return _redirect("jobs?" + urlencode({"user": search}))
    cursor = args.get("cursor")
    filters = ops.Filters(
        statuses=args.getlist("status") or None,
        kinds=[args["kind"]] if args.get("kind") else None,
        user_id=args.get("user") or None,
        older_than=args.get("older_than") or None,
        before=decode_cursor(cursor) if cursor else None,
    )
    jobs = ops.list_jobs(filters, limit=PAGE_SIZE + 1)
    more = len(jobs) > PAGE_SIZE
    jobs = jobs[:PAGE_SIZE]
    query = [(k, v) for k, v in args.items(multi=True) if k in ("status", "kind", "user", "older_than")]
    next_url = (
        "jobs?" + urlencode([*query, ("cursor", encode_cursor(jobs[-1].created_at, jobs[-1].id))])
        if more
        else None
    )
    return render(
        "jobs.html",
        jobs=jobs,
        next_url=next_url,
        filters=filters,
        statuses=ops.STATUSES,
        **_context(operator, "jobs"),
    )


def _uuid(raw: str) -> uuid.UUID | None:
    try:
        return parse_id(raw, what="job", caller="operator")
    except DylenError:
        return None


def job_page(request: flask.Request, operator: str) -> flask.Response:
    shown = ops.show_job(request.args.get("id") or "")  # sections: a fanned-out lesson's
    job, sections = shown.job, shown.sections
    with connection() as conn:
        lesson = queries.lesson_of(conn, job.id)
        calls = ledger.job_calls(conn, job.parent_id or job.id)
    if job.parent_id is not None:  # a section: its own calls of its lesson's
        calls = [c for c in calls if c.section_index == job.section_index]
    return render(
        "job.html",
        job=job,
        attempts=shown.attempts,
        calls=calls,
        usage=ledger.usage_of(calls),
        detail=ops.job_detail(job),
        timeline=timeline(job),
        lesson=lesson,
        sections=sections,
        retryable=job.status in RETRYABLE_STATUSES and lesson is None,
        cancelable=not job.final,
        **_context(operator, "jobs"),
    )


def timeline(job: Job) -> list[tuple[str, datetime | None, str]]:
    """(event, when, note). Only the latest attempt's start is kept by the job row (started_at);
    earlier attempts show as the attempt count and the last error's attempt number."""
    error_attempt = (job.error_json or {}).get("attempt")
    events: list[tuple[str, datetime | None, str]] = [
        ("created", job.created_at, ""),
        ("dispatched", job.dispatched_at, "latest (re)dispatch"),
        ("attempt started", job.started_at, f"attempt {job.attempts} of {job.max_attempts}"),
    ]
    if job.error_json:
        events.append(("failed", None, f"attempt {error_attempt}: {job.error_json.get('code', '')}"))
    events.append((f"completed ({job.status})" if job.final else "not finished", job.completed_at, ""))
    return events


def failures_page(request: flask.Request, operator: str) -> flask.Response:
    code = request.args.get("code")
    with connection() as conn:
        groups = queries.failure_groups(conn)
    jobs = ops.list_jobs(
        ops.Filters(statuses=["error"], since=queries.FAILURE_WINDOW, error_code=code or None),
        limit=PAGE_SIZE,
    )
    return render("failures.html", groups=groups, jobs=jobs, code=code, **_context(operator, "failures"))


def confirm_group_page(request: flask.Request, operator: str) -> flask.Response:
    code = request.args.get("code") or ""
    candidates = ops.retry_candidates(
        ops.Filters(statuses=["error"], since=queries.FAILURE_WINDOW, error_code=code)
    )
    return render("confirm.html", code=code, jobs=candidates, **_context(operator, "failures"))


def users_page(request: flask.Request, operator: str) -> flask.Response:
    search = (request.args.get("q") or "").strip() or None
    with connection() as conn:
        rows = queries.users(conn, user_id=search, limit=PAGE_SIZE)
        usage = queries.quota_usage(conn, [row.id for row in rows])
    return render(
        "users.html",
        users=rows,
        usage=usage,
        search=search or "",
        tiers=list(tier_settings().history_limits),
        **_context(operator, "users"),
    )


def models_page(request: flask.Request, operator: str) -> flask.Response:
    """Each lane's state now; calls, tokens and estimated cost per day and model, and per user today."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    with connection() as conn:
        lanes = ledger.lane_states(conn)
        days = ledger.daily_totals(conn, days=7)
        users = ledger.users_usage(conn, since=today)
    now = datetime.now(UTC)
    return render("models.html", lanes=lanes, days=days, users=users, now=now, **_context(operator, "models"))


# --- actions ---------------------------------------------------------------------------------------


def _job_form(request: flask.Request) -> str:
    raw = request.form.get("id")
    if not raw:
        raise MalformedRequest("The form has no job id.")
    return raw


def retry(request: flask.Request, operator: str) -> flask.Response:
    outcome = ops.retry_job(_job_form(request))
    return _redirect(f"job?id={outcome.jobs[0].id}&notice=retried")


def cancel(request: flask.Request, operator: str) -> flask.Response:
    job = ops.cancel_job(_job_form(request))
    return _redirect(f"job?id={job.id}&notice=canceled")


def retry_group(request: flask.Request, operator: str) -> flask.Response:
    """Retries exactly the jobs the confirmation page listed (those still error or canceled)."""
    ids = [parse_id(raw, what="job", caller="operator") for raw in request.form.getlist("id")]
    outcome = ops.retry_jobs(ids)
    return render(
        "retried.html", jobs=outcome.jobs, asked=len(ids), outcome=outcome, **_context(operator, "failures")
    )


def set_tier(request: flask.Request, operator: str) -> flask.Response:
    user_id = request.form.get("user") or ""
    with named_errors():
        tiers.set_tier(user_id, request.form.get("tier") or "")
    return _redirect("users?" + urlencode({"q": user_id, "notice": "tier"}))


View = Callable[[flask.Request, str], flask.Response]
GET_ROUTES: dict[str, View] = {
    "": overview,
    "jobs": jobs_page,
    "job": job_page,
    "failures": failures_page,
    "retry-group": confirm_group_page,
    "users": users_page,
    "models": models_page,
}
POST_ROUTES: dict[str, View] = {
    "retry": retry,
    "cancel": cancel,
    "retry-group": retry_group,
    "set-tier": set_tier,
}

"""The dashboard's pages (GET). Each live page is a context builder and its regions: the page renders
the whole template, its `.json` twin (render.live) the regions alone, from the same context.

Sections are rolled up under their lesson wherever a count is about what users asked for (the
overview's totals, tiles and chart, the Failures groups), and listed when an operator filters on
their kind or opens a lesson.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

import flask

from common.accounts.settings import tier_settings
from common.dashboard import charts, queries
from common.dashboard.render import PAGE_SIZE, chrome, live, redirect, render
from common.jobs import ops, totals
from common.jobs import queries as job_queries
from common.jobs.kinds import known_kinds, section_kinds
from common.jobs.model import RETRYABLE_STATUSES, JobStatus
from common.models import ledger
from common.platform.cursor import decode_cursor, encode_cursor
from common.platform.db import connection
from common.platform.errors import DylenError, ValidationFailed
from common.platform.validation import parse_id

# --- overview --------------------------------------------------------------------------------------

OVERVIEW_REGIONS = {"overview-live": "_overview.html"}


def overview_context() -> dict[str, Any]:
    sections = section_kinds()
    leave_out = list(sections)
    with connection() as conn:
        totals.advance_done_total(conn)
        all_time = totals.all_time_counts(conn)
        last_day = queries.last_day_counts(conn)
        minutes = queries.per_minute(conn, leave_out=leave_out)
        oldest = job_queries.oldest_queued(conn)
        finished = job_queries.finished_counts(
            conn, within_seconds=ops.ERROR_RATE_WINDOW_SECONDS, leave_out=leave_out
        )
    outcomes = int(finished.done) + int(finished.error)
    all_time_table = count_table(all_time, sections)
    return {
        "all_time": all_time_table,
        "last_day": count_table(last_day, sections),
        "chart": charts.line_chart(
            times=[m.minute for m in minutes],
            series=[
                charts.Series(name, [float(getattr(m, name)) for m in minutes])
                for name in ("created", "done", "failed")
            ],
            unit="jobs / min",
            title="Jobs per minute, last 60 minutes",
        ),
        "oldest": oldest,
        "oldest_age": ops.format_duration(float(oldest.age_seconds)) if oldest else None,
        "finished": finished,
        "error_rate": (f"{100 * int(finished.error) / outcomes:.1f}%" if outcomes else "-"),
    }


def overview(request: flask.Request, operator: str) -> flask.Response:
    return render("overview.html", **overview_context(), **chrome(operator, "overview", live="overview.json"))


def overview_live(request: flask.Request, operator: str) -> flask.Response:
    return live(OVERVIEW_REGIONS, {**overview_context(), **chrome(operator, "overview")})


def count_table(rows: Sequence[Any], sections: dict[str, str]) -> dict[str, Any]:
    """A kind x status table: section kinds as sub-rows under their parent kind, left out of the
    totals (a lesson counts once)."""
    cells: dict[str, dict[str, int]] = {}
    for row in rows:
        cells.setdefault(row.job_kind, dict.fromkeys(ops.STATUSES, 0))[row.status] = int(row.n)
    order = sorted(cells, key=lambda kind: (sections.get(kind, kind), kind in sections, kind))
    sums = {s: sum(cells[kind][s] for kind in order if kind not in sections) for s in ops.STATUSES}
    table_rows = [
        {"kind": kind, "sub": kind in sections, "parent": sections.get(kind), "cells": cells[kind]}
        for kind in order
    ]
    return {"statuses": ops.STATUSES, "rows": table_rows, "totals": sums}


# --- jobs ------------------------------------------------------------------------------------------

JOBS_REGIONS = {"job-rows": "_job_rows.html"}
LIST_ARGS = ("status", "kind", "user", "older_than")


def jobs_context(request: flask.Request) -> dict[str, Any]:
    args = request.args
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
    with connection() as conn:
        progress = queries.progress(conn, [job.id for job in jobs])
    query = [(k, v) for k, v in args.items(multi=True) if k in LIST_ARGS]
    next_url = (
        "jobs?" + urlencode([*query, ("cursor", encode_cursor(jobs[-1].created_at, jobs[-1].id))])
        if more
        else None
    )
    kinds = known_kinds()
    return {
        "jobs": jobs,
        "progress": progress,
        "selectable": True,
        "next_url": next_url,
        "filters": filters,
        "statuses": ops.STATUSES,
        "kinds": kinds + [k for k in filters.kinds or () if k not in kinds],
        "section_kinds": section_kinds(),
    }


def jobs_page(request: flask.Request, operator: str) -> flask.Response:
    search = (request.args.get("q") or "").strip()
    if search:
        if (job_id := _uuid(search)) is not None:
            return redirect(f"job?id={job_id}")
        ops.checked_text(search, what="search")
        return redirect("jobs?" + urlencode({"user": search}))
    context = jobs_context(request)
    json_url = "jobs.json?" + request.query_string.decode("latin-1")
    return render("jobs.html", **context, **chrome(operator, "jobs", live=json_url))


def jobs_live(request: flask.Request, operator: str) -> flask.Response:
    context = jobs_context(request)
    rows = [
        {"id": str(j.id), "status": j.status, "progress": context["progress"].get(j.id)}
        for j in context["jobs"]
    ]
    return live(JOBS_REGIONS, {**context, **chrome(operator, "jobs")}, jobs=rows)


def _uuid(raw: str) -> uuid.UUID | None:
    try:
        return parse_id(raw, what="job", caller="operator")
    except DylenError:
        return None


# --- one job ---------------------------------------------------------------------------------------

JOB_REGIONS = {"job-head": "_job_head.html", "job-body": "_job_body.html"}


def job_context(request: flask.Request) -> dict[str, Any]:
    shown = ops.show_job(request.args.get("id") or "")  # sections: a fanned-out lesson's
    job, sections = shown.job, shown.sections
    with connection() as conn:
        lesson = queries.lesson_of(conn, job.id)
        calls = ledger.job_calls(conn, job.parent_id or job.id)
    if job.parent_id is not None:  # a section: its own calls of its lesson's
        calls = [c for c in calls if c.section_index == job.section_index]
    attempts: list[Any] = list(shown.attempts)
    if (
        job.status == JobStatus.RUNNING
        and not job.waiting
        and all(a.attempt != job.attempts for a in attempts)
    ):
        # The attempt at work now: on record only once it ends.
        attempts.append(
            job_queries.Attempt(job.attempts, job.attempt_started_at, None, "running", None, None, None, None)
        )
    done = sum(1 for s in sections if s.status == JobStatus.DONE)
    return {
        "job": job,
        "attempts": attempts,
        "calls": calls,
        "usage": ledger.usage_of(calls),
        "sections": sections,
        "progress": (done, len(sections)) if sections else None,
        "detail": ops.job_detail(job),
        "lesson": lesson,
        "retryable": job.status in RETRYABLE_STATUSES and lesson is None and job.parent_id is None,
        "cancelable": not job.final and job.parent_id is None,
        "scheduled": job.status == JobStatus.QUEUED and job.run_after is not None,
        "final": job.final and all(s.final for s in sections),
    }


def job_page(request: flask.Request, operator: str) -> flask.Response:
    context = job_context(request)
    json_url = f"job.json?id={context['job'].id}"
    return render("job.html", **context, **chrome(operator, "jobs", live=json_url))


def job_live(request: flask.Request, operator: str) -> flask.Response:
    context = job_context(request)
    job, progress = context["job"], context["progress"]
    return live(
        JOB_REGIONS,
        {**context, **chrome(operator, "jobs")},
        status=job.status,
        progress={"completed": progress[0], "total": progress[1]} if progress else None,
        final=context["final"],
    )


# --- failures and the confirmation of a bulk action ------------------------------------------------


def failures_page(request: flask.Request, operator: str) -> flask.Response:
    code = request.args.get("code")
    filters = ops.Filters(statuses=["error"], since=queries.FAILURE_WINDOW, error_code=code or None)
    jobs = ops.list_jobs(filters, limit=PAGE_SIZE)  # validates `code` before the groups' query
    with connection() as conn:
        groups = queries.failure_groups(conn, leave_out=list(section_kinds()))
    return render(
        "failures.html", groups=groups, jobs=jobs, progress={}, code=code, **chrome(operator, "failures")
    )


def confirm_group_page(request: flask.Request, operator: str) -> flask.Response:
    code = request.args.get("code") or ""
    candidates = ops.retry_candidates(
        ops.Filters(statuses=["error"], since=queries.FAILURE_WINDOW, error_code=code)
    )
    return render("confirm.html", code=code, jobs=candidates, progress={}, **chrome(operator, "failures"))


BULK_ACTIONS = {"retry": RETRYABLE_STATUSES, "cancel": (JobStatus.QUEUED, JobStatus.RUNNING)}
MAX_BULK = 200  # four pages of the jobs list


def bulk_ids(values: Sequence[str]) -> list[uuid.UUID]:
    ids = list(dict.fromkeys(parse_id(raw, what="job", caller="operator") for raw in values))
    if not ids:
        raise ValidationFailed("Select at least one job.")
    if len(ids) > MAX_BULK:
        raise ValidationFailed(f"Select at most {MAX_BULK} jobs at once.")
    return ids


def bulk_action(raw: str | None) -> str:
    if raw not in BULK_ACTIONS:
        raise ValidationFailed(f"Unknown action {raw!r}: use retry or cancel.")
    return raw


def confirm_bulk_page(request: flask.Request, operator: str) -> flask.Response:
    """The one confirmation of a bulk retry or cancel: which of the selected jobs it takes."""
    action = bulk_action(request.args.get("action"))
    ids = bulk_ids(request.args.getlist("id"))
    with connection() as conn:
        jobs = sorted(job_queries.get_jobs(conn, ids), key=lambda j: ids.index(j.id))
    takes = [j for j in jobs if j.status in BULK_ACTIONS[action] and j.parent_id is None]
    skipped = [j for j in jobs if j not in takes]
    return render(
        "bulk.html",
        action=action,
        jobs=takes,
        skipped=skipped,
        missing=len(ids) - len(jobs),
        progress={},
        **chrome(operator, "jobs"),
    )


# --- users -----------------------------------------------------------------------------------------


def users_page(request: flask.Request, operator: str) -> flask.Response:
    search = ops.checked_text((request.args.get("q") or "").strip() or None, what="user")
    with connection() as conn:
        rows = queries.users(conn, user_id=search, limit=PAGE_SIZE)
        usage = queries.quota_usage(conn, [row.id for row in rows])
    return render(
        "users.html",
        users=rows,
        usage=usage,
        search=search or "",
        tiers=list(tier_settings().history_limits),
        **chrome(operator, "users"),
    )

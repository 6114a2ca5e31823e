"""The dashboard's actions (POST forms, each CSRF-checked by app.py before it runs): the CLI's own
operations from common.jobs.ops and common.accounts.tiers."""

from __future__ import annotations

from urllib.parse import urlencode

import flask

from common.accounts import tiers
from common.dashboard.pages import bulk_action, bulk_ids
from common.dashboard.render import chrome, redirect, render
from common.jobs import ops
from common.platform.db import named_errors
from common.platform.errors import MalformedRequest
from common.platform.validation import parse_id


def _job_form(request: flask.Request) -> str:
    raw = request.form.get("id")
    if not raw:
        raise MalformedRequest("The form has no job id.")
    return raw


def retry(request: flask.Request, operator: str) -> flask.Response:
    outcome = ops.retry_job(_job_form(request))
    return redirect(f"job?id={outcome.jobs[0].id}&notice=retried")


def cancel(request: flask.Request, operator: str) -> flask.Response:
    job = ops.cancel_job(_job_form(request))
    return redirect(f"job?id={job.id}&notice=canceled")


def retry_group(request: flask.Request, operator: str) -> flask.Response:
    """Retries exactly the jobs the confirmation page listed (those still error or canceled)."""
    ids = [parse_id(raw, what="job", caller="operator") for raw in request.form.getlist("id")]
    outcome = ops.retry_jobs(ids)
    return render(
        "retried.html",
        jobs=outcome.jobs,
        asked=len(ids),
        outcome=outcome,
        progress={},
        back="failures",
        **chrome(operator, "failures"),
    )


def bulk(request: flask.Request, operator: str) -> flask.Response:
    """The jobs the bulk confirmation listed, retried or canceled; those that changed meanwhile are
    skipped and counted."""
    action = bulk_action(request.form.get("action"))
    ids = bulk_ids(request.form.getlist("id"))
    if action == "retry":
        outcome = ops.retry_jobs(ids)
        return render(
            "retried.html",
            jobs=outcome.jobs,
            asked=len(ids),
            outcome=outcome,
            progress={},
            back="jobs",
            **chrome(operator, "jobs"),
        )
    canceled = ops.cancel_jobs(ids)
    return render(
        "canceled.html",
        jobs=canceled.jobs,
        asked=len(ids),
        refused=canceled.refused,
        progress={},
        **chrome(operator, "jobs"),
    )


def set_tier(request: flask.Request, operator: str) -> flask.Response:
    user_id = ops.checked_text(request.form.get("user") or "", what="user") or ""
    with named_errors():
        tiers.set_tier(user_id, request.form.get("tier") or "")
    return redirect("users?" + urlencode({"q": user_id, "notice": "tier"}))

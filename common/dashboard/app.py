"""The operator dashboard's edge: functions/dashboard/main.py hands every request to `handle`.

Pages (pages.py, queue.py, usage.py) read through common.jobs.ops (the CLI's filters and job views) and
common.dashboard.queries; actions (actions.py) are the CLI's operations. Every link is relative and
every path is one segment (`jobs`, `job?id=`, `job.json?id=`), so the pages work at `/` (gcloud run
services proxy) and under `/dashboard/` (`make run`'s gateway) alike.

The files under assets/ are served to anyone who reaches the function: they hold nothing of the
operators', and the 401 / 403 pages need them to be readable.
"""

from __future__ import annotations

from collections.abc import Callable

import flask

from common.dashboard import actions, pages, queue, usage
from common.dashboard.csrf import check_csrf
from common.dashboard.render import HERE, render
from common.platform.errors import DylenError, NotFound
from common.platform.http import Call, problem_response, serve

# functions-framework answers /favicon.ico itself (404): the pages link assets/favicon.svg instead.
STATIC = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    # No inline script or style anywhere: the CSS and JS are files of this function; the live
    # updates fetch JSON from this function only (connect-src).
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def secured(response: flask.Response) -> flask.Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


def error_page(request: flask.Request, error: DylenError) -> flask.Response:
    """HTML for a browser, problem+json for anything else; the status and headers are the error's."""
    wanted = request.accept_mimetypes.best_match(["application/problem+json", "text/html"])
    if wanted != "text/html":
        return problem_response(error)
    context = {"operator": "", "csrf": "", "active": "", "notice": None, "live": None, "live_every": 0}
    response = render("error.html", status=error.status, error=error, **context)
    response.headers.update(error.headers)
    return response


def _page(call: Call) -> flask.Response:
    path = call.request.path.strip("/")
    method = call.request.method
    routes = GET_ROUTES if method in ("GET", "HEAD") else POST_ROUTES
    view = routes.get(path)
    if view is None:
        raise NotFound(f"No dashboard page {path!r}.")
    assert call.operator is not None
    if method == "POST":
        check_csrf(call.request, call.operator)
    return view(call.request, call.operator)


def _asset(call: Call) -> flask.Response:
    name = call.request.path.strip("/").removeprefix("assets/")
    if name not in STATIC:
        raise NotFound("No such file.")
    return flask.Response((HERE / "assets" / name).read_bytes(), mimetype=STATIC[name].split(";")[0])


def handle(request: flask.Request) -> flask.Response:
    if request.path.strip("/").startswith("assets/"):
        return secured(serve(request, methods=("GET", "HEAD"), auth=None, action=_asset))
    return secured(
        serve(
            request, methods=("GET", "HEAD", "POST"), auth="operator", action=_page, render_error=error_page
        )
    )


View = Callable[[flask.Request, str], flask.Response]
GET_ROUTES: dict[str, View] = {
    "": pages.overview,
    "overview.json": pages.overview_live,
    "queue": queue.queue_page,
    "models": usage.models_page,
    "queue.json": queue.queue_live,
    "jobs": pages.jobs_page,
    "jobs.json": pages.jobs_live,
    "job": pages.job_page,
    "job.json": pages.job_live,
    "usage": usage.usage_page,
    "usage.json": usage.usage_live,
    "failures": pages.failures_page,
    "retry-group": pages.confirm_group_page,
    "bulk": pages.confirm_bulk_page,
    "users": pages.users_page,
}
POST_ROUTES: dict[str, View] = {
    "retry": actions.retry,
    "cancel": actions.cancel,
    "retry-group": actions.retry_group,
    "bulk": actions.bulk,
    "set-tier": actions.set_tier,
}

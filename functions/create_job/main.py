"""create_job: POST / {job_kind, idempotency_key, payload} -> 202 (new) or 200 (same request again)."""

import flask
import functions_framework

from common.jobs import kinds, service
from common.platform.http import Call, cold_start, json_response, serve

cold_start(kinds.load)  # the kinds' products and their settings load, and are checked, now


def _create(call: Call) -> flask.Response:
    call.require_root_path()
    outcome = service.create_job(call.uid, call.json())
    location = f"{call.settings.base_url}/get_job/{outcome.job.id}"
    return json_response(
        service.job_view(outcome.job),
        202 if outcome.created else 200,
        {"Location": location},
    )


@functions_framework.http
def create_job(request: flask.Request) -> flask.Response:
    return serve(request, methods=("POST",), auth="user", action=_create, function="create_job")

"""cancel_job: POST /<job_id> -> the caller's queued or running job, now canceled; 404 / 409 otherwise."""

import flask
import functions_framework

from common.jobs import service
from common.platform.http import Call, cold_start, json_response, serve

cold_start()


def _cancel(call: Call) -> flask.Response:
    return json_response(service.job_view(service.cancel_job(call.uid, call.path_id())))


@functions_framework.http
def cancel_job(request: flask.Request) -> flask.Response:
    return serve(
        request, methods=("POST",), auth="user", log_request=True, action=_cancel, function="cancel_job"
    )

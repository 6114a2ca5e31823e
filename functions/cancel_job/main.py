"""cancel_job: POST /<job_id> -> the caller's queued or running job, now canceled; 404 / 409 otherwise."""

import flask
import functions_framework

from common import jobs
from common.http import Call, cold_start, json_response, serve

cold_start()


def _cancel(call: Call) -> flask.Response:
    return json_response(jobs.job_view(jobs.cancel_job(call.uid, call.path_id())))


@functions_framework.http
def cancel_job(request: flask.Request) -> flask.Response:
    return serve(request, methods=("POST",), auth="user", action=_cancel)

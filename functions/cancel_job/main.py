"""cancel_job: POST /<job_id> -> the caller's queued or running job, now canceled; 404 / 409 otherwise."""

import flask
import functions_framework

from common import jobs
from common.config import get_settings
from common.http import Call, install_problem_handlers, json_response, serve

get_settings()  # a bad configuration fails the cold start, not the first request
install_problem_handlers()


def _cancel(call: Call) -> flask.Response:
    return json_response(jobs.job_view(jobs.cancel_job(call.uid, call.path_id())))


@functions_framework.http
def cancel_job(request: flask.Request) -> flask.Response:
    return serve(request, methods=("POST",), auth="user", action=_cancel)

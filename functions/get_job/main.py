"""get_job: GET /<job_id> -> the caller's job, or 404."""

import flask
import functions_framework

from common import jobs
from common.config import get_settings
from common.http import Call, install_problem_handlers, json_response, serve

get_settings()  # a bad configuration fails the cold start, not the first request
install_problem_handlers()


def _get(call: Call) -> flask.Response:
    return json_response(jobs.job_view(jobs.get_job(call.uid, call.path_id())))


@functions_framework.http
def get_job(request: flask.Request) -> flask.Response:
    return serve(request, methods=("GET",), auth="user", action=_get)

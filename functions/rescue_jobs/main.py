"""rescue_jobs: POST / from Cloud Scheduler -> re-dispatches stuck jobs; 200 {"redispatched", "failed"}."""

import flask
import functions_framework

from common.jobs import rescue
from common.platform.http import Call, cold_start, json_response, serve

cold_start()


def _rescue(call: Call) -> flask.Response:
    call.require_root_path()
    return json_response(rescue.rescue_jobs().counts())


@functions_framework.http
def rescue_jobs(request: flask.Request) -> flask.Response:
    return serve(request, methods=("POST",), auth="task", action=_rescue, function="rescue_jobs")

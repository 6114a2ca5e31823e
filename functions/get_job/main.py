"""get_job: GET /<job_id> -> the caller's job (with its progress and model usage), or 404."""

import flask
import functions_framework

from common.jobs import service
from common.models import ledger
from common.platform.http import Call, cold_start, json_response, serve

cold_start()


def _get(call: Call) -> flask.Response:
    job, progress = service.get_job(call.uid, call.path_id())
    return json_response({**service.job_view(job, progress), "usage": ledger.usage_of_job(job.id).view()})


@functions_framework.http
def get_job(request: flask.Request) -> flask.Response:
    return serve(request, methods=("GET",), auth="user", log_request=True, action=_get, function="get_job")

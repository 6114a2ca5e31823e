"""rescue_jobs: POST / from Cloud Scheduler -> re-dispatches stuck jobs; 200 {"redispatched", "failed"}."""

import flask
import functions_framework

from common.jobs import rescue
from common.platform.config import Settings
from common.platform.http import Call, cold_start, json_response, serve

cold_start()


def _audience(settings: Settings) -> str:
    # Cloud Scheduler's OIDC token names this function's own URL, not process_job's.
    return settings.tasks_oidc_audience or f"{settings.base_url}/rescue_jobs"


def _rescue(call: Call) -> flask.Response:
    call.require_root_path()
    return json_response(rescue.rescue_jobs().counts())


@functions_framework.http
def rescue_jobs(request: flask.Request) -> flask.Response:
    return serve(request, methods=("POST",), auth="task", action=_rescue, task_audience=_audience)

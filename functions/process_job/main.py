"""process_job: POST / {"job_id"} from Cloud Tasks (or the local dispatcher); runs the job inline."""

import flask
import functions_framework

from common.jobs import kinds, processor
from common.platform import telemetry
from common.platform.http import Call, cold_start, json_response, serve

cold_start(kinds.load)  # the kinds' products and their settings load, and are checked, now


def _process(call: Call) -> flask.Response:
    call.require_root_path()
    job_id = processor.parse_task_body(call.json())
    answer = processor.process_job(job_id, task_name=call.request.headers.get("X-CloudTasks-TaskName"))
    telemetry.annotate({"dylen.outcome": answer.body.get("outcome") or answer.body.get("status")})
    return json_response(answer.body, answer.status, answer.headers)


@functions_framework.http
def process_job(request: flask.Request) -> flask.Response:
    return serve(request, methods=("POST",), auth="task", action=_process, function="process_job")

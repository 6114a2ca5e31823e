"""archive_lessons: POST / from Cloud Scheduler (daily, 01:00 UTC) -> today's archive job.

202 when it creates the job, 200 with the same job when called again the same UTC day.
"""

import flask
import functions_framework

from common.jobs.service import job_view
from common.lessons.archive.kind import enqueue_daily_archive
from common.platform.http import Call, cold_start, json_response, serve

cold_start()


def _trigger(call: Call) -> flask.Response:
    call.require_root_path()
    outcome = enqueue_daily_archive()
    return json_response(job_view(outcome.job), 202 if outcome.created else 200)


@functions_framework.http
def archive_lessons(request: flask.Request) -> flask.Response:
    return serve(request, methods=("POST",), auth="task", action=_trigger, function="archive_lessons")

"""get_lesson: GET /<lesson_id> -> the caller's lesson; 404 if not theirs, 410 once archived."""

import flask
import functions_framework

from common.lessons import service
from common.platform.http import Call, cold_start, json_response, serve

cold_start()


def _get(call: Call) -> flask.Response:
    return json_response(service.get_lesson(call.uid, call.path_id()))


@functions_framework.http
def get_lesson(request: flask.Request) -> flask.Response:
    return serve(request, methods=("GET",), auth="user", log_request=True, action=_get, function="get_lesson")

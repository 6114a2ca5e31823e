"""get_lesson: GET /<lesson_id> -> the caller's lesson; 404 if not theirs, 410 once archived."""

import flask
import functions_framework

from common import lessons
from common.config import get_settings
from common.http import Call, install_problem_handlers, json_response, serve

get_settings()  # a bad configuration fails the cold start, not the first request
install_problem_handlers()


def _get(call: Call) -> flask.Response:
    return json_response(lessons.get_lesson(call.uid, call.path_id()))


@functions_framework.http
def get_lesson(request: flask.Request) -> flask.Response:
    return serve(request, methods=("GET",), auth="user", action=_get)

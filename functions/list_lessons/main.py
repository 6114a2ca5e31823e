"""list_lessons: GET /?limit=&cursor= -> the caller's non-archived lessons, newest first."""

import flask
import functions_framework

from common import lessons
from common.config import get_settings
from common.http import Call, install_problem_handlers, json_response, serve

get_settings()  # a bad configuration fails the cold start, not the first request
install_problem_handlers()


def _list(call: Call) -> flask.Response:
    call.require_root_path()
    args = call.request.args
    page = lessons.list_lessons(
        call.uid, limit=lessons.parse_limit(args.get("limit")), cursor=args.get("cursor") or None
    )
    return json_response(page)


@functions_framework.http
def list_lessons(request: flask.Request) -> flask.Response:
    return serve(request, methods=("GET",), auth="user", action=_list)

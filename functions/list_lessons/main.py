"""list_lessons: GET /?limit=&cursor= -> the caller's non-archived lessons, newest first."""

import flask
import functions_framework

from common.lessons import service
from common.platform.http import Call, cold_start, json_response, serve

cold_start()


def _list(call: Call) -> flask.Response:
    call.require_root_path()
    args = call.request.args
    page = service.list_lessons(
        call.uid, limit=service.parse_limit(args.get("limit")), cursor=args.get("cursor") or None
    )
    return json_response(page)


@functions_framework.http
def list_lessons(request: flask.Request) -> flask.Response:
    return serve(
        request, methods=("GET",), auth="user", log_request=True, action=_list, function="list_lessons"
    )

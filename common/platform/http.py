"""The HTTP edge shared by every function: method check, auth, JSON parsing, error mapping.

Entry points stay thin: `serve(request, methods=..., auth=..., action=...)`. Every DylenError
becomes problem+json with its status; anything else is logged with its traceback and answered as a
plain 500 problem, never a stack trace.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import flask
from werkzeug.exceptions import HTTPException

from common.platform import telemetry
from common.platform.auth import authenticate_operator, authenticate_task, authenticate_user
from common.platform.config import Settings, get_settings
from common.platform.db import QueryError
from common.platform.env import load_sections
from common.platform.errors import (
    ConfigError,
    DatabaseUnavailable,
    DylenError,
    MalformedRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from common.platform.log import RateLimit, logger, reset_trace, set_trace
from common.platform.validation import check_json_text, escape_text

MAX_BODY_BYTES = 64 * 1024
PROBLEM_TYPE = "application/problem+json"


@dataclass
class Call:
    request: flask.Request
    settings: Settings
    user_id: str | None = None
    task_caller: str | None = None
    operator: str | None = None  # the dashboard's caller (auth="operator"), an e-mail

    @property
    def uid(self) -> str:
        assert self.user_id is not None, "endpoint declared auth='user'"
        return self.user_id

    def json(self) -> Any:
        return read_json(self.request)

    def path_id(self) -> str:
        """The single path segment (`/<id>`), or 404."""
        segment = self.request.path.strip("/")
        if not segment or "/" in segment:
            raise NotFound("Expected a path of the form /<id>.")
        return segment

    def require_root_path(self) -> None:
        if self.request.path.strip("/"):
            raise NotFound("This function is served at its root path.")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Built once: json.loads / json.dumps with arguments build a new decoder / encoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def read_json(request: flask.Request) -> Any:
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"The body must be at most {MAX_BODY_BYTES} bytes.")
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType("Send the body as application/json.")
    raw = request.stream.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"The body must be at most {MAX_BODY_BYTES} bytes.")
    try:
        body = _DECODER.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise MalformedRequest("The body is not valid UTF-8.") from None
    except (ValueError, RecursionError) as error:
        raise MalformedRequest(f"The body is not valid JSON: {error}") from None
    check_json_text(body)
    return body


class _Response(flask.Response):
    """Werkzeug re-encodes a Location header as an IRI on every response (urlsplit, IDNA for the
    host): ~10% of create_job's Python work. Ours are built from DYLEN_BASE_URL, which config
    accepts only as ASCII, plus an id, so they go out as they are."""

    def get_wsgi_headers(self, environ: Any) -> Any:
        location = self.headers.get("Location")
        if location is None or not location.isascii():
            return super().get_wsgi_headers(environ)
        del self.headers["Location"]
        try:
            headers = super().get_wsgi_headers(environ)
        finally:
            self.headers["Location"] = location
        headers["Location"] = location
        return headers


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> flask.Response:
    return _Response(
        _ENCODER.encode(body),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return escape_text(value)
    if isinstance(value, dict):
        return {escape_text(str(k)): _escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    return value


def problem_body(error: DylenError) -> bytes:
    """The problem as UTF-8 JSON. A detail may echo request text (a field name, a token's claim)
    that UTF-8 cannot encode; that is escaped rather than failing the error answer itself."""
    problem = error.to_problem()
    try:
        return json.dumps(problem, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(_escaped(problem), ensure_ascii=False).encode("utf-8")


def problem_response(error: DylenError) -> flask.Response:
    return flask.Response(
        problem_body(error),
        status=error.status,
        mimetype=PROBLEM_TYPE,
        headers=error.headers,
    )


class BodyLimit:
    """WSGI middleware: no request body beyond `limit` bytes is ever read, by anyone.

    Our own check in read_json is not enough: functions-framework reads the whole body in its
    after_request hook (`read_request` -> `request.get_data()`) after we answered, so a 1 GB body
    would be buffered in memory. Here an over-limit Content-Length is refused before reading, and a
    chunked body is read up to the limit + 1 byte: over it, 413; else the app gets those bytes.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit
        self._answer = problem_body(PayloadTooLarge(f"The body must be at most {limit} bytes."))

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = environ.get("CONTENT_LENGTH") or ""
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            data = environ["wsgi.input"].read(self.limit + 1)
            if len(data) > self.limit:
                return self._too_large(start_response)
            environ["wsgi.input"] = io.BytesIO(data)
            environ["CONTENT_LENGTH"] = str(len(data))
        elif length.isdigit() and int(length) > self.limit:
            return self._too_large(start_response)
        return self.app(environ, start_response)

    def _too_large(self, start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response(
            "413 Payload Too Large",
            [("Content-Type", PROBLEM_TYPE), ("Content-Length", str(len(self._answer)))],
        )
        return [self._answer]


def install_body_limit() -> None:
    """Wrap the functions-framework app in BodyLimit (at import of main.py, in its app context)."""
    if not flask.has_app_context():
        return
    app = flask.current_app
    if not isinstance(app.wsgi_app, BodyLimit):
        app.wsgi_app = BodyLimit(app.wsgi_app, MAX_BODY_BYTES)  # type: ignore[method-assign]


def install_problem_handlers() -> None:
    """Requests functions-framework answers before our entry point runs (a path its router cannot
    match, such as one with a newline; /robots.txt) get problem+json too, not Flask's HTML page.
    Call at import of a function's main.py, where functions-framework provides the app context."""
    if not flask.has_app_context():
        return

    def _problem(error: HTTPException) -> flask.Response:
        status = error.code or 500
        problem = DylenError(error.description or error.name)
        problem.status, problem.title = status, error.name
        problem.type_slug = "not-found" if status == 404 else "http-" + str(status)
        return problem_response(problem)

    flask.current_app.register_error_handler(HTTPException, _problem)


def cold_start(*preload: Callable[[], object]) -> None:
    """Call once at import of every function's main.py, with what the function loads on purpose now
    (the job kinds, whose products declare settings of their own).

    - A bad configuration (or none for the database) fails the cold start with one line naming the
      variable and exit status 1, not the first request: the platform's settings and every settings
      section declared by the packages imported so far.
    - Requests the router answers itself get problem+json (install_problem_handlers).
    - No request body beyond MAX_BODY_BYTES is read by anything (install_body_limit).
    - Dev auth logs a warning: every request is trusted as whoever its headers name.
    - What the imports built (~58k objects) moves out of the cyclic GC's sight (gc.freeze). Otherwise
      a full collection walks all of it holding the GIL: a ~60 ms pause for every request in flight
      (bench/gc_pause.py).
    """
    try:
        for load in preload:
            load()
        load_sections()
        settings = get_settings()
        if not settings.database_url and not settings.cloud_sql_instance:
            raise ConfigError(
                "DYLEN_DATABASE_URL (or DYLEN_CLOUD_SQL_INSTANCE) is required: every function reads "
                "or writes PostgreSQL (`make run` starts an embedded one for you)"
            )
    except ConfigError as error:
        # One line that names the variable, not a traceback, and the instance refuses to start.
        print(f"dylen: configuration error: {error.detail}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if settings.auth_mode == "dev":
        # Anyone who reaches the port is any user, and the operator: say so wherever it serves.
        logger.warning(
            "Serving with dev auth: X-Dylen-User (and X-Dylen-Operator) are trusted without a token; "
            "bind loopback only (--host 127.0.0.1)"
        )
    telemetry.start()
    install_problem_handlers()
    install_body_limit()
    gc.freeze()


AuthKind = Literal["user", "task", "operator", None]
ErrorRenderer = Callable[[flask.Request, DylenError], flask.Response]


# SQLSTATEs that mean the database is not (yet) set up for us: an operator must act, and every
# request fails alike, so it is a 503 with the cause in the log, not an "internal error".
_SETUP_SQLSTATES = {
    "3D000": "the database does not exist",
    "28P01": "the password was refused",
    "28000": "the role may not log in",
    "42P01": "a table is missing: run `python -m common.cli migrate` against this database",
    "42501": "the role lacks a privilege on the schema",
}
_refusals = RateLimit(10.0)


def serve(
    request: flask.Request,
    *,
    methods: tuple[str, ...],
    auth: AuthKind,
    action: Callable[[Call], flask.Response],
    function: str | None = None,
    log_request: bool = False,
    render_error: ErrorRenderer | None = None,
) -> flask.Response:
    """`function` (the function's name) is required for auth="task": it decides the OIDC audience
    (Settings.task_audience), and it names the function in logs and traces. `log_request` writes one
    request line (method, path, status, latency, user, trace) for functions that log nothing else.
    `render_error` answers errors instead of problem+json (the dashboard's HTML pages); the status
    and headers stay the error's."""
    answer = problem_response if render_error is None else (lambda error: render_error(request, error))
    token = set_trace(request.headers.get("X-Cloud-Trace-Context"))
    scope = telemetry.server_span(function, request)  # the request's span, in the caller's trace
    span = scope.__enter__()  # left in `finally`: nothing but BaseException escapes the handlers
    started = time.perf_counter()
    call: Call | None = None
    response: flask.Response | None = None
    try:
        if request.method not in methods:
            raise MethodNotAllowed(list(methods))
        settings = get_settings()
        call = Call(request=request, settings=settings)
        if auth == "user":
            call.user_id = authenticate_user(request.headers, settings)
        elif auth == "task":
            assert function is not None, "auth='task' needs the function's name"
            audience = settings.task_audience(function)
            try:
                call.task_caller = authenticate_task(request.headers, settings, audience=audience)
            except DylenError as refused:
                _log_refused_task(function, refused)
                raise
        elif auth == "operator":
            call.operator = authenticate_operator(request.headers, settings)
        response = action(call)
    except DylenError as error:
        if error.status >= 500:
            logger.error(
                error.log_detail or error.detail, extra={"problem": error.type_slug, "path": request.path}
            )
        response = answer(error)
    except QueryError as error:
        response = answer(_database_problem(error, request.path))
    except Exception:
        logger.exception("Unhandled error", extra={"path": request.path, "method": request.method})
        response = answer(DylenError("An unexpected error occurred; it has been logged."))
    finally:
        if log_request and response is not None:
            _log_request(request, response, started, call)
        if response is not None:
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_attribute("error.type", str(response.status_code))
        scope.__exit__(None, None, None)
        reset_trace(token)
    return response


def _log_refused_task(function: str, refused: DylenError) -> None:
    # Cloud Tasks and the emulator retry a refused task for a long time: say why, not every time.
    # Keyed by function and status only: a detail can echo the caller's token, and per-detail keys
    # would let a caller grow the table without bound.
    held = _refusals.allow(f"{function}:{refused.status}")
    if held is not None:
        logger.warning(
            "Task request refused",
            extra={
                "function": function,
                "status": refused.status,
                "reason": refused.detail,
                "held_back": held,
            },
        )


def _database_problem(error: QueryError, path: str) -> DylenError:
    cause = _SETUP_SQLSTATES.get(error.sqlstate)
    if cause is None:
        logger.error("Unhandled database error", exc_info=error, extra={"path": path})
        return DylenError("An unexpected error occurred; it has been logged.")
    where = f" ({error.where})" if error.where else ""
    logger.error(
        f"The database is not set up for this function{where}: {cause}",
        extra={"sqlstate": error.sqlstate, "reason": str(error.orig)},
    )
    return DatabaseUnavailable("The database is not set up for this service yet; retry later.")


def _log_request(request: flask.Request, response: flask.Response, started: float, call: Call | None) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    logger.info(
        "Request served",
        extra={
            # Cloud Logging reads this structure as the entry's HTTP request.
            "httpRequest": {
                "requestMethod": request.method,
                "requestUrl": request.path,
                "status": response.status_code,
                "latency": f"{time.perf_counter() - started:.6f}s",
                "userAgent": request.headers.get("User-Agent", ""),
            },
            "user_id": call.user_id if call is not None else None,
        },
    )

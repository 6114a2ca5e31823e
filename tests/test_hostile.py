"""Hostile input: property-based payload validation, and malformed / oversized / strange requests
against the real processes. Nothing is a 5xx, nothing crashes a process, and whatever is accepted
is stored verbatim (SQL-looking text, any Unicode)."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import string
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.jobs.service import parse_create_request
from common.lessons.generation import DEPTHS
from common.lessons.kind import validate_lesson_payload
from common.platform.errors import ValidationFailed
from tests.support import TASK_SECRET, USER_FUNCTIONS, FunctionServer, Stack, count_user_jobs, lesson_body

PROBLEM = "application/problem+json"
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- Hypothesis: validation never fails with anything but ValidationFailed -----------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(["job_kind", "idempotency_key", "payload", "topic", "depth", "language", "details"])
near_valid = st.fixed_dictionaries(
    {},
    optional={
        "job_kind": st.sampled_from(["lesson", "Lesson", "", "other"]) | json_values,
        "idempotency_key": st.text(max_size=210) | json_values,
        "payload": st.fixed_dictionaries(
            {},
            optional={
                "topic": st.text(max_size=210) | json_values,
                "details": st.text(max_size=310) | json_values,
                "depth": st.sampled_from([*DEPTHS, "deep", ""]) | json_values,
                "language": st.text(max_size=40) | json_values,
            },
        )
        | json_values,
    },
)


def _check_errors(error: ValidationFailed) -> None:
    assert error.status == 422
    assert error.errors, "a 422 always says which field"
    for entry in error.errors:
        assert isinstance(entry["field"], str) and isinstance(entry["message"], str)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=json_values | near_valid)
def test_parse_create_request_accepts_or_names_the_bad_fields(body: Any) -> None:
    try:
        kind, key, payload = parse_create_request(body)
    except ValidationFailed as error:
        _check_errors(error)
        return
    assert kind == "lesson"
    assert isinstance(key, str) and 1 <= len(key) <= 200
    assert set(payload) == {"topic", "details", "depth", "language"}
    assert validate_lesson_payload(payload) == payload  # normalised form is a fixed point


visible = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=200
)


@FAST
@given(
    topic=visible.filter(lambda t: t.strip()),
    depth=st.sampled_from(DEPTHS),
    language=st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=35),
    details=st.none()
    | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=300),
)
def test_every_valid_payload_is_accepted_and_normalised(
    topic: str, depth: str, language: str, details: str | None
) -> None:
    payload = validate_lesson_payload(
        {"topic": topic, "depth": depth, "language": language, "details": details}
    )
    assert payload["topic"] == topic.strip()
    assert payload["depth"] == depth and payload["language"] == language
    assert payload["details"] == ((details or "").strip() or None)


@FAST
@given(topic=st.text(max_size=20).map(lambda t: t + "\x00"), extra=st.text(min_size=1, max_size=10))
def test_nul_and_unknown_fields_are_always_rejected(topic: str, extra: str) -> None:
    with pytest.raises(ValidationFailed) as nul:
        validate_lesson_payload({"topic": topic})
    _check_errors(nul.value)
    key = "x-" + extra  # never one of the known fields
    with pytest.raises(ValidationFailed) as unknown:
        validate_lesson_payload({"topic": "ok", key: 1})
    assert any(entry["field"] == "payload." + key for entry in unknown.value.errors or [])


# --- stored verbatim ----------------------------------------------------------------------------------

VERBATIM = [
    "'; DROP TABLE jobs; --",
    "Robert'); DELETE FROM lessons WHERE ('1'='1",
    "1 OR 1=1 /* */ UNION SELECT * FROM users",
    "$$ $body$ \\x00 E'\\\\' %s %(x)s :param ?",
    "Фотосинтез и 光合作用 — ﷽",
    "emoji 👩🏽‍🔬🧬 and ZWJ sequences",
    "right-to-left \u202e txet and combining e\u0301",
    "tab\tand\nnewline inside",
    '{"json": "inside", "array": [1, 2]}',
]


@pytest.mark.parametrize("topic", VERBATIM)
def test_strange_text_round_trips_verbatim(stack: Stack, user: str, topic: str) -> None:
    key = f"{topic[:40]}-{uuid.uuid4().hex[:6]}"
    created = stack.create(user, lesson_body(topic, key=key, details=topic[:300]))
    assert created.status_code == 202, created.text
    done = stack.wait_for(user, created.json()["job_id"])
    assert done["status"] == "done"
    lesson = stack.get_lesson(user, done["result"]["lesson_id"]).json()
    assert lesson["topic"] == topic.strip()
    listed = stack.list_lessons(user).json()["lessons"]
    assert [entry["topic"] for entry in listed] == [topic.strip()]
    # The same key again is the same job: the key itself is stored verbatim too.
    again = stack.create(user, lesson_body(topic, key=key, details=topic[:300]))
    assert again.status_code == 200 and again.json()["job_id"] == created.json()["job_id"]


def test_nul_in_a_json_string_is_422_not_500(stack: Stack, user: str) -> None:
    for body in (lesson_body("a\u0000b"), lesson_body(key="k\u0000"), lesson_body(details="x\u0000")):
        response = stack.create(user, body)
        assert response.status_code == 422, response.text
        assert response.headers["Content-Type"].startswith(PROBLEM)


# --- raw HTTP: what a well-behaved client library would refuse to send ------------------------------


def _raw(port: int, request: bytes, timeout: float = 10) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and len(b"".join(chunks)) > 4096:
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    data = b"".join(chunks)
    assert data.startswith(b"HTTP/1."), data[:200]
    return int(data.split(b" ", 2)[1]), data


def _get(path: str, headers: bytes) -> bytes:
    return (
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers + b"\r\n"
    )


def _post(headers: bytes, body: bytes) -> bytes:
    return (
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n"
        + headers
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


HOSTILE_HEADERS = {
    "huge-user": b"X-Dylen-User: " + b"u" * 100_000 + b"\r\n",
    "huge-unrelated": b"X-Junk: " + b"j" * 60_000 + b"\r\n",
    "many-headers": b"".join(b"X-H%d: v\r\n" % i for i in range(300)),
    "nul-in-user": b"X-Dylen-User: ab\x00cd\r\n",
    "latin1-user": b"X-Dylen-User: \xff\xfe\xfd\r\n",
    "utf8-user": "X-Dylen-User: 用户\r\n".encode(),
    "control-user": b"X-Dylen-User: a\x01b\x7fc\r\n",
    "bearer-no-token": b"Authorization: Bearer\r\n",
    "bearer-spaces": b"Authorization: Bearer    \r\nX-Dylen-User: ok-user\r\n",
    "no-colon": b"X-Dylen-User ok-user\r\n",
    "folded": b"X-Dylen-User: a\r\n b\r\n",
    "trace-garbage": b"X-Cloud-Trace-Context: " + b"/;" * 2000 + b"\r\nX-Dylen-User: ok-user\r\n",
    "content-length-negative": b"Content-Length: -5\r\nX-Dylen-User: ok-user\r\n",
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
@pytest.mark.parametrize("name", ["get_job", "list_lessons", "create_job"])
def test_hostile_headers_get_a_4xx_and_the_process_survives(stack: Stack, name: str, case: str) -> None:
    port = stack.servers[name].port
    headers = HOSTILE_HEADERS[case]
    if name == "create_job":
        request = _post(headers, b'{"job_kind": "lesson", "idempotency_key": "h", "payload": {"topic": "x"}}')
    else:
        request = _get("/" + (str(uuid.uuid4()) if name == "get_job" else ""), headers)
    status, data = _raw(port, request)
    # A request that still carries a usable uid is served; every other one is a 4xx, never a 5xx.
    usable_uid = case in ("utf8-user", "latin1-user", "bearer-spaces", "trace-garbage")
    assert 400 <= status < 500 or (usable_uid and status in (200, 202)), data[:300]
    assert b"Traceback" not in data
    assert stack.servers[name].proc is not None and stack.servers[name].proc.poll() is None
    # ...and it still serves a normal request.
    assert stack.http.get(stack.url("list_lessons") + "/", headers={"X-Dylen-User": "after"}, timeout=10).ok


def test_invalid_utf8_anywhere_in_the_request_is_4xx(stack: Stack) -> None:
    port = stack.servers["create_job"].port
    body = b'{"job_kind": "lesson", "idempotency_key": "\xc3\x28", "payload": {"topic": "\xed\xa0\x80"}}'
    status, data = _raw(port, _post(b"X-Dylen-User: utf-user\r\n", body))
    assert status == 400, data[:300]
    status, _ = _raw(stack.servers["get_job"].port, _get("/%ff%fe", b"X-Dylen-User: utf-user\r\n"))
    assert status == 404


# --- issue 13: hostile input at the edge ------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor(value: Any) -> str:
    return _b64(json.dumps(value).encode())


def _assert_problem(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    assert response.headers["Content-Type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status
    return dict(problem)


STAMP = "2024-01-01T00:00:00+00:00"
BAD_CURSORS = {
    "id is an int": _cursor([STAMP, 5]),
    "id is an object": _cursor([STAMP, {}]),
    "id is a list": _cursor([STAMP, []]),
    "id is true": _cursor([STAMP, True]),
    "id is a float": _cursor([STAMP, 1.5]),
    "stamp is a number": _cursor([1704067200, str(uuid.uuid4())]),
    "three items": _cursor([STAMP, str(uuid.uuid4()), 1]),
    "an object": _cursor({"created_at": STAMP, "id": str(uuid.uuid4())}),
    "nested brackets": _b64(b"[" * 2400),
    "naive stamp": _cursor(["2024-01-01T00:00:00", str(uuid.uuid4())]),
    "before year 1 in UTC": _cursor(["0001-01-01T00:00:00+14:00", str(uuid.uuid4())]),
    "after 9999 in UTC": _cursor(["9999-12-31T23:59:59-14:00", str(uuid.uuid4())]),
    "very long": "A" * 5000,
    "not base64url": "%%%###",
}


@pytest.mark.parametrize("case", list(BAD_CURSORS))
def test_a_malformed_cursor_is_422(stack: Stack, user: str, case: str) -> None:
    response = stack.list_lessons(user, cursor=BAD_CURSORS[case])
    problem = _assert_problem(response, 422)
    assert problem["errors"] == [{"field": "cursor", "message": "is not a cursor from this API"}]


def test_a_cursor_at_the_edges_of_the_range_still_pages(stack: Stack, user: str) -> None:
    for stamp in ("0001-01-02T00:00:00+00:00", "9999-12-30T00:00:00+00:00"):
        response = stack.list_lessons(user, cursor=_cursor([stamp, str(uuid.uuid4())]))
        assert response.status_code == 200, response.text
        page = response.json()
        assert (page["lessons"], page["next_cursor"]) == ([], None)


def _raw_body(**strings: str) -> bytes:
    """A create_job body; json.dumps writes a lone surrogate as its \\udXXX escape, as a client would."""
    body = lesson_body(
        strings.get("topic", "Topic"), key=strings.get("key"), details=strings.get("details", "d")
    )
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("strings", "field", "message"),
    [
        ({"topic": "a\ud800b"}, "payload.topic", "lone surrogates"),
        ({"details": "\udfff"}, "payload.details", "lone surrogates"),
        ({"key": "k\ud83d"}, "idempotency_key", "lone surrogates"),
        ({"topic": "a\x00b"}, "payload.topic", "NUL"),
        ({"key": "k\x00"}, "idempotency_key", "NUL"),
    ],
)
def test_text_postgresql_cannot_store_is_422_naming_the_field_and_nothing_is_written(
    stack: Stack, db: sa.Engine, user: str, strings: dict[str, str], field: str, message: str
) -> None:
    response = stack.http.post(
        stack.url("create_job") + "/",
        data=_raw_body(**strings),
        headers={"X-Dylen-User": user, "Content-Type": "application/json"},
        timeout=30,
    )
    problem = _assert_problem(response, 422)
    assert [e["field"] for e in problem["errors"]] == [field]
    assert message in problem["errors"][0]["message"]
    assert count_user_jobs(db, user) == 0


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (
            b'{"job_kind":"lesson","idempotency_key":"s","payload":{"topic":"x","\\ud800":1}}',
            "payload.\\ud800",
        ),
        (b'{"job_kind":"lesson","idempotency_key":"s","\\udc00x":1,"payload":{"topic":"x"}}', "\\udc00x"),
        (
            b'{"job_kind":"lesson","idempotency_key":"s","payload":{"topic":"x","a\\u0000":1}}',
            "payload.a\x00",
        ),
        (b'{"job_kind":"lesson","idempotency_key":"s","payload":{"topic":"x","n":1e999}}', "payload.n"),
    ],
)
def test_a_bad_field_name_is_echoed_escaped_in_a_422_problem(
    stack: Stack, db: sa.Engine, user: str, raw: bytes, field: str
) -> None:
    response = stack.http.post(
        stack.url("create_job") + "/",
        data=raw,
        headers={"X-Dylen-User": user, "Content-Type": "application/json"},
        timeout=30,
    )
    problem = _assert_problem(response, 422)
    assert field in [e["field"] for e in problem["errors"]], problem
    assert count_user_jobs(db, user) == 0


def test_a_lone_surrogate_in_a_task_body_is_422(stack: Stack) -> None:
    response = stack.http.post(
        stack.url("process_job") + "/",
        data=b'{"job_id": "\\ud800"}',
        headers={"X-Dylen-Task-Secret": TASK_SECRET, "Content-Type": "application/json"},
        timeout=30,
    )
    _assert_problem(response, 422)


# --- the body bound: nothing reads more than 64 KiB ---------------------------------------------------


def _worker_rss_kib(server: FunctionServer) -> int:
    """VmRSS of the gunicorn worker(s) that serve `server`: the children of its master process."""
    assert server.proc is not None
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    assert children, "functions-framework runs gunicorn: a master and its worker"
    total = 0
    for pid in children:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def _read_status(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    assert b"application/problem+json" in head.lower()
    return int(head.split(b" ", 2)[1]), rest


def test_a_50_mb_chunked_body_is_cut_at_64_kib_fast_and_memory_stays_flat(stack: Stack) -> None:
    server = stack.servers["create_job"]
    before = _worker_rss_kib(server)
    chunk = b"%x\r\n%s\r\n" % (1 << 16, b"x" * (1 << 16))
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )

        def send() -> None:  # unauthenticated, and it keeps sending: the whole 50 MB if let
            nonlocal sent
            with contextlib.suppress(OSError):
                while sent < 50 * 1024 * 1024:
                    sock.sendall(chunk)
                    sent += 1 << 16
                sock.sendall(b"0\r\n\r\n")

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        status, body = _read_status(sock)
        elapsed = time.monotonic() - started
        sock.shutdown(socket.SHUT_RDWR)
        sender.join(10)
    assert status == 413, body
    assert json.loads(body)["type"].endswith("payload-too-large")
    assert elapsed < 2, elapsed
    assert sent < 50 * 1024 * 1024, "the server stopped reading long before the end"
    time.sleep(0.2)
    grown_mib = (_worker_rss_kib(server) - before) / 1024
    assert grown_mib < 20, f"worker RSS grew by {grown_mib:.1f} MiB"
    assert stack.create("after-big", lesson_body()).status_code == 202  # and it still serves


@pytest.mark.parametrize("length", [104_857_600, 70_000])
def test_an_over_limit_content_length_is_413_at_once_without_reading(stack: Stack, length: int) -> None:
    for name in ("create_job", "process_job", "get_job"):
        with socket.create_connection(("127.0.0.1", stack.servers[name].port), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(
                b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"X-Dylen-User: cl-user\r\nContent-Length: %d\r\n\r\n" % length
            )
            status, body = _read_status(sock)  # no body sent: an answer only if nothing waits for it
            assert time.monotonic() - started < 1
        assert status == 413, body


def test_a_small_chunked_body_is_still_served(stack: Stack, db: sa.Engine, user: str) -> None:
    body = json.dumps(lesson_body("Chunked")).encode()
    response = stack.http.post(
        stack.url("create_job") + "/",
        data=iter([body[:10], body[10:]]),  # a generator: requests sends it chunked
        headers={"X-Dylen-User": user, "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    assert count_user_jobs(db, user) == 1


# --- property: arbitrary Unicode in every string field, header and cursor: never a 5xx --------------

any_char = (
    st.characters(exclude_categories=())
    | st.characters(categories=["Cs"])
    | st.sampled_from("\x00\ud800\udfff\U0001f9ec")
)
any_text = st.text(any_char, max_size=40)
EDGE = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))


def create_bodies(value: str) -> st.SearchStrategy[dict[str, Any]]:
    """create_job bodies with any text in every field, mostly otherwise valid (so the text gets as
    far as it can), sometimes with an unknown field named by arbitrary text."""
    no_nul = st.text(any_char.filter(lambda c: c != "\x00"), min_size=1, max_size=40)
    field = st.just(value) | no_nul | no_nul | any_text
    payload = st.fixed_dictionaries(
        {"topic": field},
        optional={
            "details": field,
            "depth": field | st.sampled_from(DEPTHS),
            "language": field | st.just("en"),
        },
    )
    body = st.fixed_dictionaries(
        {
            "job_kind": st.just("lesson") | st.just("lesson") | field,
            "idempotency_key": field,
            "payload": payload,
        }
    )
    extra = st.just({}) | st.just({}) | st.dictionaries(any_text, any_text, min_size=1, max_size=1)
    return st.tuples(body, extra, extra).map(
        lambda t: {**t[1], **t[0], "payload": {**t[2], **t[0]["payload"]}}
    )


def _header_bytes(text: str) -> bytes:
    # Headers are bytes on the wire: the text as UTF-8 (a surrogate as its invalid 3-byte form),
    # minus what would end the header line (that is framing, tested with raw sockets above).
    raw = text.encode("utf-8", "surrogatepass").replace(b"\r", b"").replace(b"\n", b"")
    return raw.lstrip(b" \t\f\v") or b"x"


def _quoted(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


@pytest.mark.parametrize("name", USER_FUNCTIONS)
@EDGE
@given(
    user=st.just("prop-user") | st.just("prop-user") | any_text,
    trace=any_text,
    auth=st.just("") | any_text,
    value=any_text,
    data=st.data(),
)
def test_arbitrary_unicode_in_every_input_of_every_user_function_is_never_a_5xx(
    stack: Stack, user: str, trace: str, auth: str, value: str, data: st.DataObject, name: str
) -> None:
    headers = {"X-Dylen-User": _header_bytes(user), "X-Cloud-Trace-Context": _header_bytes(trace)}
    if auth:
        headers["Authorization"] = _header_bytes(auth)
    base = stack.url(name)
    if name == "create_job":
        body = data.draw(create_bodies(value))
        response = stack.http.post(
            base + "/",
            data=json.dumps(body).encode(),
            headers={**headers, "Content-Type": "application/json"},
            timeout=30,
        )
    elif name == "list_lessons":
        query = f"?cursor={_quoted(value)}&limit={_quoted(value[:5])}"
        response = stack.http.get(base + "/" + query, headers=headers, timeout=30)
    else:
        method = stack.http.post if name == "cancel_job" else stack.http.get
        response = method(f"{base}/{_quoted(value) or 'x'}", headers=headers, timeout=30)
    assert response.status_code < 500, (name, response.status_code, response.text[:300])
    if response.status_code >= 400 and not _gunicorn_refused(response):
        assert response.headers["Content-Type"] == PROBLEM, response.text[:300]


def _gunicorn_refused(response: requests.Response) -> bool:
    # gunicorn answers a header it cannot parse (NUL, control bytes) with its own HTML 400 before
    # any app code runs; on Cloud Run the Google front end refuses such requests first.
    return response.status_code == 400 and "Invalid HTTP Header" in response.text

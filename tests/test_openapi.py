"""openapi.yaml stays true: real responses of every user-facing function are validated against it,
and schemathesis generates requests (valid and invalid) from it: never a 5xx, every answer documented.

The functions run as real processes behind the `make run` gateway, so the document's paths
(`/create_job`, `/get_job/{job_id}`, ...) are the URLs the test calls.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.factories import make_lesson, make_user
from tests.support import ROOT, USER_FUNCTIONS, Stack, lesson_body, session

SPEC = ROOT / "openapi.yaml"
USER = "openapi-user"


def _not_a_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    # Our own, simpler than the built-in one: with the database up, no 5xx of any kind is right.
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    return None


CHECKS = [
    _not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[str]:
    from devtools.run import Gateway

    server = Gateway(0)
    server.start({name: stack.servers[name].port for name in USER_FUNCTIONS})
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture(scope="module")
def api_schema(gateway: str) -> Any:
    loaded = schemathesis.openapi.from_path(str(SPEC))
    loaded.config.update(base_url=gateway)
    return loaded


def _operation(api_schema: Any, path: str, method: str) -> Any:
    return api_schema[path][method]


def _validate(api_schema: Any, path: str, method: str, response: requests.Response) -> None:
    assert response.status_code < 500, response.text
    _operation(api_schema, path, method).validate_response(response)


# --- the document itself --------------------------------------------------------------------------


def test_document_is_openapi_31_and_covers_every_user_function(api_schema: Any) -> None:
    import yaml

    raw = yaml.safe_load(SPEC.read_text())
    assert raw["openapi"].startswith("3.1")
    operations = {op["operationId"] for item in raw["paths"].values() for op in item.values()}
    present = {p.name for p in (ROOT / "functions").iterdir() if (p / "main.py").exists()}
    user_facing = present - {
        "process_job",
        "archive_lessons",
        "rescue_jobs",
        "dashboard",
    }  # dashboard: operators
    # A new user function (cancel_job, say) must be added to openapi.yaml with its responses.
    assert operations == user_facing, f"document {sorted(user_facing - operations)} in openapi.yaml"


# --- real responses, each checked against the document --------------------------------------------


def test_happy_path_responses_match_the_document(api_schema: Any, gateway: str, stack: Stack) -> None:
    http = session()
    user = {"X-Dylen-User": f"oa-{uuid.uuid4().hex[:8]}"}
    body = lesson_body("Documented topic", depth="detailed", details="with details")
    created = http.post(f"{gateway}/create_job", json=body, headers=user, timeout=10)
    assert created.status_code == 202
    _validate(api_schema, "/create_job", "POST", created)
    again = http.post(f"{gateway}/create_job", json=body, headers=user, timeout=10)
    assert again.status_code == 200
    _validate(api_schema, "/create_job", "POST", again)
    job_id = created.json()["job_id"]
    done = stack.wait_for(user["X-Dylen-User"], job_id)
    got = http.get(f"{gateway}/get_job/{job_id}", headers=user, timeout=10)
    _validate(api_schema, "/get_job/{job_id}", "GET", got)
    lesson = http.get(f"{gateway}/get_lesson/{done['result']['lesson_id']}", headers=user, timeout=10)
    assert lesson.status_code == 200
    _validate(api_schema, "/get_lesson/{lesson_id}", "GET", lesson)
    page = http.get(f"{gateway}/list_lessons", params={"limit": 1}, headers=user, timeout=10)
    assert page.status_code == 200 and page.json()["lessons"]
    _validate(api_schema, "/list_lessons", "GET", page)


def _same_shape(example: Any, real: Any, where: str) -> None:
    """`example` has the keys of a real answer the document accepted, each of the same JSON type."""
    if isinstance(real, dict) and isinstance(example, dict):
        assert set(example) == set(real), (where, sorted(set(example) ^ set(real)))
        for key in real:
            if example[key] is not None and real[key] is not None:
                _same_shape(example[key], real[key], f"{where}.{key}")
    elif isinstance(real, list) and isinstance(example, list):
        if real and example:
            _same_shape(example[0], real[0], f"{where}[0]")
    else:
        assert type(example) is type(real), (where, example, real)


def test_the_examples_are_real_requests_and_answers(api_schema: Any, gateway: str, stack: Stack) -> None:
    # Swagger UI's "Try it out" starts from these: a real topic, never "string".
    import yaml

    raw = yaml.safe_load(SPEC.read_text())
    examples = raw["components"]["examples"]
    http = session()
    user = {"X-Dylen-User": f"oa-{uuid.uuid4().hex[:8]}"}
    create = raw["paths"]["/create_job"]["post"]
    requests_shown = create["requestBody"]["content"]["application/json"]["examples"]
    assert len(requests_shown) >= 2
    created = {}
    for name, example in requests_shown.items():
        body = example["value"]
        assert body["payload"]["topic"] not in ("string", "") and body["idempotency_key"] != "string"
        answer = http.post(f"{gateway}/create_job", json=body, headers=user, timeout=10)
        assert answer.status_code == 202, (name, answer.text)
        created[name] = answer.json()
    _same_shape(examples["QueuedJob"]["value"], created["photosynthesis"], "QueuedJob")
    done = stack.wait_for(user["X-Dylen-User"], created["photosynthesis"]["job_id"])
    got = http.get(f"{gateway}/get_job/{done['job_id']}", headers=user, timeout=10)
    _validate(api_schema, "/get_job/{job_id}", "GET", got)
    for name in ("RunningJob", "DoneJob", "FailedJob"):
        _same_shape(examples[name]["value"], got.json(), name)
    lesson = http.get(f"{gateway}/get_lesson/{done['result']['lesson_id']}", headers=user, timeout=10).json()
    shown = examples["Lesson"]["value"]
    assert set(shown) == set(lesson) and set(shown["content"]) <= set(lesson["content"])
    assert set(shown["content"]["sections"][0]) <= set(lesson["content"]["sections"][0])


def test_failed_job_and_error_responses_match_the_document(
    api_schema: Any, gateway: str, db: sa.Engine
) -> None:
    http = session()
    uid = f"oa-{uuid.uuid4().hex[:8]}"
    user = {"X-Dylen-User": uid}
    with db.begin() as conn:
        make_user(conn, uid)
        archived = make_lesson(conn, user_id=uid, archived_at=datetime.now(UTC))
    cases = [
        ("/create_job", "POST", http.post(f"{gateway}/create_job", json={}, headers=user, timeout=10), 422),
        (
            "/create_job",
            "POST",
            http.post(
                f"{gateway}/create_job",
                data=b"{",
                headers={**user, "Content-Type": "application/json"},
                timeout=10,
            ),
            400,
        ),
        (
            "/create_job",
            "POST",
            http.post(
                f"{gateway}/create_job", data=b"x", headers={**user, "Content-Type": "text/plain"}, timeout=10
            ),
            415,
        ),
        ("/create_job", "POST", http.post(f"{gateway}/create_job", json=lesson_body(), timeout=10), 401),
        (
            "/get_job/{job_id}",
            "GET",
            http.get(f"{gateway}/get_job/{uuid.uuid4()}", headers=user, timeout=10),
            404,
        ),
        (
            "/get_lesson/{lesson_id}",
            "GET",
            http.get(f"{gateway}/get_lesson/{archived}", headers=user, timeout=10),
            410,
        ),
        (
            "/list_lessons",
            "GET",
            http.get(f"{gateway}/list_lessons", params={"cursor": "bad"}, headers=user, timeout=10),
            422,
        ),
    ]
    key_body = lesson_body("One", key="oa-conflict")
    http.post(f"{gateway}/create_job", json=key_body, headers=user, timeout=10)
    conflict = http.post(
        f"{gateway}/create_job", json=lesson_body("Two", key="oa-conflict"), headers=user, timeout=10
    )
    cases.append(("/create_job", "POST", conflict, 409))
    for path, method, response, status in cases:
        assert response.status_code == status, (path, response.status_code, response.text)
        _validate(api_schema, path, method, response)


# --- property-based: schemathesis drives every operation from the document ------------------------

OPERATIONS = [
    ("/create_job", "POST"),
    ("/get_job/{job_id}", "GET"),
    ("/get_lesson/{lesson_id}", "GET"),
    ("/list_lessons", "GET"),
]


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[p for p, _ in OPERATIONS])
def test_generated_requests_never_5xx_and_match_the_document(
    api_schema: Any, path: str, method: str, mode: str
) -> None:
    """Valid and schema-violating requests alike: never a 5xx, every answer as documented, and
    (negative mode) data that breaks the document is never accepted."""
    from hypothesis import given

    operation = _operation(api_schema, path, method)
    generation = (
        schemathesis.GenerationMode.POSITIVE if mode == "positive" else schemathesis.GenerationMode.NEGATIVE
    )
    checks = CHECKS if mode == "positive" else [*CHECKS, negative_data_rejection]
    http = session()

    @given(case=operation.as_strategy(generation_mode=generation))
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # CI runs the same examples every time, so a failure reproduces
        database=None,
    )
    def run(case: Any) -> None:
        headers = {"X-Dylen-User": USER}
        response = case.call(headers=headers, timeout=15, session=http)
        case.validate_response(response, checks=checks, headers=headers)

    run()

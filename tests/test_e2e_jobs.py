"""End to end through real functions-framework processes and real PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

from tests.support import TASK_SECRET, Stack, count_user_jobs, lesson_body

PROBLEM = "application/problem+json"


def test_lesson_job_goes_from_queued_to_done_and_its_lesson_can_be_read(stack: Stack, user: str) -> None:
    # Given a user asks for a detailed lesson
    response = stack.create(user, lesson_body("The water cycle", depth="detailed", details="for kids"))
    # Then the job is accepted at once, queued, with a Location
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] in ("queued", "running", "done")
    assert job["job_kind"] == "lesson"
    assert response.headers["Location"].endswith(f"/get_job/{job['job_id']}")
    # When local dispatch has run it
    done = stack.wait_for(user, job["job_id"])
    # Then it is done with a lesson id, and the lesson has six sections
    assert done["status"] == "done", done
    assert done["attempts"] == 1
    assert done["error"] is None
    assert done["started_at"] and done["completed_at"]
    lesson_id = done["result"]["lesson_id"]
    lesson = stack.get_lesson(user, lesson_id)
    assert lesson.status_code == 200
    content = lesson.json()["content"]
    assert lesson.json()["topic"] == "The water cycle"
    assert len(content["sections"]) == 6
    for section in content["sections"]:
        assert section["heading"] and section["body"] and section["key_points"]
        assert section["quiz"]["question"]
    listed = stack.list_lessons(user).json()
    assert [entry["lesson_id"] for entry in listed["lessons"]] == [lesson_id]


@pytest.mark.parametrize(("depth", "sections"), [("highlights", 2), ("detailed", 6), ("training", 10)])
def test_depth_sets_the_number_of_sections(stack: Stack, user: str, depth: str, sections: int) -> None:
    job = stack.create(user, lesson_body("Fractions", depth=depth)).json()
    done = stack.wait_for(user, job["job_id"])
    lesson = stack.get_lesson(user, done["result"]["lesson_id"]).json()
    assert len(lesson["content"]["sections"]) == sections
    assert lesson["content"]["depth"] == depth


def test_same_key_same_request_returns_the_existing_job(stack: Stack, user: str) -> None:
    body = lesson_body("Gravity", key="same-key")
    first = stack.create(user, body)
    second = stack.create(user, body)
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json()["job_id"] == first.json()["job_id"]


def test_defaults_are_part_of_the_request_identity(stack: Stack, user: str) -> None:
    # "depth" omitted and "highlights" given are the same request once normalised.
    first = stack.create(user, lesson_body("Gravity", key="k-defaults"))
    second = stack.create(user, lesson_body("Gravity", key="k-defaults", depth="highlights", language="en"))
    assert (first.status_code, second.status_code) == (202, 200)


def test_same_key_different_request_is_409(stack: Stack, user: str) -> None:
    assert stack.create(user, lesson_body("Gravity", key="k1")).status_code == 202
    response = stack.create(user, lesson_body("Magnetism", key="k1"))
    assert response.status_code == 409
    assert response.headers["Content-Type"].startswith(PROBLEM)
    assert response.json()["type"].endswith("/idempotency-conflict")


def test_same_key_from_another_user_is_a_new_job(stack: Stack, user: str) -> None:
    a = stack.create(user, lesson_body("Gravity", key="shared"))
    b = stack.create(user + "-other", lesson_body("Gravity", key="shared"))
    assert (a.status_code, b.status_code) == (202, 202)
    assert a.json()["job_id"] != b.json()["job_id"]


def test_another_users_job_and_lesson_are_404(stack: Stack, user: str) -> None:
    job = stack.create(user, lesson_body("Secrets")).json()
    done = stack.wait_for(user, job["job_id"])
    intruder = f"intruder-{uuid.uuid4().hex[:6]}"
    for response in (
        stack.get_job(intruder, job["job_id"]),
        stack.get_lesson(intruder, done["result"]["lesson_id"]),
    ):
        assert response.status_code == 404
        assert response.headers["Content-Type"].startswith(PROBLEM)
        assert "Secrets" not in response.text
    assert stack.list_lessons(intruder).json()["lessons"] == []


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "123", "%00", "' OR 1=1 --", uuid.uuid4().hex + "x"])
def test_malformed_ids_are_404_never_500(stack: Stack, user: str, bad_id: str) -> None:
    assert stack.get_job(user, bad_id).status_code == 404
    assert stack.get_lesson(user, bad_id).status_code == 404


def test_unknown_ids_are_404(stack: Stack, user: str) -> None:
    assert stack.get_job(user, str(uuid.uuid4())).status_code == 404
    assert stack.get_lesson(user, str(uuid.uuid4())).status_code == 404


# --- every bad input gets its code -----------------------------------------------------------------


def _post_raw(stack: Stack, user: str | None, data: bytes, content_type: str | None) -> object:
    headers = {}
    if user:
        headers["X-Dylen-User"] = user
    if content_type:
        headers["Content-Type"] = content_type
    return stack.http.post(stack.url("create_job") + "/", data=data, headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("data", "content_type", "status", "slug"),
    [
        (b"{not json", "application/json", 400, "malformed-request"),
        (b"\xff\xfe{}", "application/json", 400, "malformed-request"),
        (b'{"a": NaN}', "application/json", 400, "malformed-request"),
        (b"topic=x", "application/x-www-form-urlencoded", 415, "unsupported-media-type"),
        (b"{}", None, 415, "unsupported-media-type"),
        (b'{"x": "' + b"a" * (64 * 1024) + b'"}', "application/json", 413, "payload-too-large"),
        (b"[]", "application/json", 422, "validation-failed"),
        (b"{}", "application/json", 422, "validation-failed"),
    ],
)
def test_bad_bodies_get_problem_json(
    stack: Stack, user: str, data: bytes, content_type: str | None, status: int, slug: str
) -> None:
    response = _post_raw(stack, user, data, content_type)
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    assert response.headers["Content-Type"].startswith(PROBLEM)  # type: ignore[attr-defined]
    problem = response.json()  # type: ignore[attr-defined]
    assert problem["status"] == status
    assert problem["type"].endswith("/" + slug)
    assert problem["title"] and problem["detail"]


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"job_kind": "lesson", "idempotency_key": "k", "payload": {}}, ["payload.topic"]),
        ({"job_kind": "lesson", "idempotency_key": "k", "payload": {"topic": ""}}, ["payload.topic"]),
        ({"job_kind": "lesson", "idempotency_key": "k", "payload": {"topic": "x" * 201}}, ["payload.topic"]),
        (
            {"job_kind": "lesson", "idempotency_key": "k", "payload": {"topic": "ok", "details": "d" * 301}},
            ["payload.details"],
        ),
        (
            {"job_kind": "lesson", "idempotency_key": "k", "payload": {"topic": "ok", "depth": "deep"}},
            ["payload.depth"],
        ),
        (
            {"job_kind": "lesson", "idempotency_key": "k", "payload": {"topic": "ok", "colour": "red"}},
            ["payload.colour"],
        ),
        ({"job_kind": "lesson", "idempotency_key": "k", "payload": {"topic": 5}}, ["payload.topic"]),
        ({"job_kind": "lesson", "idempotency_key": "k", "payload": "topic"}, ["payload"]),
        ({"job_kind": "poem", "idempotency_key": "k", "payload": {"topic": "ok"}}, ["job_kind"]),
        ({"job_kind": "lesson", "payload": {"topic": "ok"}}, ["idempotency_key"]),
        ({"job_kind": "lesson", "idempotency_key": "k", "payload": {"topic": "ok"}, "extra": 1}, ["extra"]),
        ({"job_kind": "maintenance.archive_lessons", "idempotency_key": "k", "payload": {}}, ["job_kind"]),
    ],
)
def test_invalid_fields_are_422_naming_each_field(
    stack: Stack, user: str, body: dict, fields: list[str]
) -> None:
    response = stack.create(user, body)
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == fields


def test_all_field_problems_are_reported_at_once(stack: Stack, user: str) -> None:
    body = {"job_kind": "lesson", "idempotency_key": "k", "payload": {"topic": "", "depth": "x", "z": 1}}
    response = stack.create(user, body)
    assert response.status_code == 422
    assert {e["field"] for e in response.json()["errors"]} == {"payload.topic", "payload.depth", "payload.z"}


def test_invalid_requests_store_nothing(stack: Stack, user: str, db) -> None:
    stack.create(user, {"job_kind": "lesson", "idempotency_key": "k", "payload": {}})
    assert count_user_jobs(db, user) == 0


def test_wrong_method_is_405_with_allow(stack: Stack, user: str) -> None:
    response = stack.http.get(stack.url("create_job") + "/", headers={"X-Dylen-User": user}, timeout=10)
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    response = stack.http.post(stack.url("get_job") + "/x", headers={"X-Dylen-User": user}, timeout=10)
    assert response.status_code == 405
    assert response.headers["Content-Type"].startswith(PROBLEM)


def test_missing_user_is_401(stack: Stack) -> None:
    for response in (
        stack.http.post(stack.url("create_job") + "/", json=lesson_body(), timeout=10),
        stack.http.get(stack.url("get_job") + f"/{uuid.uuid4()}", timeout=10),
        stack.http.get(stack.url("list_lessons") + "/", timeout=10),
        stack.http.get(stack.url("get_lesson") + f"/{uuid.uuid4()}", timeout=10),
    ):
        assert response.status_code == 401
        assert response.headers["Content-Type"].startswith(PROBLEM)
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_dev_auth_rejects_unusable_user_ids(stack: Stack) -> None:
    response = stack.create("has space", lesson_body())
    assert response.status_code == 401


# --- task auth ---------------------------------------------------------------------------------------


def test_process_job_without_credentials_is_401(stack: Stack) -> None:
    response = stack.deliver(str(uuid.uuid4()), secret=None)
    assert response.status_code == 401
    assert response.headers["Content-Type"].startswith(PROBLEM)


def test_process_job_with_wrong_secret_is_403(stack: Stack) -> None:
    response = stack.deliver(str(uuid.uuid4()), secret="not-" + TASK_SECRET)
    assert response.status_code == 403


def test_process_job_rejects_a_user_header_as_credentials(stack: Stack, user: str) -> None:
    response = stack.deliver(str(uuid.uuid4()), secret=None, **{"X-Dylen-User": user})
    assert response.status_code == 401


def test_process_job_unknown_job_is_acknowledged(stack: Stack) -> None:
    response = stack.deliver(str(uuid.uuid4()))
    assert response.status_code == 200
    assert response.json()["outcome"] == "unknown_job"
    assert stack.deliver("not-a-uuid").status_code == 200


def test_process_job_bad_task_body_is_422(stack: Stack) -> None:
    response = stack.http.post(
        stack.url("process_job") + "/",
        json={"id": "x"},
        headers={"X-Dylen-Task-Secret": TASK_SECRET},
        timeout=10,
    )
    assert response.status_code == 422


def test_unreachable_database_is_503_problem_json_quickly(logs_dir, user: str) -> None:
    # Given functions whose database does not answer (nothing listens on that port)
    import time

    from tests.support import FunctionServer, base_env, free_port, session

    env = base_env(
        f"postgresql://postgres@127.0.0.1:{free_port()}/gone", DYLEN_DB_CONNECT_TIMEOUT_SECONDS="1"
    )
    create = FunctionServer("create_job", env, logs_dir).start()
    get = FunctionServer("get_job", env, logs_dir).start()
    http = session()
    try:
        started = time.monotonic()
        responses = [
            http.post(create.url + "/", json=lesson_body(), headers={"X-Dylen-User": user}, timeout=30),
            http.get(f"{get.url}/{uuid.uuid4()}", headers={"X-Dylen-User": user}, timeout=30),
        ]
        elapsed = time.monotonic() - started
    finally:
        create.stop()
        get.stop()
    # Then each answers 503 problem+json with Retry-After, without a traceback, and without hanging
    for response in responses:
        assert response.status_code == 503, response.text
        assert response.headers["Content-Type"].startswith(PROBLEM)
        assert response.headers["Retry-After"]
        assert response.json()["type"].endswith("/database-unavailable")
        assert "Traceback" not in response.text
    assert elapsed < 20

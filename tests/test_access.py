"""Access matrix: every function x (no credentials, wrong credentials, another user's ids,
malformed ids) gets the right code, and no response body leaks another user's data.

User functions are exercised in both auth modes: dev (X-Dylen-User) on the shared stack, and
firebase with real RS256 ID tokens signed by a key whose certificate a loopback server publishes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.faults import kill_all
from tests.support import TASK_SECRET, USER_FUNCTIONS, FunctionServer, Stack, base_env, lesson_body, session
from tests.tokens import CertServer, KeyPair

PROBLEM = "application/problem+json"
PROJECT = "dylen-access-test"


# --- a victim with data, and an intruder ---------------------------------------------------------


@pytest.fixture(scope="module")
def victim(stack: Stack) -> dict[str, str]:
    uid = f"victim-{uuid.uuid4().hex[:10]}"
    topic = f"Victim secret {uuid.uuid4().hex[:8]}"
    job = stack.create(uid, lesson_body(topic, key="victim-key")).json()
    second = stack.create(uid, lesson_body(topic + " part two")).json()
    done = stack.wait_for(uid, job["job_id"])
    stack.wait_for(uid, second["job_id"])
    listed = stack.http.get(
        stack.url("list_lessons") + "/", params={"limit": 1}, headers={"X-Dylen-User": uid}, timeout=10
    ).json()
    return {
        "uid": uid,
        "topic": topic,
        "job_id": job["job_id"],
        "lesson_id": done["result"]["lesson_id"],
        "cursor": listed["next_cursor"],
    }


def _assert_no_leak(response: requests.Response, victim: dict[str, str]) -> None:
    for secret in (victim["uid"], victim["topic"], victim["lesson_id"]):
        assert secret not in response.text, (secret, response.text[:300])


def _assert_problem(response: requests.Response, status: int) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"].startswith(PROBLEM)
    assert response.json()["status"] == status


@pytest.fixture(scope="module")
def task_servers(stack: Stack, logs_dir: Path) -> Iterator[dict[str, FunctionServer]]:
    """rescue_jobs beside the shared stack's process_job, configured like it."""
    rescue = FunctionServer("rescue_jobs", stack.servers["create_job"].env, logs_dir).start()
    yield {"process_job": stack.servers["process_job"], "rescue_jobs": rescue}
    rescue.kill()


# --- user functions, dev auth --------------------------------------------------------------------


def _user_call(stack: Stack, name: str, *, headers: dict[str, str], target: str = "") -> requests.Response:
    http = stack.http
    if name == "create_job":
        return http.post(
            stack.url(name) + "/" + target, json=lesson_body("Intruder"), headers=headers, timeout=10
        )
    if name == "cancel_job":
        return http.post(f"{stack.url(name)}/{target or uuid.uuid4()}", headers=headers, timeout=10)
    if name == "list_lessons":
        return http.get(
            stack.url(name) + "/", params={"cursor": target} if target else None, headers=headers, timeout=10
        )
    return http.get(f"{stack.url(name)}/{target or uuid.uuid4()}", headers=headers, timeout=10)


@pytest.mark.parametrize("name", USER_FUNCTIONS)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Dylen-User": ""},
        {"X-Dylen-User": "has space"},
        {"X-Dylen-User": "x" * 129},
        {"Authorization": "Bearer not-a-token"},
    ],
    ids=["none", "empty", "space", "too-long", "bearer-in-dev-mode"],
)
def test_user_functions_refuse_missing_or_bad_credentials(
    stack: Stack, victim: dict[str, str], name: str, headers: dict[str, str]
) -> None:
    response = _user_call(stack, name, headers=headers)
    _assert_problem(response, 401)
    assert response.headers.get("WWW-Authenticate") == "Bearer"
    _assert_no_leak(response, victim)


@pytest.mark.parametrize(
    ("name", "field", "owner_status"),
    # The victim's job is done, so its owner's cancel is 409: it exists for them, not for others.
    [("get_job", "job_id", 200), ("get_lesson", "lesson_id", 200), ("cancel_job", "job_id", 409)],
)
def test_another_users_ids_are_404_and_leak_nothing(
    stack: Stack, victim: dict[str, str], user: str, name: str, field: str, owner_status: int
) -> None:
    response = _user_call(stack, name, headers={"X-Dylen-User": user}, target=victim[field])
    _assert_problem(response, 404)
    _assert_no_leak(response, victim)
    # The owner still sees it: the 404 is about ownership, not existence.
    assert (
        _user_call(stack, name, headers={"X-Dylen-User": victim["uid"]}, target=victim[field]).status_code
        == owner_status
    )


def test_another_users_cursor_shows_only_the_callers_own_lessons(
    stack: Stack, victim: dict[str, str], user: str
) -> None:
    response = _user_call(stack, "list_lessons", headers={"X-Dylen-User": user}, target=victim["cursor"])
    assert victim["cursor"]
    assert response.status_code == 200
    assert response.json()["lessons"] == []
    _assert_no_leak(response, victim)


def test_another_users_idempotency_key_is_a_new_job_not_theirs(
    stack: Stack, victim: dict[str, str], user: str
) -> None:
    response = stack.create(user, lesson_body(victim["topic"] + " copy", key="victim-key"))
    assert response.status_code == 202
    assert response.json()["job_id"] != victim["job_id"]
    assert victim["lesson_id"] not in response.text


@pytest.mark.parametrize("name", ["get_job", "get_lesson", "cancel_job"])
@pytest.mark.parametrize(
    "bad_id",
    ["nope", "0", "%00", "..%2F..%2Fetc", "' OR '1'='1", "😀", str(uuid.uuid4()).upper() + "0", "a" * 5000],
)
def test_malformed_ids_are_404(
    stack: Stack, victim: dict[str, str], user: str, name: str, bad_id: str
) -> None:
    response = _user_call(stack, name, headers={"X-Dylen-User": user}, target=bad_id)
    assert response.status_code in (404, 414), response.text[:200]  # 414: the server's URL limit
    if response.status_code == 404:
        assert response.headers["Content-Type"].startswith(PROBLEM)
    _assert_no_leak(response, victim)


@pytest.mark.parametrize("cursor", ["x", "!!!", "W10", "eyJhIjoxfQ", "' OR 1=1 --"])
def test_malformed_cursors_are_422(stack: Stack, user: str, cursor: str) -> None:
    _assert_problem(_user_call(stack, "list_lessons", headers={"X-Dylen-User": user}, target=cursor), 422)


def test_nested_paths_are_404(stack: Stack, victim: dict[str, str]) -> None:
    owner = {"X-Dylen-User": victim["uid"]}
    for name, path in (("get_job", victim["job_id"] + "/x"), ("create_job", "x"), ("list_lessons", "x")):
        method = "POST" if name == "create_job" else "GET"
        response = stack.http.request(method, f"{stack.url(name)}/{path}", headers=owner, json={}, timeout=10)
        _assert_problem(response, 404)


# --- task functions --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["process_job", "rescue_jobs"])
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"X-Dylen-Task-Secret": "wrong"}, 403),
        ({"X-Dylen-Task-Secret": ""}, 403),
        ({"X-Dylen-Task-Secret": TASK_SECRET[:-1]}, 403),  # a prefix is not the secret
        ({"X-Dylen-Task-Secret": TASK_SECRET + "x"}, 403),
        ({"Authorization": "Bearer forged"}, 403),  # no service account configured: OIDC refused
        ({"X-Dylen-User": "someone"}, 401),  # a user's credentials are not a task's
    ],
    ids=["none", "wrong", "empty", "prefix", "longer", "oidc-not-configured", "user-creds"],
)
def test_task_functions_refuse_anything_but_task_credentials(
    task_servers: dict[str, FunctionServer], victim: dict[str, str], name: str, headers: dict, status: int
) -> None:
    response = session().post(
        task_servers[name].url + "/", json={"job_id": victim["job_id"]}, headers=headers, timeout=10
    )
    _assert_problem(response, status)
    _assert_no_leak(response, victim)


@pytest.mark.parametrize("job_id", ["nope", "' OR 1=1 --", str(uuid.uuid4())])
def test_process_job_acknowledges_malformed_or_unknown_ids(
    task_servers: dict[str, FunctionServer], job_id: str
) -> None:
    response = session().post(
        task_servers["process_job"].url + "/",
        json={"job_id": job_id},
        headers={"X-Dylen-Task-Secret": TASK_SECRET},
        timeout=10,
    )
    assert response.status_code == 200  # retrying cannot help
    assert response.json()["outcome"] == "unknown_job"


@pytest.mark.parametrize("body", [{}, {"job_id": 5}, [], {"job_id": None}])
def test_process_job_rejects_bodies_that_are_not_tasks(
    task_servers: dict[str, FunctionServer], body: Any
) -> None:
    response = session().post(
        task_servers["process_job"].url + "/",
        json=body,
        headers={"X-Dylen-Task-Secret": TASK_SECRET},
        timeout=10,
    )
    assert response.status_code in (400, 422)
    assert response.headers["Content-Type"].startswith(PROBLEM)


# --- user functions, firebase auth with real signed tokens ---------------------------------------


class _Issuer:
    """A Firebase-like issuer for `PROJECT` (keys and certificates from tests.tokens)."""

    def __init__(self, kid: str) -> None:
        self.keys = KeyPair.generate(kid)
        self.kid, self.cert_pem = kid, self.keys.cert_pem

    def token(self, uid: str, **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": f"https://securetoken.google.com/{PROJECT}",
            "aud": PROJECT,
            "sub": uid,
            "iat": now,
            "exp": now + 600,
            **overrides,
        }
        return self.keys.sign(claims)


@pytest.fixture(scope="module")
def firebase(database_url: str, logs_dir: Path) -> Iterator[dict[str, Any]]:
    issuer, stranger = _Issuer("key-1"), _Issuer("key-1")  # the stranger reuses the kid, not the key
    server = CertServer({issuer.kid: issuer.cert_pem})
    env = base_env(
        database_url,
        DYLEN_AUTH_MODE="firebase",
        DYLEN_FIREBASE_PROJECT_ID=PROJECT,
        DYLEN_FIREBASE_CERTS_URL=server.url("certs"),
        DYLEN_JOBS_AUTO_PROCESS="false",
    )
    servers = {name: FunctionServer(name, env, logs_dir).start(wait=False) for name in USER_FUNCTIONS}
    for fs in servers.values():
        fs.wait_ready()
    yield {"servers": Stack(servers), "issuer": issuer, "stranger": stranger}
    kill_all(Stack(servers))
    server.shutdown()


def test_firebase_token_of_the_owner_is_accepted_and_ids_stay_private(firebase: dict[str, Any]) -> None:
    stack: Stack = firebase["servers"]
    owner, other = f"fb-{uuid.uuid4().hex[:8]}", f"fb-{uuid.uuid4().hex[:8]}"
    topic = f"Firebase private {uuid.uuid4().hex[:6]}"
    auth = {"Authorization": "Bearer " + firebase["issuer"].token(owner)}
    created = stack.http.post(
        stack.url("create_job") + "/", json=lesson_body(topic), headers=auth, timeout=10
    )
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]
    assert stack.http.get(f"{stack.url('get_job')}/{job_id}", headers=auth, timeout=10).status_code == 200
    intruder = {"Authorization": "Bearer " + firebase["issuer"].token(other)}
    response = stack.http.get(f"{stack.url('get_job')}/{job_id}", headers=intruder, timeout=10)
    _assert_problem(response, 404)
    assert topic not in response.text and owner not in response.text


@pytest.mark.parametrize("name", USER_FUNCTIONS)
@pytest.mark.parametrize(
    "case",
    [
        "none",
        "dev-header",
        "garbage",
        "basic",
        "wrong-key",
        "expired",
        "wrong-audience",
        "wrong-issuer",
        "no-sub",
    ],
)
def test_firebase_mode_refuses_every_bad_credential(firebase: dict[str, Any], name: str, case: str) -> None:
    issuer, stranger = firebase["issuer"], firebase["stranger"]
    uid = "fb-user"
    headers = {
        "none": {},
        "dev-header": {"X-Dylen-User": uid},  # dev trust is off in firebase mode
        "garbage": {"Authorization": "Bearer a.b.c"},
        "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
        "wrong-key": {"Authorization": "Bearer " + stranger.token(uid)},
        "expired": {
            "Authorization": "Bearer "
            + issuer.token(uid, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
        },
        "wrong-audience": {"Authorization": "Bearer " + issuer.token(uid, aud="another-project")},
        "wrong-issuer": {"Authorization": "Bearer " + issuer.token(uid, iss="https://evil.example")},
        "no-sub": {"Authorization": "Bearer " + issuer.token("")},
    }[case]
    response = _user_call(firebase["servers"], name, headers=headers)
    _assert_problem(response, 401)

"""Firebase ID tokens (user auth) and Google OIDC tokens (task auth), verified by real function processes.

Google's signing-key endpoints cannot be reached here, so the test is its own issuer: it generates RSA
keys, signs RS256 JWTs, and serves the matching x509 certificates (`{kid: pem}`, the format of Google's
endpoints) from a loopback HTTP server that DYLEN_FIREBASE_CERTS_URL / DYLEN_GOOGLE_OIDC_CERTS_URL
point at. Everything after the key fetch is the production code path.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from google.auth import jwt

from common.platform.auth import FETCH_TIMEOUT_SECONDS
from tests.support import (
    FunctionServer,
    Stack,
    StackFactory,
    base_env,
    count_user_jobs,
    lesson_body,
    migrated_database,
    session,
    stop_all,
)
from tests.tokens import CertServer, KeyPair, unsigned

PROJECT = "dylen-test"
INVOKER = "tasks-invoker@dylen-test.iam.gserviceaccount.com"
AUDIENCE = "https://process-job.example.test"


@dataclass
class Issuer:
    good: KeyPair
    rogue: KeyPair  # not served: its signatures must not verify even under the good key's kid

    def firebase(self, uid: str, **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": f"https://securetoken.google.com/{PROJECT}",
            "aud": PROJECT,
            "sub": uid,
            "user_id": uid,
            "auth_time": now - 60,
            "iat": now - 60,
            "exp": now + 3600,
            **overrides,
        }
        return self.good.sign(claims)

    def oidc(self, email: str = INVOKER, **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": "https://accounts.google.com",
            "aud": AUDIENCE,
            "sub": "1234567890",
            "email": email,
            "email_verified": True,
            "iat": now - 60,
            "exp": now + 3600,
            **overrides,
        }
        return self.good.sign(claims)


@pytest.fixture(scope="module")
def issuer() -> Iterator[tuple[Issuer, CertServer]]:
    good, rogue = KeyPair.generate("key-1"), KeyPair.generate("key-2")
    server = CertServer({good.kid: good.cert_pem})
    yield Issuer(good, rogue), server
    server.shutdown()


@pytest.fixture(scope="module")
def firebase_stack(make_stack: StackFactory, issuer: tuple[Issuer, CertServer]) -> Stack:
    _, certs = issuer
    return make_stack(
        DYLEN_AUTH_MODE="firebase",
        DYLEN_FIREBASE_PROJECT_ID=PROJECT,
        DYLEN_FIREBASE_CERTS_URL=certs.url("firebase"),
        DYLEN_GOOGLE_OIDC_CERTS_URL=certs.url("oidc"),
        DYLEN_TASKS_INVOKER_SA=INVOKER,
        DYLEN_TASKS_OIDC_AUDIENCE=AUDIENCE,
        DYLEN_JOBS_AUTO_PROCESS="false",
        # One task per lesson: the tests deliver it once with a token (sections: tests/test_fanout.py).
        DYLEN_LESSON_GENERATOR="common.lessons.template:generate_lesson",
    )


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token is not None else {}


def _create(stack: Stack, token: str | None) -> Any:
    return stack.http.post(
        stack.url("create_job") + "/", json=lesson_body("Tokens"), headers=_bearer(token), timeout=30
    )


def test_a_good_firebase_token_acts_as_its_user(
    firebase_stack: Stack, issuer: tuple[Issuer, CertServer]
) -> None:
    tokens, _ = issuer
    uid = f"fb-{uuid.uuid4().hex[:10]}"
    created = _create(firebase_stack, tokens.firebase(uid))
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]
    url = f"{firebase_stack.url('get_job')}/{job_id}"
    mine = firebase_stack.http.get(url, headers=_bearer(tokens.firebase(uid)), timeout=30)
    assert mine.status_code == 200 and mine.json()["job_id"] == job_id
    theirs = firebase_stack.http.get(url, headers=_bearer(tokens.firebase(uid + "-other")), timeout=30)
    assert theirs.status_code == 404
    # Dev-mode identity is not accepted once Firebase auth is on.
    spoof = firebase_stack.http.get(url, headers={"X-Dylen-User": uid}, timeout=30)
    assert spoof.status_code == 401


def _bad_user_tokens(tokens: Issuer) -> dict[str, tuple[str | None, str]]:
    now = int(time.time())
    uid = "someone"
    return {
        "expired": (tokens.firebase(uid, iat=now - 7200, exp=now - 3600), "expired"),
        "wrong audience": (tokens.firebase(uid, aud="another-project"), "audience"),
        "wrong issuer": (
            tokens.firebase(uid, iss="https://securetoken.google.com/another-project"),
            "issuer",
        ),
        "wrong signature": (
            tokens.rogue.sign(json.loads(_claims(tokens.firebase(uid))), kid="key-1"),
            "signature",
        ),
        "unknown key": (tokens.rogue.sign(json.loads(_claims(tokens.firebase(uid)))), "key"),
        # google-auth would try every served key for it: this one would verify, were it not refused.
        "no kid": (tokens.good.sign(json.loads(_claims(tokens.firebase(uid))), with_kid=False), "kid"),
        "unsigned": (unsigned(json.loads(_claims(tokens.firebase(uid)))), "unsigned"),
        "missing": (None, "Bearer"),
        "not a jwt": ("not-a-token", "Invalid token"),
    }


def _claims(token: str) -> str:
    return json.dumps(jwt.decode(token, verify=False))


@pytest.mark.parametrize(
    "case",
    [
        "expired",
        "wrong audience",
        "wrong issuer",
        "wrong signature",
        "unknown key",
        "no kid",
        "unsigned",
        "missing",
        "not a jwt",
    ],
)
def test_bad_firebase_tokens_are_401_with_a_clear_problem(
    firebase_stack: Stack, issuer: tuple[Issuer, CertServer], case: str
) -> None:
    tokens, _ = issuer
    token, hint = _bad_user_tokens(tokens)[case]
    response = _create(firebase_stack, token)
    assert response.status_code == 401, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    problem = response.json()
    assert problem["status"] == 401
    assert hint.lower() in problem["detail"].lower(), problem


def _deliver(stack: Stack, job_id: str, token: str | None) -> Any:
    return stack.http.post(
        stack.url("process_job") + "/", json={"job_id": job_id}, headers=_bearer(token), timeout=60
    )


def test_a_good_oidc_token_from_the_invoker_runs_the_job(
    firebase_stack: Stack, issuer: tuple[Issuer, CertServer]
) -> None:
    tokens, _ = issuer
    uid = f"fb-{uuid.uuid4().hex[:10]}"
    created = _create(firebase_stack, tokens.firebase(uid))
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]
    answer = _deliver(firebase_stack, job_id, tokens.oidc())
    assert answer.status_code == 200, answer.text
    job = firebase_stack.http.get(
        f"{firebase_stack.url('get_job')}/{job_id}", headers=_bearer(tokens.firebase(uid)), timeout=30
    ).json()
    assert job["status"] == "done"


@pytest.mark.parametrize(
    ("case", "status", "hint"),
    [
        ("expired", 401, "expired"),
        ("wrong audience", 401, "audience"),
        ("wrong issuer", 401, "issuer"),
        ("wrong signature", 401, "signature"),
        ("wrong service account", 403, "service account"),
        ("unverified email", 403, "service account"),
        ("firebase token", 401, "audience"),
        ("missing", 401, "OIDC"),
    ],
)
def test_bad_oidc_task_tokens_are_refused(
    firebase_stack: Stack, issuer: tuple[Issuer, CertServer], case: str, status: int, hint: str
) -> None:
    tokens, _ = issuer
    now = int(time.time())
    token = {
        "expired": tokens.oidc(iat=now - 7200, exp=now - 3600),
        "wrong audience": tokens.oidc(aud="https://elsewhere.example.test"),
        "wrong issuer": tokens.oidc(iss="https://securetoken.google.com/dylen-test"),
        "wrong signature": tokens.rogue.sign(json.loads(_claims(tokens.oidc())), kid="key-1"),
        "wrong service account": tokens.oidc(email="someone-else@dylen-test.iam.gserviceaccount.com"),
        "unverified email": tokens.oidc(email_verified=False),
        "firebase token": tokens.firebase("a-user"),
        "missing": None,
    }[case]
    response = _deliver(firebase_stack, str(uuid.uuid4()), token)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert hint.lower() in response.json()["detail"].lower(), response.json()


# --- issue 13: claim types, and key fetching that fails shut --------------------------------------


@pytest.mark.parametrize(
    ("claims", "hint"),
    [
        ({"exp": "9999999999"}, "exp"),
        ({"exp": float("nan")}, "exp"),
        ({"iat": True}, "iat"),
        ({"nbf": "0"}, "nbf"),
        ({"aud": [PROJECT]}, "aud"),
        ({"sub": 12345}, "sub"),
        ({"email_verified": "true"}, "email_verified"),
    ],
)
def test_firebase_claims_of_the_wrong_type_are_401(
    firebase_stack: Stack, db: Any, issuer: tuple[Issuer, CertServer], claims: dict[str, Any], hint: str
) -> None:
    tokens, _ = issuer
    uid = f"fb-{uuid.uuid4().hex[:10]}"
    response = _create(firebase_stack, tokens.firebase(uid, **claims))
    assert response.status_code == 401, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert hint in response.json()["detail"], response.json()
    assert count_user_jobs(db, uid) == 0


@pytest.mark.parametrize("verified", ["false", "true", 1, None])
def test_only_a_json_true_email_verified_passes_task_auth(
    firebase_stack: Stack, issuer: tuple[Issuer, CertServer], verified: Any
) -> None:
    tokens, _ = issuer
    response = _deliver(firebase_stack, str(uuid.uuid4()), tokens.oidc(email_verified=verified))
    # A string "false" is truthy: only the JSON boolean counts, anything else is a malformed token.
    # (The boolean false is the 403 of test_bad_oidc_task_tokens_are_refused.)
    assert response.status_code == 401, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert "email_verified" in response.json()["detail"], response.json()


class SilentServer:
    """Accepts connections and never answers: a fake of Google's key endpoint hanging (the real one
    cannot be reached from here, nor made to hang). Counts the connections it accepted."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/certs"

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


class CountingCertServer(CertServer):
    """CertServer that counts fetches and says how long its keys may be cached."""

    def __init__(self, certs: dict[str, str], max_age: int) -> None:
        self.fetches = 0
        body = json.dumps(certs).encode()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", f"public, max-age={max_age}, must-revalidate")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        http.server.ThreadingHTTPServer.__init__(self, ("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _firebase_get_job(database_url: str, logs_dir: Path, certs_url: str) -> FunctionServer:
    env = base_env(
        database_url,
        DYLEN_AUTH_MODE="firebase",
        DYLEN_FIREBASE_PROJECT_ID=PROJECT,
        DYLEN_FIREBASE_CERTS_URL=certs_url,
        THREADS="8",
    )
    return FunctionServer("get_job", env, logs_dir).start()


def test_a_hanging_key_url_costs_one_fetch_and_every_caller_a_prompt_503(
    database_url: str, logs_dir: Path, issuer: tuple[Issuer, CertServer]
) -> None:
    tokens, _ = issuer
    silent = SilentServer()
    server = _firebase_get_job(database_url, logs_dir, silent.url())
    client = session()
    try:
        url = f"{server.url}/{uuid.uuid4()}"
        token = tokens.firebase("stampede-user")

        def call(_: int) -> tuple[requests.Response, float]:
            started = time.monotonic()
            response = client.get(url, headers=_bearer(token), timeout=30)
            return response, time.monotonic() - started

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, range(8)))
        for response, elapsed in answers:
            assert response.status_code == 503, response.text
            assert response.headers["Content-Type"] == "application/problem+json"
            assert response.headers["Retry-After"].isdigit()
            assert "signing keys" in response.json()["detail"]
            assert elapsed < FETCH_TIMEOUT_SECONDS + 1.5, elapsed  # one fetch's timeout, not 8 in a row
        assert len(silent.accepted) == 1, "one fetch in flight, not one per request"
        # The failure is remembered: the next caller is answered at once, without another fetch.
        response, elapsed = call(0)
        assert response.status_code == 503 and elapsed < 0.5, elapsed
        assert len(silent.accepted) == 1
    finally:
        client.close()
        server.stop()
        silent.close()


def test_keys_are_kept_as_long_as_max_age_says_then_fetched_again(
    database_url: str, logs_dir: Path, issuer: tuple[Issuer, CertServer]
) -> None:
    tokens, _ = issuer
    certs = CountingCertServer({tokens.good.kid: tokens.good.cert_pem}, max_age=2)
    server = _firebase_get_job(database_url, logs_dir, certs.url("firebase"))
    client = session()
    try:
        url = f"{server.url}/{uuid.uuid4()}"
        for _ in range(3):
            response = client.get(url, headers=_bearer(tokens.firebase("cache-user")), timeout=30)
            assert response.status_code == 404, response.text  # authenticated; no such job
        assert certs.fetches == 1
        time.sleep(2.5)
        response = client.get(url, headers=_bearer(tokens.firebase("cache-user")), timeout=30)
        assert response.status_code == 404, response.text
        assert certs.fetches == 2
    finally:
        client.close()
        server.stop()
        certs.shutdown()


TASK_BASE_URL = "https://functions.example.test"
TASK_AUDIENCES = {  # Settings.task_audience, as deploy.sh and dispatch_gcp mint them
    "process_job": AUDIENCE,  # DYLEN_TASKS_OIDC_AUDIENCE: Cloud Tasks tokens are minted for it
    "rescue_jobs": f"{TASK_BASE_URL}/rescue_jobs",  # Cloud Scheduler: the function's own URL
    "archive_lessons": f"{TASK_BASE_URL}/archive_lessons",
}


@pytest.fixture(scope="module")
def task_servers(
    pg_admin_url: str, logs_dir: Path, issuer: tuple[Issuer, CertServer]
) -> Iterator[dict[str, FunctionServer]]:
    """The task functions, with DYLEN_TASKS_OIDC_AUDIENCE set, on a database of their own (the
    archive trigger creates a job of the day)."""
    _, certs = issuer
    with migrated_database(pg_admin_url) as url:
        env = base_env(
            url,
            DYLEN_BASE_URL=TASK_BASE_URL,
            DYLEN_PROCESS_JOB_URL=f"{TASK_BASE_URL}/process_job",
            DYLEN_GOOGLE_OIDC_CERTS_URL=certs.url("oidc"),
            DYLEN_TASKS_INVOKER_SA=INVOKER,
            DYLEN_TASKS_OIDC_AUDIENCE=AUDIENCE,
            DYLEN_JOBS_AUTO_PROCESS="false",
        )
        servers = {name: FunctionServer(name, env, logs_dir).start(wait=False) for name in TASK_AUDIENCES}
        try:
            for server in servers.values():
                server.wait_ready()
            yield servers
        finally:
            stop_all(servers.values())


@pytest.mark.parametrize("name", list(TASK_AUDIENCES))
def test_each_task_function_accepts_exactly_its_audience(
    task_servers: dict[str, FunctionServer], issuer: tuple[Issuer, CertServer], name: str
) -> None:
    tokens, _ = issuer
    client = session()
    url = task_servers[name].url + "/"
    body = {"job_id": str(uuid.uuid4())} if name == "process_job" else {}
    try:
        good = client.post(url, json=body, headers=_bearer(tokens.oidc(aud=TASK_AUDIENCES[name])), timeout=30)
        assert good.status_code < 400 or (name == "process_job" and good.status_code == 404), good.text
        others = {TASK_AUDIENCES[n] for n in TASK_AUDIENCES if n != name} | {f"{TASK_BASE_URL}/process_job"}
        for audience in others - {TASK_AUDIENCES[name]}:
            bad = client.post(url, json=body, headers=_bearer(tokens.oidc(aud=audience)), timeout=30)
            assert bad.status_code == 401, (audience, bad.text)
            assert "audience" in bad.json()["detail"].lower()
    finally:
        client.close()


# --- issue 30: a token that can never verify is refused before the keys are fetched ---------------

DASHBOARD_AUDIENCE = "https://dashboard.example.test"


@pytest.fixture(scope="module")
def keys_unreachable(
    database_url: str, logs_dir: Path
) -> Iterator[tuple[SilentServer, dict[str, FunctionServer]]]:
    """A user function, a task function and the dashboard, every key URL hanging (SilentServer)."""
    silent = SilentServer()
    env = base_env(
        database_url,
        DYLEN_AUTH_MODE="firebase",
        DYLEN_FIREBASE_PROJECT_ID=PROJECT,
        DYLEN_FIREBASE_CERTS_URL=silent.url(),
        DYLEN_GOOGLE_OIDC_CERTS_URL=silent.url(),
        DYLEN_TASKS_INVOKER_SA=INVOKER,
        DYLEN_TASKS_OIDC_AUDIENCE=AUDIENCE,
        DYLEN_DASHBOARD_AUDIENCE=DASHBOARD_AUDIENCE,
        DYLEN_DASHBOARD_OPERATORS=INVOKER,
        DYLEN_JOBS_AUTO_PROCESS="false",
    )
    names = ("get_job", "process_job", "dashboard")
    servers = {name: FunctionServer(name, env, logs_dir).start(wait=False) for name in names}
    try:
        for server in servers.values():
            server.wait_ready()
        yield silent, servers
    finally:
        stop_all(servers.values())
        silent.close()


def _call(server: FunctionServer, token: str) -> requests.Response:
    headers = _bearer(token)
    if server.name == "process_job":
        return session().post(
            server.url + "/", json={"job_id": str(uuid.uuid4())}, headers=headers, timeout=30
        )
    if server.name == "dashboard":
        return session().get(server.url + "/jobs", headers=headers, timeout=30)
    return session().get(f"{server.url}/{uuid.uuid4()}", headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("name", "case", "hint"),
    [
        ("get_job", "unsigned", "FIREBASE_AUTH_EMULATOR_HOST"),
        ("get_job", "HS256", "algorithm 'HS256'"),
        ("get_job", "ES256", "algorithm 'ES256'"),  # one google-auth can verify: still not Google's
        ("get_job", "no kid", "(kid)"),
        ("process_job", "unsigned", "unsigned"),
        ("process_job", "HS256", "algorithm 'HS256'"),
        ("process_job", "no kid", "(kid)"),
        ("dashboard", "unsigned", "unsigned"),
        ("dashboard", "unsigned user token", "FIREBASE_AUTH_EMULATOR_HOST"),
        ("dashboard", "HS256", "algorithm 'HS256'"),
        ("dashboard", "no kid", "(kid)"),
    ],
)
def test_a_token_that_can_never_verify_is_401_at_once_while_the_keys_are_unreachable(
    keys_unreachable: tuple[SilentServer, dict[str, FunctionServer]],
    issuer: tuple[Issuer, CertServer],
    name: str,
    case: str,
    hint: str,
) -> None:
    silent, servers = keys_unreachable
    tokens, _ = issuer
    # Otherwise well-formed for the function it is sent to: only the header is wrong.
    signed = {
        "get_job": tokens.firebase("never-valid"),
        "process_job": tokens.oidc(),
        "dashboard": tokens.oidc(aud=DASHBOARD_AUDIENCE),
    }[name]
    claims = dict(jwt.decode(signed, verify=False))
    token = {
        "unsigned": lambda: unsigned(claims),
        # A Firebase user's emulator token at the dashboard: judged as a user token, still 401.
        "unsigned user token": lambda: unsigned(dict(jwt.decode(tokens.firebase("u"), verify=False))),
        "HS256": lambda: tokens.good.sign(claims, alg="HS256"),
        "ES256": lambda: tokens.good.sign(claims, alg="ES256"),
        "no kid": lambda: tokens.good.sign(claims, with_kid=False),
    }[case]()
    fetches = len(silent.accepted)
    started = time.monotonic()
    response = _call(servers[name], token)
    elapsed = time.monotonic() - started
    assert response.status_code == 401, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert hint in response.json()["detail"], response.json()
    assert elapsed < FETCH_TIMEOUT_SECONDS / 2, elapsed  # not after a key fetch timed out
    assert len(silent.accepted) == fetches, "the keys were fetched for a token that cannot verify"


def test_a_well_formed_token_there_still_waits_for_the_keys_and_is_503(
    keys_unreachable: tuple[SilentServer, dict[str, FunctionServer]], issuer: tuple[Issuer, CertServer]
) -> None:
    """The control of the test above: the same functions do need keys they cannot fetch, so its 401s
    were decided from the header alone."""
    _, servers = keys_unreachable
    tokens, _ = issuer
    well_formed = {
        "get_job": tokens.firebase("well-formed"),
        "process_job": tokens.oidc(),
        "dashboard": tokens.oidc(aud=DASHBOARD_AUDIENCE),
    }
    with ThreadPoolExecutor(len(servers)) as pool:  # each waits out one fetch: side by side
        answers = dict(
            zip(servers, pool.map(lambda n: _call(servers[n], well_formed[n]), servers), strict=True)
        )
    for name, response in answers.items():
        assert response.status_code == 503, (name, response.text)
        assert "signing keys" in response.json()["detail"], (name, response.json())

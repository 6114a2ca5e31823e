"""Firebase ID tokens (user auth) and Google OIDC tokens (task auth), verified by real function processes.

Google's signing-key endpoints cannot be reached here, so the test is its own issuer: it generates RSA
keys, signs RS256 JWTs, and serves the matching x509 certificates (`{kid: pem}`, the format of Google's
endpoints) from a loopback HTTP server that DYLEN_FIREBASE_CERTS_URL / DYLEN_GOOGLE_OIDC_CERTS_URL
point at. Everything after the key fetch is the production code path.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from google.auth import jwt

from tests.support import Stack, StackFactory, lesson_body
from tests.tokens import CertServer, KeyPair

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
        "missing": (None, "Bearer"),
        "not a jwt": ("not-a-token", "Invalid token"),
    }


def _claims(token: str) -> str:
    return json.dumps(jwt.decode(token, verify=False))


@pytest.mark.parametrize(
    "case",
    ["expired", "wrong audience", "wrong issuer", "wrong signature", "unknown key", "missing", "not a jwt"],
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

"""Firebase ID tokens (user auth) and Google OIDC tokens (task auth), verified by real function processes.

Google's signing-key endpoints cannot be reached here, so the test is its own issuer: it generates RSA
keys, signs RS256 JWTs, and serves the matching x509 certificates (`{kid: pem}`, the format of Google's
endpoints) from a loopback HTTP server that DYLEN_FIREBASE_CERTS_URL / DYLEN_GOOGLE_OIDC_CERTS_URL
point at. Everything after the key fetch is the production code path.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

from tests.conftest import StackFactory
from tests.support import Stack, lesson_body

PROJECT = "dylen-test"
INVOKER = "tasks-invoker@dylen-test.iam.gserviceaccount.com"
AUDIENCE = "https://process-job.example.test"


@dataclass
class KeyPair:
    kid: str
    private_pem: bytes
    cert_pem: str
    _signers: dict[str, crypt.RSASigner] = field(default_factory=dict)

    @classmethod
    def generate(cls, kid: str) -> KeyPair:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dylen-test-issuer")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls(kid, private_pem, cert.public_bytes(serialization.Encoding.PEM).decode())

    def sign(self, claims: dict[str, Any], *, kid: str | None = None) -> str:
        kid = kid or self.kid
        if kid not in self._signers:  # loading a private key is slow (it is validated): once per kid
            self._signers[kid] = crypt.RSASigner.from_string(self.private_pem, key_id=kid)
        return jwt.encode(self._signers[kid], claims).decode()


class CertServer(http.server.ThreadingHTTPServer):
    """Serves `{kid: pem}` like Google's x509 endpoints, on a loopback port."""

    def __init__(self, certs: dict[str, str]) -> None:
        body = json.dumps(certs).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path}"


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

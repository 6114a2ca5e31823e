"""Local sign-in through the real Firebase Auth emulator (npm firebase-tools), the way the Firebase
Admin SDK does it: with FIREBASE_AUTH_EMULATOR_HOST set, the functions accept the emulator's unsigned
ID tokens for DYLEN_FIREBASE_PROJECT_ID, and nothing else."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from common.platform.config import load_settings
from common.platform.errors import ConfigError
from tests.support import ROOT, FunctionServer, base_env, free_port, lesson_body, session, stop_all

PROJECT = "demo-dylen-test"  # a demo- project: the emulator never reaches Google for it
FIREBASE = Path(os.environ.get("DYLEN_FIREBASE_BIN") or ROOT / ".tools/firebase/node_modules/.bin/firebase")

needs_emulator = pytest.mark.skipif(
    not FIREBASE.exists() or shutil.which("node") is None,
    reason="the Firebase Auth emulator is not installed: run `make auth-emulator` (needs Node.js and npm)",
)


@pytest.fixture(scope="module")
def auth_emulator() -> Iterator[str]:
    """host:port of a real Auth emulator, on ports of its own."""
    home = Path(tempfile.mkdtemp(prefix="dylen-auth-emulator-"))
    port = free_port()
    config = {
        "emulators": {
            "auth": {"host": "127.0.0.1", "port": port},
            "hub": {"host": "127.0.0.1", "port": free_port()},
            "logging": {"host": "127.0.0.1", "port": free_port()},
            "ui": {"enabled": False},
            "singleProjectMode": True,
        }
    }
    (home / "firebase.json").write_text(json.dumps(config))
    log = open(home / "emulator.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [str(FIREBASE), "emulators:start", "--only", "auth", "--project", PROJECT],
        cwd=home,
        env={**os.environ, "HOME": str(home), "FIREBASE_CLI_DISABLE_UPDATE_CHECK": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    host = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the Auth emulator exited:\n{(home / 'emulator.log').read_text()[-3000:]}")
            try:
                if session().get(f"http://{host}/", timeout=1).status_code < 500:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the Auth emulator did not start:\n{(home / 'emulator.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield host
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


def sign_up(host: str, email: str) -> tuple[str, str]:
    """(uid, ID token) of a new emulator user, through the emulator's Identity Toolkit REST API."""
    response = session().post(
        f"http://{host}/identitytoolkit.googleapis.com/v1/accounts:signUp?key=any-key-works",
        json={"email": email, "password": "correct horse", "returnSecureToken": True},
        timeout=10,
    )
    response.raise_for_status()
    body = response.json()
    return body["localId"], body["idToken"]


def _with_claims(token: str, **claims: object) -> str:
    header, payload, signature = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    decoded.update(claims)
    forged = base64.urlsafe_b64encode(json.dumps(decoded).encode()).decode().rstrip("=")
    return f"{header}.{forged}.{signature}"


@needs_emulator
def test_a_user_signed_in_on_the_emulator_creates_and_reads_their_job(
    auth_emulator: str, database_url: str, logs_dir: Path
) -> None:
    # Given create_job and get_job pointed at the emulator, as the Admin SDK's variable says
    env = base_env(database_url, DYLEN_AUTH_MODE="firebase", DYLEN_FIREBASE_PROJECT_ID=PROJECT)
    env["FIREBASE_AUTH_EMULATOR_HOST"] = auth_emulator
    env["DYLEN_JOBS_AUTO_PROCESS"] = "false"
    servers = [FunctionServer(name, env, logs_dir).start(wait=False) for name in ("create_job", "get_job")]
    for server in servers:
        server.wait_ready()
    create, get = servers
    http = session()
    try:
        # When a user signs up on the emulator and sends its ID token
        uid, token = sign_up(auth_emulator, f"{uuid_hex()}@example.com")
        bearer = {"Authorization": f"Bearer {token}"}
        created = http.post(create.url, json=lesson_body("Emulated sign-in"), headers=bearer, timeout=10)
        # Then the job is theirs, and only their token reads it
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        assert http.get(f"{get.url}/{job_id}", headers=bearer, timeout=10).status_code == 200
        _, other = sign_up(auth_emulator, f"{uuid_hex()}@example.com")
        assert (
            http.get(
                f"{get.url}/{job_id}", headers={"Authorization": f"Bearer {other}"}, timeout=10
            ).status_code
            == 404
        )
        # And tokens for another project, expired ones or no token at all are refused
        for bad in (
            _with_claims(token, aud="someone-else"),
            _with_claims(token, exp=int(time.time()) - 3600),
        ):
            refused = http.get(f"{get.url}/{job_id}", headers={"Authorization": f"Bearer {bad}"}, timeout=10)
            assert refused.status_code == 401, refused.text
        assert http.get(f"{get.url}/{job_id}", timeout=10).status_code == 401
        assert uid and len(uid) <= 128
    finally:
        stop_all(servers)


def uuid_hex() -> str:
    return uuid.uuid4().hex[:12]


def test_the_emulator_is_refused_wherever_real_cloud_tasks_is_configured() -> None:
    real = {
        "DYLEN_FIREBASE_PROJECT_ID": PROJECT,
        "DYLEN_TASK_SERVICE_PROVIDER": "gcp",
        "DYLEN_CLOUD_TASKS_QUEUE_PATH": "projects/p/locations/l/queues/q",
        "DYLEN_PROCESS_JOB_URL": "https://process-job.example.run.app",
        "DYLEN_TASKS_INVOKER_SA": "tasks@p.iam.gserviceaccount.com",
        "FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9099",
    }
    with pytest.raises(ConfigError, match="FIREBASE_AUTH_EMULATOR_HOST"):
        load_settings(real)
    assert load_settings({**real, "CLOUD_TASKS_EMULATOR_HOST": "127.0.0.1:8123"}).firebase_auth_emulator_host

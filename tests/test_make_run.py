"""`make run`'s runner from a clean state: embedded PostgreSQL, every function, the gateway, Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from tests.support import ROOT, free_port, session


def test_runner_serves_a_job_to_done_and_stops_cleanly() -> None:
    # Outside pytest's basetemp, which pytest re-chmods to 0700 (see tests/conftest.py).
    tmp_path = Path(tempfile.mkdtemp(prefix="dylen-test-run-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYLEN_") or k == "DYLEN_ENV_FILE"}
    env.update(
        DYLEN_DEV_DIR=str(tmp_path / "dev"),
        # 0: the runner binds every port itself (the OS picks them) and prints them; nothing can take
        # one between choosing and using it, which a port picked here and handed over could not promise.
        DYLEN_DEV_PORT="0",
        DYLEN_DEV_PG_PORT=str(free_port()),
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                pytest.fail("runner exited early:\n" + "".join(output))
            output.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(output)
        ports = dict(re.findall(r"^  (\w+) +http://localhost:(\d+)/\1 ", text, re.M))
        assert set(ports) >= {"create_job", "get_job", "process_job", "get_lesson"}, text
        (gateway,) = set(ports.values())
        # The printed curl is the one a newcomer copies: run it as printed.
        create = re.search(r"(curl -s -X POST .*?\}\}')", text, re.S)
        assert create, text
        command = create.group(1).replace("\\\n", " ")
        started = time.monotonic()
        created = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
        job_id = re.search(r'"job_id":"([0-9a-f-]+)"', created.stdout)
        assert job_id, created.stdout + created.stderr
        http = session()
        status = None
        # The product promise is "done within two seconds" (measured in bench/RESULTS.md); the bound
        # here is looser because CI machines are shared and a timed assertion would flake.
        while time.monotonic() - started < 30.0:
            status = http.get(
                f"http://localhost:{gateway}/get_job/{job_id.group(1)}",
                headers={"X-Dylen-User": "demo"},
                timeout=5,
            ).json()
            if status["status"] == "done":
                break
            time.sleep(0.05)
        assert status and status["status"] == "done", status
        lesson = http.get(
            f"http://localhost:{gateway}/get_lesson/{status['result']['lesson_id']}",
            headers={"X-Dylen-User": "demo"},
            timeout=5,
        )
        assert lesson.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "Stopped every function and the embedded database." in rest
    # Nothing of this run may outlive it (postgres backends may take a moment to exit).
    deadline = time.monotonic() + 10
    while True:
        leftovers = subprocess.run(["pgrep", "-af", str(tmp_path)], capture_output=True, text=True).stdout
        if not leftovers.strip() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    pg_log = tmp_path / "dev" / "pgdata.log"
    assert leftovers.strip() == "", rest + (pg_log.read_text()[-3000:] if pg_log.exists() else "")
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_one_function_runs_under_a_bare_functions_framework_without_pythonpath(database_url: str) -> None:
    """The README's way to run one function: the venv's `functions-framework` script, no PYTHONPATH
    (the Makefile installs the project in editable mode), from the repository root."""
    script = Path(sys.executable).parent / "functions-framework"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYLEN_") and k != "PYTHONPATH"}
    env.update(
        DYLEN_ENV_FILE=os.devnull,
        DYLEN_AUTH_MODE="dev",
        DYLEN_DATABASE_URL=database_url,
        DYLEN_JOBS_AUTO_PROCESS="false",
    )
    proc = subprocess.Popen(
        [
            str(script),
            "--target",
            "create_job",
            "--source",
            "functions/create_job/main.py",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        http = session()
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")[-3000:]
            try:
                created = http.post(
                    f"http://127.0.0.1:{port}/",
                    json={"job_kind": "lesson", "idempotency_key": "bare-ff", "payload": {"topic": "Tides"}},
                    headers={"X-Dylen-User": "bare-ff"},
                    timeout=5,
                )
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "functions-framework did not listen within 30 s"
                time.sleep(0.1)
        assert created.status_code in (200, 202), created.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)


def test_every_documented_functions_framework_command_binds_loopback() -> None:
    # functions-framework listens on every interface unless told; with dev auth that is everyone.
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    commands = [
        line
        for doc in docs
        for line in doc.read_text().splitlines()
        if "functions-framework --target" in line
    ]
    assert commands, "the docs show how to run one function"
    assert [c for c in commands if "--host 127.0.0.1" not in c] == []

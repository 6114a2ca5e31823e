"""`make run`'s gateway as a newcomer meets it: `/`, the Swagger UI at `/docs` (also in a real browser),
bounded reads against clients that stop mid-request, and Ctrl-C during start-up.

One `python -m devtools.run` serves the module, on the test database, with every port chosen by the
OS (DYLEN_DEV_PORT=0) and a short read bound so the slow-client tests stay quick.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support import ROOT, session

READ_TIMEOUT = 2.0  # DYLEN_DEV_READ_TIMEOUT_SECONDS for this module's runner
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _runner_env(dev_dir: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYLEN_") or k == "DYLEN_ENV_FILE"}
    env.update(DYLEN_DEV_DIR=str(dev_dir), DYLEN_DEV_PORT="0", DYLEN_DATABASE_URL=database_url, **extra)
    return env


def _processes_with(marker: str) -> list[str]:
    """Processes whose environment holds `marker` (every process the runner starts inherits it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def gateway(database_url: str) -> Iterator[str]:
    dev_dir = Path(tempfile.mkdtemp(prefix="dylen-test-gateway-"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.run"],
        cwd=ROOT,
        env=_runner_env(dev_dir, database_url, DYLEN_DEV_READ_TIMEOUT_SECONDS=str(READ_TIMEOUT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                pytest.fail("runner exited early:\n" + "".join(output))
            output.append(line)
            if "Ctrl-C stops everything" in line:
                break
        docs = re.search(r"API docs .*?: (http://localhost:\d+)/docs", "".join(output))
        assert docs, "".join(output)
        yield docs.group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def test_root_lists_the_functions_and_links_the_docs(gateway: str) -> None:
    response = session().get(gateway + "/", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert 'href="/docs"' in response.text
    for name in ("create_job", "get_job", "get_lesson", "list_lessons", "cancel_job"):
        assert f"{gateway}/{name}</code>" in response.text


def test_docs_page_its_assets_and_the_spec_load_from_the_gateway(gateway: str) -> None:
    http = session()
    page = http.get(gateway + "/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="(/docs/[^"]+)"', page.text)
    assert {"/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"} <= set(assets)
    for path in assets:  # everything the page needs comes from here: it works offline
        asset = http.get(gateway + path, timeout=10)
        assert asset.status_code == 200 and len(asset.content) > 100, path
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text), "the page loads something remote"
    assert http.get(gateway + "/docs/bundle.js", timeout=10).status_code == 404
    assert http.get(gateway + "/docs/..%2f..%2fopenapi.yaml", timeout=10).status_code == 404
    spec = http.get(gateway + "/docs/openapi.json", timeout=10).json()
    # "Try it out" calls the gateway the page came from, with the spec's devUser scheme prefilled.
    assert spec["servers"][0]["url"] == gateway
    assert spec["components"]["securitySchemes"]["devUser"]["name"] == "X-Dylen-User"
    assert '"devUser"' in page.text
    assert set(spec["paths"]) >= {"/create_job", "/get_job/{job_id}", "/list_lessons"}


def test_docs_create_a_job_in_a_real_browser(gateway: str) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install chromium`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            remote: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(gateway) else remote.append(r.url))
            page.goto(gateway + "/docs", wait_until="load")
            operation = page.locator("#operations-default-create_job")
            operation.locator(".opblock-summary").click()
            try_it = operation.locator("button.try-out__btn")
            if try_it.count() and "Cancel" not in try_it.inner_text():
                try_it.click()
            key = f"browser-{uuid.uuid4().hex[:8]}"
            operation.locator("textarea.body-param__text").fill(
                json.dumps({"job_kind": "lesson", "idempotency_key": key, "payload": {"topic": "Tides"}})
            )
            with page.expect_response(lambda r: r.url == f"{gateway}/create_job") as answer:
                operation.locator("button.execute").click()
            response = answer.value
            assert response.status == 202, response.text()
            assert response.request.headers.get("x-dylen-user") == "demo"  # dev auth was prefilled
            assert response.json()["status"] == "queued"
            status = operation.locator(".live-responses-table tbody .response-col_status").first
            assert status.inner_text(timeout=10_000).strip().startswith("202")
            assert remote == [], f"the docs page fetched from elsewhere: {remote}"
        finally:
            browser.close()


def _closed_within(sock: socket.socket, limit: float) -> float:
    """Seconds until the peer closed `sock` (fails past `limit`)."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the gateway kept a stalled connection open for more than {limit}s")
    return time.monotonic() - started


def _connect(gateway: str) -> socket.socket:
    port = int(gateway.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_client_that_stops_mid_request_line_is_cut_off_while_others_are_served(gateway: str) -> None:
    stalled = [_connect(gateway) for _ in range(20)]
    for sock in stalled:
        sock.sendall(b"GET /list_lessons HTT")
    try:
        # Others keep being served meanwhile.
        response = session().get(gateway + "/list_lessons", headers={"X-Dylen-User": "demo"}, timeout=5)
        assert response.status_code == 200, response.text
        took = _closed_within(stalled[0], READ_TIMEOUT + 5)
        assert took <= READ_TIMEOUT + 3
        for sock in stalled[1:]:
            _closed_within(sock, 3)
    finally:
        for sock in stalled:
            sock.close()


def test_a_client_that_trickles_its_headers_is_cut_off_at_the_bound(gateway: str) -> None:
    """A byte every half second resets any per-read timeout; the whole head is bounded all the same."""
    sock = _connect(gateway)
    stop = threading.Event()

    def trickle() -> None:
        for byte in b"POST /create_job HTTP/1.1\r\nHost: x\r\nX-Dylen-User: demo\r\nX-Padding: " + b"a" * 100:
            if stop.wait(0.5):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    sender = threading.Thread(target=trickle, daemon=True)
    started = time.monotonic()
    sender.start()
    try:
        _closed_within(sock, READ_TIMEOUT + 5)
        assert time.monotonic() - started <= READ_TIMEOUT + 3
    finally:
        stop.set()
        sender.join(5)
        sock.close()


def test_a_body_shorter_than_its_content_length_is_cut_off(gateway: str) -> None:
    sock = _connect(gateway)
    try:
        sock.sendall(
            b"POST /create_job HTTP/1.1\r\nHost: x\r\nX-Dylen-User: demo\r\n"
            b'Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"job_kind"'
        )
        assert _closed_within(sock, READ_TIMEOUT + 5) <= READ_TIMEOUT + 3
    finally:
        sock.close()


@pytest.mark.parametrize("after", ["Migrating ...", "Starting 8 functions ..."])
def test_ctrl_c_during_start_up_stops_everything_promptly(database_url: str, after: str) -> None:
    dev_dir = Path(tempfile.mkdtemp(prefix="dylen-test-ctrl-c-"))
    marker = f"DYLEN_DEV_DIR={dev_dir}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.run"],
        cwd=ROOT,
        env=_runner_env(dev_dir, database_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job is
    )
    output: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if line.startswith(after.split(" ")[0]):
                break
        else:
            pytest.fail("runner exited before the step:\n" + "".join(output))
        if after.startswith("Starting"):
            time.sleep(0.1)  # the functions are importing now
        assert proc.poll() is None, "".join(output)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        sent = time.monotonic()
        rest, _ = proc.communicate(timeout=15)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = "".join(output) + rest
    assert proc.returncode == 130, text
    assert took < 5, f"took {took:.1f}s to stop:\n{text}"
    assert "Ctrl-C stops everything" not in text, text
    deadline = time.monotonic() + 3
    while (left := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], text


def test_the_dashboard_is_served_under_its_name_with_relative_links(gateway: str) -> None:
    http = session()
    page = http.get(gateway + "/dashboard/", headers={"Accept": "text/html"}, timeout=10)
    assert page.status_code == 200 and "Overview" in page.text and "dev-operator@localhost" in page.text
    assert 'href="jobs"' in page.text  # relative: the same pages work at / behind the gcloud proxy
    assert http.get(gateway + "/dashboard/jobs", timeout=10).status_code == 200


def test_a_client_that_asks_to_close_is_told_so_and_never_meets_a_closed_connection(gateway: str) -> None:
    # Given an HTTP/1.1 client that pools connections and asks the gateway to close each one
    http = requests.Session()
    http.trust_env = False
    http.headers["Connection"] = "close"
    # When it sends many requests in a row, to a function and to the gateway's own pages
    answers = [
        http.get(gateway + ("/list_lessons" if i % 2 else "/"), headers={"X-Dylen-User": "c"}, timeout=10)
        for i in range(100)
    ]
    # Then every answer says the connection closes, so none is reused after the gateway closed it
    assert {a.status_code for a in answers} == {200}
    assert {a.headers.get("Connection") for a in answers} == {"close"}

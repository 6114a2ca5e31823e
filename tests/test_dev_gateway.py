"""`make run`'s gateway as a newcomer meets it: `/`, the Swagger UI at `/docs` (also in a real browser),
bounded reads against clients that stop mid-request, only its own Host names answered (DNS
rebinding), and Ctrl-C during start-up.

One `python -m devtools.run` serves the module, on the test database, with every port chosen by the
OS (DYLEN_DEV_PORT=0), a short read bound so the slow-client tests stay quick, and one extra name
allowed (EXTRA_HOST).
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
from typing import Any

import pytest
import requests

from tests.browser import CHROMIUM, CHROMIUM_ARGS, need_chromium, screenshot
from tests.support import ROOT, session

READ_TIMEOUT = 2.0  # DYLEN_DEV_READ_TIMEOUT_SECONDS for this module's runner
EXTRA_HOST = "dylen.test"  # DYLEN_DEV_ALLOWED_HOSTS for this module's runner


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
        env=_runner_env(
            dev_dir,
            database_url,
            DYLEN_DEV_READ_TIMEOUT_SECONDS=str(READ_TIMEOUT),
            DYLEN_DEV_ALLOWED_HOSTS=f" {EXTRA_HOST.upper()} ,",  # case and blanks do not matter
        ),
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


def test_root_lists_the_functions_and_links_the_docs_and_the_dashboard(gateway: str) -> None:
    response = session().get(gateway + "/", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert 'href="/docs"' in response.text and 'href="/dashboard/"' in response.text
    assert "<style>" in response.text and "the built-in template" in response.text
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
    need_chromium()
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


def _port(gateway: str) -> int:
    return int(gateway.rsplit(":", 1)[1])


def _connect(gateway: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(gateway)), timeout=5)


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

    head = f"POST /create_job HTTP/1.1\r\nHost: 127.0.0.1:{_port(gateway)}\r\nX-Dylen-User: demo\r\n"

    def trickle() -> None:
        for byte in head.encode() + b"X-Padding: " + b"a" * 100:
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
            f"POST /create_job HTTP/1.1\r\nHost: localhost:{_port(gateway)}\r\nX-Dylen-User: demo\r\n".encode()
            + b'Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"job_kind"'
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


# --- issue 30: only its own Host names (DNS rebinding) ----------------------------------------------


def _with_host(
    gateway: str, host: str, path: str = "/", method: str = "GET", **kwargs: Any
) -> requests.Response:
    """A request to the gateway (over 127.0.0.1) that says `host` in its Host header, as a browser
    does for whatever name it resolved to the gateway's address."""
    http = session()
    try:
        headers = {"Host": host, "X-Dylen-User": "demo"}
        return http.request(method, gateway + path, headers=headers, timeout=10, **kwargs)
    finally:
        http.close()


@pytest.mark.parametrize(
    "host",
    ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LocalHost:{port}", EXTRA_HOST + ":{port}"],
)
def test_loopback_names_and_the_listed_one_are_served_on_the_gateways_port(gateway: str, host: str) -> None:
    host = host.format(port=_port(gateway))
    assert _with_host(gateway, host).status_code == 200
    lessons = _with_host(gateway, host, "/list_lessons")
    assert lessons.status_code == 200, lessons.text


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",  # a rebinding page on port 80 ...
        "evil.example:{port}",  # ... or on the gateway's own port
        "localhost",  # port 80 implied: not the gateway's
        "localhost:{other}",
        "127.0.0.1:{other}",
        "[::1]:{other}",
        EXTRA_HOST + ":{other}",
        EXTRA_HOST + ".evil.example:{port}",
        "localhost.:{port}",
        "127.0.0.2:{port}",
        "localhost:{port}@evil.example",
    ],
)
def test_any_other_host_is_403_and_told_how_to_allow_a_name(gateway: str, host: str) -> None:
    port = _port(gateway)
    host = host.format(port=port, other=port + 1 if port < 65535 else port - 1)
    for method, path in (
        ("GET", "/"),
        ("GET", "/docs/openapi.json"),
        ("GET", "/dashboard/"),
        ("POST", "/create_job"),
    ):
        refused = _with_host(gateway, host, path, method)
        assert refused.status_code == 403, (method, path, refused.text)
        assert refused.headers["Content-Type"].startswith("text/plain")
        assert refused.headers["Connection"] == "close"  # a POST's body was never read
        assert "To allow a name, add it to DYLEN_DEV_ALLOWED_HOSTS" in refused.text, refused.text


def test_a_dns_rebinding_page_can_neither_read_the_dashboard_nor_create_a_job(gateway: str) -> None:
    # Given a page from evil.example whose name now resolves to 127.0.0.1: its requests are same-origin
    # to it, and carry its own name as the Host
    rebound = f"evil.example:{_port(gateway)}"
    # When it reads the dashboard (for its CSRF token) and creates a job
    page = _with_host(gateway, rebound, "/dashboard/")
    key = f"rebinding-{uuid.uuid4().hex[:8]}"
    body = {"job_kind": "lesson", "idempotency_key": key, "payload": {"topic": "Tides"}}
    created = _with_host(gateway, rebound, "/create_job", "POST", json=body)
    # Then both are refused, and nothing reached the function: the same key is new to it
    assert page.status_code == 403 and "csrf" not in page.text.lower()
    assert created.status_code == 403
    first = _with_host(gateway, f"localhost:{_port(gateway)}", "/create_job", "POST", json=body)
    assert first.status_code == 202, first.text


def test_a_request_without_exactly_one_host_is_400(gateway: str) -> None:
    port = _port(gateway)
    for head in (
        b"GET / HTTP/1.0\r\n\r\n",
        f"GET / HTTP/1.1\r\nHost: localhost:{port}\r\nHost: evil.example\r\n\r\n".encode(),
    ):
        sock = _connect(gateway)
        try:
            sock.sendall(head)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b"exactly one Host" in answer


def test_the_gateway_answers_over_ipv6_loopback_as_localhost_may_resolve_there(gateway: str) -> None:
    try:
        socket.create_connection(("::1", _port(gateway)), timeout=5).close()
    except OSError as error:
        pytest.skip(f"no IPv6 loopback here ({error}); the [::1] Host is checked over 127.0.0.1 above")
    http = session()
    try:
        answer = http.get(
            f"http://[::1]:{_port(gateway)}/list_lessons", headers={"X-Dylen-User": "demo"}, timeout=10
        )
    finally:
        http.close()
    assert answer.status_code == 200, answer.text  # its Host was [::1]:<port>, as a browser's would be


@pytest.mark.parametrize("listed", ["localhost:8080", "evil example", "http://dylen.test"])
def test_a_wrong_allowed_hosts_value_stops_the_runner_before_anything_starts(
    database_url: str, tmp_path: Path, listed: str
) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "devtools.run"],
        cwd=ROOT,
        env=_runner_env(tmp_path, database_url, DYLEN_DEV_ALLOWED_HOSTS=f"dylen.test,{listed}"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 1, finished
    assert f"DYLEN_DEV_ALLOWED_HOSTS: {listed!r} is not a host name" in finished.stderr, finished.stderr
    assert "Migrating" not in finished.stdout


def test_the_dashboard_without_its_slash_is_redirected_to_it(gateway: str) -> None:
    # Its links are relative: served at /dashboard they would resolve to /jobs and /assets/...
    for path, target in (
        ("/dashboard", "/dashboard/"),
        ("/dashboard?status=error", "/dashboard/?status=error"),
    ):
        answer = session().get(
            gateway + path, headers={"Accept": "text/html"}, allow_redirects=False, timeout=10
        )
        assert answer.status_code == 308 and answer.headers["Location"] == target, (path, answer.text[:300])
    assert session().get(gateway + "/dashboard", timeout=10).url == gateway + "/dashboard/"


def _banner(**env: str) -> str:
    from devtools import run

    ports = {name: 9000 + i for i, name in enumerate(run.FUNCTIONS)}
    base_env = {"DYLEN_DATABASE_URL": "postgresql://x@127.0.0.1/dylen", "DYLEN_TASK_SECRET": "s3cret"}
    return run.banner(base="http://localhost:8080", ports=ports, env={**base_env, **env})


def test_the_banner_says_which_auth_serves_and_prints_requests_that_work_with_it() -> None:
    dev = _banner(DYLEN_AUTH_MODE="dev")
    assert "dev auth" in dev and "-H 'X-Dylen-User: demo'" in dev
    firebase = _banner(DYLEN_AUTH_MODE="firebase", DYLEN_FIREBASE_PROJECT_ID="my-project")
    assert "dev auth" not in firebase and "X-Dylen-User" not in firebase and "dev-operator" not in firebase
    assert '-H "Authorization: Bearer $TOKEN"' in firebase and "my-project" in firebase
    assert "DYLEN_DASHBOARD_OPERATORS" in firebase  # who may open the dashboard in this mode


def test_the_dashboard_without_its_slash_opens_styled_in_a_browser(gateway: str) -> None:
    need_chromium()
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            failed: list[str] = []
            page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
            page.goto(gateway + "/")
            screenshot(page, "landing")
            page.click("text=Operator dashboard")
            page.goto(gateway + "/dashboard")  # as typed, no slash
            assert page.url == gateway + "/dashboard/"
            # styled: the stylesheet loaded and applies (the nav's dark background)
            background = page.locator("nav").evaluate("e => getComputedStyle(e).backgroundColor")
            assert background == "rgb(17, 24, 39)", background
            page.click("nav a[href='jobs']")
            expect(page.locator("h1")).to_have_text("Jobs")
            assert page.url.startswith(gateway + "/dashboard/jobs")
            screenshot(page, "dashboard-under-make-run")
            assert failed == []
        finally:
            browser.close()


def _listening(port: int) -> set[str]:
    """The local addresses sockets listen on at `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    words = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, 32, 8))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def test_make_run_listens_on_loopback_only(gateway: str) -> None:
    # With dev auth whoever reaches a port is any user and the operator: nothing may listen beyond.
    landing = session().get(gateway + "/", timeout=10).text
    ports = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)/", landing)]
    assert len(ports) >= 9
    for port in [int(gateway.rsplit(":", 1)[1]), *ports]:
        assert _listening(port) and _listening(port) <= {"127.0.0.1", "::1"}, (port, _listening(port))

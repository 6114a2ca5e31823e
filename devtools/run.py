"""`make run`: the whole product on this machine, from a fresh clone.

Starts embedded PostgreSQL (unless DYLEN_DATABASE_URL is set), migrates, starts every function
under functions-framework on its own port with dev auth and a generated task secret, and a small
gateway on :8080 that routes /<function>/... like the cloudfunctions.net URLs do, serves the API
docs at /docs and lists the functions at /. Ctrl-C stops all, also during start-up.

The gateway answers only requests whose Host is localhost, 127.0.0.1 or [::1] (or a name listed in
DYLEN_DEV_ALLOWED_HOSTS) with its own port, 403 otherwise: with dev auth anyone who reaches it is a
user or the operator, and a web page can reach it by DNS rebinding (its own name, resolved to
127.0.0.1), where the Host header still carries that page's name.

Every port is bound here before anything starts: the gateway's (DYLEN_DEV_PORT, 0 = any free one)
and one per function (the next free ports after the gateway's, or any free ones with 0), each handed
to its function as an open socket (devtools/serve_socket.py), so no port can be taken in between.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import http.server
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from devtools import apidocs

ROOT = Path(__file__).resolve().parent.parent
# Every function folder, user-facing ones first so their ports stay stable as functions are added.
_FIRST = ("create_job", "get_job", "process_job", "get_lesson", "list_lessons", "cancel_job")
FUNCTIONS = tuple(
    sorted(
        (p.name for p in (ROOT / "functions").iterdir() if (p / "main.py").is_file()),
        key=lambda name: (_FIRST.index(name) if name in _FIRST else len(_FIRST), name),
    )
)
DEV_DIR = Path(os.environ.get("DYLEN_DEV_DIR") or ROOT / ".dev")
# Local serving only (on Cloud Run the Google front end terminates HTTP): a client gets this long to
# send a request's head and body, and each socket read or write this long, so a client that sends
# part of a request and stops (slowloris) cannot hold a gateway thread.
READ_TIMEOUT = float(os.environ.get("DYLEN_DEV_READ_TIMEOUT_SECONDS") or 10)
# The longest a forwarded request may wait on its function for each read (then 504).
UPSTREAM_TIMEOUT = float(os.environ.get("DYLEN_DEV_UPSTREAM_TIMEOUT_SECONDS") or 120)
MAX_BODY = 1 << 20  # the functions refuse more than 64 KiB; the gateway never buffers more than this
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
PAGE_FUNCTIONS = ("dashboard",)  # served at /<name>/ (with the slash) for their relative links
ALLOWED_HOSTS_VAR = "DYLEN_DEV_ALLOWED_HOSTS"
# A DNS name or IPv4 address (lower case), or a bracketed IPv6 address: never a port.
_HOST_NAME = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$|^\[[0-9a-f:.]+\]$"
)


def allowed_hosts(listed: str | None) -> tuple[str, ...]:
    """The names the gateway answers: loopback's, then those DYLEN_DEV_ALLOWED_HOSTS lists."""
    names = list(LOOPBACK_HOSTS)
    for entry in (listed or "").split(","):
        name = entry.strip().lower()
        if not name:
            continue
        if not _HOST_NAME.match(name):
            raise SystemExit(
                f"{ALLOWED_HOSTS_VAR}: {entry.strip()!r} is not a host name; list names without a port,"
                " comma-separated (e.g. dylen.localhost,devbox.test)"
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_function_ports(names: tuple[str, ...], after: int) -> dict[str, socket.socket]:
    """One listening socket per function: the first free ports after `after`, or (after=0) any."""
    sockets: dict[str, socket.socket] = {}
    candidate = after
    try:
        for name in names:
            while True:
                if after == 0:
                    sockets[name] = _listen(0)
                    break
                candidate += 1
                if candidate > 65535:
                    raise SystemExit(f"no free port after {after} for {name}: set DYLEN_DEV_PORT=0")
                try:
                    sockets[name] = _listen(candidate)
                    break
                except OSError as error:
                    if error.errno != errno.EADDRINUSE:
                        raise
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    return sockets


def _wait_ready(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 60) -> None:
    """Until the function answers HTTP. (Connecting proves nothing: the socket listens from the
    start, and connections wait in its backlog until gunicorn's worker accepts them.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited during start-up; see {DEV_DIR / (name + '.log')}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("OPTIONS", "/")
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.1)
        finally:
            conn.close()
    raise SystemExit(f"{name} did not answer on port {port} within {timeout}s")


class _IPv6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


class Gateway:
    """Routes /<function>/... to the function's port; / lists them, /docs is Swagger UI.

    Bound at construction (so its port is known before the functions start), served by `start()`.
    """

    def __init__(self, port: int, hosts: tuple[str, ...] = LOOPBACK_HOSTS) -> None:
        self.routes: dict[str, int] = {}
        self.about: dict[str, str] = {}  # the landing page's auth and generator lines
        self.serving = False
        handler = self._handler_class()
        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise SystemExit(
                    f"port {port} is in use (another `make run`?): set DYLEN_DEV_PORT to another port,"
                    " or to 0 for any free one"
                ) from error
            raise
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.hosts = hosts
        # The Host values a browser sends for these names on this port (it leaves out port 80).
        self.host_values = frozenset(
            [f"{name}:{self.port}" for name in hosts] + (list(hosts) if self.port == 80 else [])
        )
        self.servers: list[http.server.ThreadingHTTPServer] = [self.server]
        # `localhost` may resolve to ::1 first; answer there too where IPv6 loopback exists.
        with contextlib.suppress(OSError):
            server6 = _IPv6Server(("::1", self.port), handler)
            server6.daemon_threads = True
            self.servers.append(server6)

    def start(self, routes: dict[str, int]) -> None:
        self.routes.update(routes)
        self.serving = True
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        for server in self.servers:
            if self.serving:
                server.shutdown()  # waits for serve_forever, so only once it runs
            server.server_close()

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = READ_TIMEOUT  # every socket read and write (StreamRequestHandler applies it)
            read_deadline: threading.Timer | None = None

            def handle_one_request(self) -> None:
                # The whole head and body within READ_TIMEOUT: a client trickling a byte at a time
                # would otherwise reset the per-read timeout forever. Cancelled once the body is in.
                self.read_deadline = threading.Timer(READ_TIMEOUT, self.cut_off)
                self.read_deadline.daemon = True
                self.read_deadline.start()
                try:
                    super().handle_one_request()
                finally:
                    self.read_deadline.cancel()

            def cut_off(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def end_headers(self) -> None:
                # Say so when this connection closes after the answer (the client asked, or we
                # refuse more): an HTTP/1.1 client otherwise pools it and its next request meets
                # the closed socket.
                if self.close_connection:
                    self.send_header("Connection", "close")
                super().end_headers()

            def reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def host_refused(self) -> bool:
                """Answers (and closes) a request without exactly one Host that the gateway serves."""
                values = self.headers.get_all("Host") or []
                if len(values) == 1 and values[0].strip().lower() in gateway.host_values:
                    return False
                self.close_connection = True  # its body, if any, is never read
                if len(values) != 1:
                    self.reply(400, b"send exactly one Host header\n", "text/plain; charset=utf-8")
                    return True
                served = ", ".join(f"{name}:{gateway.port}" for name in gateway.hosts)
                body = (
                    f"Host {values[0][:100]!r} is not served here: this make run gateway answers only"
                    f" {served} (against DNS rebinding).\n"
                    f"To allow a name, add it to {ALLOWED_HOSTS_VAR} (comma-separated, without the port)"
                    " and restart make run.\n"
                )
                self.reply(403, body.encode(), "text/plain; charset=utf-8")
                return True

            def origin(self) -> str:
                return apidocs.gateway_origin(self.headers.get("Host"), f"http://localhost:{gateway.port}")

            def local_page(self, path: str) -> bool:
                """/, /docs and its files; False when the path is a function's."""
                if self.command not in ("GET", "HEAD"):
                    return False
                if path == "/":
                    page = apidocs.index_html(gateway.routes, self.origin(), **gateway.about)
                    self.reply(200, page, "text/html; charset=utf-8")
                elif path in ("/docs", "/docs/"):
                    if apidocs.assets_available():
                        self.reply(200, apidocs.docs_html(), "text/html; charset=utf-8")
                    else:
                        self.reply(503, apidocs.MISSING_ASSETS.encode(), "text/plain; charset=utf-8")
                elif path == apidocs.SPEC_URL:
                    self.reply(200, apidocs.spec_json(self.origin()), "application/json")
                elif path.startswith("/docs/"):
                    found = apidocs.asset(path.removeprefix("/docs/"))
                    if found is None:
                        self.reply(404, b"not found\n", "text/plain; charset=utf-8")
                    else:
                        self.reply(200, *found)
                else:
                    return False
                return True

            def forward(self) -> None:
                if self.host_refused():
                    return
                path = urlsplit(self.path)
                if self.local_page(path.path):
                    return
                name, slash, rest = path.path.lstrip("/").partition("/")
                if name in PAGE_FUNCTIONS and not slash and self.command in ("GET", "HEAD"):
                    # Its links are relative: at /dashboard they would resolve to /jobs, /assets/...
                    self.send_response(308)
                    self.send_header("Location", f"/{name}/" + (f"?{path.query}" if path.query else ""))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                target = gateway.routes.get(name)
                if target is None:
                    body = (
                        f"unknown function {name!r}; try one of {', '.join(gateway.routes)} "
                        f"(or see {self.origin()}/ and {self.origin()}/docs)\n"
                    ).encode()
                    self.reply(404, body, "text/plain; charset=utf-8")
                    return
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    self.close_connection = True
                    self.reply(
                        411, b"the local gateway needs a Content-Length\n", "text/plain; charset=utf-8"
                    )
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if length < 0 or length > MAX_BODY:
                    self.close_connection = True
                    self.reply(
                        413 if length > 0 else 400, b"bad Content-Length\n", "text/plain; charset=utf-8"
                    )
                    return
                payload = self.rfile.read(length) if length else None
                if payload is not None and len(payload) < length:
                    self.close_connection = True  # cut off (timeout) or the client went away
                    return
                if self.read_deadline is not None:
                    self.read_deadline.cancel()  # the request is in; the function's time is its own
                forward_path = "/" + rest + (f"?{path.query}" if path.query else "")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream = http.client.HTTPConnection("127.0.0.1", target, timeout=UPSTREAM_TIMEOUT)
                try:
                    upstream.request(self.command, forward_path, body=payload, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                except TimeoutError:
                    self.reply(
                        504, f"{name} did not answer within {UPSTREAM_TIMEOUT:g}s\n".encode(), "text/plain"
                    )
                    return
                except OSError as error:
                    self.reply(502, f"{name} is unreachable ({error})\n".encode(), "text/plain")
                    return
                finally:
                    upstream.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in (
                        "connection",
                        "transfer-encoding",
                        "content-length",
                        "server",
                        "date",
                    ):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = forward

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


def _warm_up(ports: dict[str, int], secret: str) -> None:
    """One harmless request each, so the first real job does not pay the database connect."""
    import uuid

    import requests

    http = requests.Session()
    http.trust_env = False
    probe = str(uuid.UUID(int=0))  # the nil id: process_job answers it as a probe, without a warning
    try:
        http.post(
            f"http://127.0.0.1:{ports['process_job']}/",
            json={"job_id": probe},
            headers={"X-Dylen-Task-Secret": secret},
            timeout=30,
        )
        for name in ("get_job", "get_lesson"):
            http.get(
                f"http://127.0.0.1:{ports[name]}/{probe}", headers={"X-Dylen-User": "warm-up"}, timeout=30
            )
        http.get(
            f"http://127.0.0.1:{ports['list_lessons']}/", headers={"X-Dylen-User": "warm-up"}, timeout=30
        )
    except requests.RequestException as error:
        print(f"warning: warm-up request failed ({error}); functions will warm on first use", flush=True)


BUILT_IN_GENERATOR = "the built-in template generator (offline; it never fails)"


def generator_name(env: dict[str, str]) -> str:
    return env.get("DYLEN_LESSON_GENERATOR") or BUILT_IN_GENERATOR


def banner(*, base: str, ports: dict[str, int], env: dict[str, str]) -> str:
    """What `make run` prints once everything answers: the URLs, and requests to copy that work
    with the auth the functions serve (dev: X-Dylen-User; firebase: a bearer token)."""
    dev = env.get("DYLEN_AUTH_MODE", "dev") == "dev"
    if dev:
        who = "dev auth: any X-Dylen-User is trusted; every port listens on loopback only"
        user = "-H 'X-Dylen-User: demo'"
    else:
        who = f"Firebase auth, project {env.get('DYLEN_FIREBASE_PROJECT_ID', '(unset)')}: users send an ID token"
        user = '-H "Authorization: Bearer $TOKEN"'
    lines = [f"\ndylen-jobs is running ({who}).\n"]
    for name in FUNCTIONS:
        lines.append(f"  {name:<15} {base}/{name}   (direct: http://127.0.0.1:{ports[name]}/)")
    lines.append(f"\nAPI docs (Swagger UI, try it out): {base}/docs   Functions: {base}/")
    if "dashboard" in ports:
        if dev:
            lines.append(f"Operator dashboard (dev auth: you are dev-operator@localhost): {base}/dashboard/")
        else:
            lines.append(
                f"Operator dashboard: {base}/dashboard/ (a Google ID token of an e-mail on"
                " DYLEN_DASHBOARD_OPERATORS, as Authorization: Bearer)"
            )
    lines.append(f"Lesson generator: {generator_name(env)}")
    if "DYLEN_LESSON_GENERATOR" not in env:
        lines.append(
            "  (to make failures and watch a retry: DYLEN_LESSON_GENERATOR=devtools.generators:fanout make run;"
            ' the README\'s "Make a failure and watch it")'
        )
    lines.append(f"Logs: {DEV_DIR}/<function>.log   Database: {env['DYLEN_DATABASE_URL']}\n")
    if not dev:
        lines.append("Set TOKEN to a Firebase ID token of a user (docs/DEVELOPMENT.md: the Auth emulator).")
    lines.append("Create a lesson job:")
    lines.append(
        f"  curl -s -X POST {base}/create_job {user} -H 'Content-Type: application/json' \\\n"
        '    -d \'{"job_kind": "lesson", "idempotency_key": "demo-1", '
        '"payload": {"topic": "Photosynthesis", "depth": "detailed"}}\''
    )
    lines.append("Read it (use the job_id from the answer, or the Location header):")
    lines.append(f"  curl -s {base}/get_job/<job_id> {user}")
    lines.append("Then the lesson (result.lesson_id) and the list:")
    lines.append(f"  curl -s {base}/get_lesson/<lesson_id> {user}")
    lines.append(f"  curl -s {base}/list_lessons {user}")
    scheduled = [name for name in ("archive_lessons", "rescue_jobs") if name in FUNCTIONS]
    if scheduled:
        # Dev only: the secret is generated for this run, and task endpoints accept nothing else here.
        lines.append("Run a scheduled function now (Cloud Scheduler calls them in production):")
        for name in scheduled:
            lines.append(
                f"  curl -s -X POST {base}/{name} -H 'X-Dylen-Task-Secret: {env['DYLEN_TASK_SECRET']}'"
            )
    lines.append("Operator commands (python -m common.cli jobs retry, ...) reach this run with:")
    lines.append(
        f"  export DYLEN_DATABASE_URL={env['DYLEN_DATABASE_URL']} "
        f"DYLEN_PROCESS_JOB_URL={base}/process_job DYLEN_TASK_SECRET={env['DYLEN_TASK_SECRET']}"
    )
    return "\n".join(lines)


class Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    """Ctrl-C (SIGINT) or SIGTERM arrived during start-up."""


def main() -> int:
    started = threading.Event()
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        # Installed first thing, whatever the parent left (a shell may start us with SIGINT ignored):
        # during start-up it unwinds whatever is running, afterwards it ends the wait below.
        first = not stop.is_set()
        stop.set()
        if first and not started.is_set():  # a second one must not cut the clean-up short
            raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    hosts = allowed_hosts(os.environ.get(ALLOWED_HOSTS_VAR))  # a wrong value stops us before anything starts

    sys.path.insert(0, str(ROOT))
    DEV_DIR.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("DYLEN_AUTH_MODE", "dev")
    env.setdefault("DYLEN_TASK_SECRET", secrets.token_urlsafe(24))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"

    pg = None
    gateway: Gateway | None = None
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    sockets: dict[str, socket.socket] = {}

    def shutdown(grace: float = 10.0) -> None:
        if gateway is not None:
            gateway.stop()
        for sock in sockets.values():
            sock.close()
        for _name, proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)  # gunicorn's quick shutdown
        deadline = time.monotonic() + grace
        for _name, proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            # Each function runs in its own session (pgid = its pid): this also takes its workers.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if pg is not None:
            pg.stop()

    try:
        gateway = Gateway(int(os.environ.get("DYLEN_DEV_PORT", "8080")), hosts)
        env["DYLEN_BASE_URL"] = env.get("DYLEN_BASE_URL") or f"http://localhost:{gateway.port}"
        if not env.get("DYLEN_DATABASE_URL"):
            from devtools.embedded_pg import EmbeddedPostgres, create_database

            pg = EmbeddedPostgres(DEV_DIR / "pgdata", port=int(env.get("DYLEN_DEV_PG_PORT", "54329")) or None)
            print(f"Starting embedded PostgreSQL (data in {pg.data_dir}) ...", flush=True)
            pg.start()
            try:
                create_database(pg.url, "dylen", drop_existing=False)
            except Exception as error:
                if "already exists" not in str(error):
                    raise
            env["DYLEN_DATABASE_URL"] = pg.url_for("dylen")

        print("Migrating ...", flush=True)
        subprocess.run([sys.executable, "-m", "common.cli", "migrate"], env=env, cwd=ROOT, check=True)
        sockets.update(bind_function_ports(FUNCTIONS, gateway.port))
        ports = {name: int(sock.getsockname()[1]) for name, sock in sockets.items()}
        env.setdefault("DYLEN_PROCESS_JOB_URL", f"http://127.0.0.1:{ports['process_job']}/")
        print(f"Starting {len(FUNCTIONS)} functions ...", flush=True)
        for name in FUNCTIONS:
            sock = sockets[name]
            with open(DEV_DIR / f"{name}.log", "ab") as log:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "devtools.serve_socket",
                        str(sock.fileno()),
                        "--target",
                        name,
                        "--source",
                        str(ROOT / "functions" / name / "main.py"),
                        "--port",
                        str(ports[name]),
                        "--host",
                        "127.0.0.1",
                    ],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(sock.fileno(),),
                    # Its own session: a Ctrl-C reaches this runner only, which stops every function
                    # in order, instead of each dying mid-import with a traceback in its log.
                    start_new_session=True,
                )
            procs.append((name, proc))
            sock.close()  # the function holds it now; a dead function then refuses connections
            del sockets[name]
        for name, proc in procs:
            _wait_ready(ports[name], proc, name)
        gateway.about = {"auth": env["DYLEN_AUTH_MODE"], "generator": generator_name(env)}
        gateway.start(ports)
        _warm_up(ports, env["DYLEN_TASK_SECRET"])
        started.set()
    except Interrupted as signal_name:
        print(f"\n{signal_name} during start-up: stopping what was started ...", flush=True)
        # Nothing was served yet, so nothing to finish: a function that is still booting when the
        # signal lands may miss its quick shutdown, and waiting the full grace for it helps no one.
        shutdown(grace=1.0)
        print("Stopped.", flush=True)
        return 130
    except BaseException:
        shutdown()
        raise

    base = f"http://localhost:{gateway.port}"
    print(banner(base=base, ports=ports, env=env), flush=True)
    print("\nCtrl-C stops everything.", flush=True)

    while not stop.wait(0.5):
        for name, proc in procs:
            if proc.poll() is not None:
                print(f"{name} exited with {proc.returncode}; see {DEV_DIR / (name + '.log')}", flush=True)
                stop.set()
    shutdown()
    print("\nStopped every function" + (" and the embedded database." if pg else "."), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

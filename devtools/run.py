"""`make run`: the whole product on this machine, from a fresh clone.

Starts embedded PostgreSQL (unless DYLEN_DATABASE_URL is set), migrates, starts every function
under functions-framework on its own port with dev auth and a generated task secret, and a small
gateway on :8080 that routes /<function>/... like the cloudfunctions.net URLs do. Ctrl-C stops all.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

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


def _wait_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited during start-up; see {DEV_DIR / (name + '.log')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{name} did not listen on port {port} within {timeout}s")


def _gateway(port: int, routes: dict[str, int]) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            path = urlsplit(self.path)
            name, _, rest = path.path.lstrip("/").partition("/")
            target = routes.get(name)
            if target is None:
                body = f"unknown function {name!r}; try one of {', '.join(routes)}\n".encode()
                self.send_response(404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            length = int(self.headers.get("Content-Length") or 0)
            payload = self.rfile.read(length) if length else None
            upstream = http.client.HTTPConnection("127.0.0.1", target, timeout=600)
            forward_path = "/" + rest + (f"?{path.query}" if path.query else "")
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            upstream.request(self.command, forward_path, body=payload, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            upstream.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # `localhost` may resolve to ::1 first; answer there too where IPv6 loopback exists.
    with contextlib.suppress(OSError):
        server6 = _IPv6Server(("::1", port), Handler)
        threading.Thread(target=server6.serve_forever, daemon=True).start()
    return server


class _IPv6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _warm_up(ports: dict[str, int], secret: str) -> None:
    """One harmless request each, so the first real job does not pay the database connect."""
    import uuid

    import requests

    http = requests.Session()
    http.trust_env = False
    probe = str(uuid.uuid4())
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


def main() -> int:
    sys.path.insert(0, str(ROOT))
    DEV_DIR.mkdir(exist_ok=True)
    gateway_port = int(os.environ.get("DYLEN_DEV_PORT", "8080"))
    env = dict(os.environ)
    env.setdefault("DYLEN_AUTH_MODE", "dev")
    env.setdefault("DYLEN_TASK_SECRET", secrets.token_urlsafe(24))
    env["DYLEN_BASE_URL"] = env.get("DYLEN_BASE_URL") or f"http://localhost:{gateway_port}"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"

    pg = None
    if not env.get("DYLEN_DATABASE_URL"):
        from devtools.embedded_pg import EmbeddedPostgres, create_database

        pg = EmbeddedPostgres(DEV_DIR / "pgdata", port=int(env.get("DYLEN_DEV_PG_PORT", "54329")))
        print(f"Starting embedded PostgreSQL (data in {pg.data_dir}) ...", flush=True)
        pg.start()
        try:
            create_database(pg.url, "dylen", drop_existing=False)
        except Exception as error:
            if "already exists" not in str(error):
                raise
        env["DYLEN_DATABASE_URL"] = pg.url_for("dylen")

    procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def shutdown(*_: object) -> None:
        for _name, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # gunicorn's quick shutdown
        for _name, proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if pg is not None:
            pg.stop()
        print("\nStopped every function" + (" and the embedded database." if pg else "."), flush=True)

    try:
        print("Migrating ...", flush=True)
        subprocess.run([sys.executable, "-m", "common.cli", "migrate"], env=env, cwd=ROOT, check=True)
        ports = {name: gateway_port + 1 + i for i, name in enumerate(FUNCTIONS)}
        env.setdefault("DYLEN_PROCESS_JOB_URL", f"http://127.0.0.1:{ports['process_job']}/")
        for name in FUNCTIONS:
            log = open(DEV_DIR / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "functions_framework",
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
            )
            procs.append((name, proc))
        for name, proc in procs:
            _wait_port(ports[name], proc, name)
        gateway = _gateway(gateway_port, ports)
        _warm_up(ports, env["DYLEN_TASK_SECRET"])
    except BaseException:
        shutdown()
        raise

    base = f"http://localhost:{gateway_port}"
    print("\ndylen-jobs is running (dev auth: any X-Dylen-User is trusted).\n")
    for name in FUNCTIONS:
        print(f"  {name:<13} {base}/{name}   (direct: http://127.0.0.1:{ports[name]}/)")
    print(f"\nLogs: {DEV_DIR}/<function>.log   Database: {env['DYLEN_DATABASE_URL']}\n")
    print("Create a lesson job:")
    print(
        f"  curl -s -X POST {base}/create_job -H 'X-Dylen-User: demo' -H 'Content-Type: application/json' \\\n"
        '    -d \'{"job_kind": "lesson", "idempotency_key": "demo-1", '
        '"payload": {"topic": "Photosynthesis", "depth": "detailed"}}\''
    )
    print("Read it (use the job_id from the answer, or the Location header):")
    print(f"  curl -s {base}/get_job/<job_id> -H 'X-Dylen-User: demo'")
    print("Then the lesson (result.lesson_id) and the list:")
    print(f"  curl -s {base}/get_lesson/<lesson_id> -H 'X-Dylen-User: demo'")
    print(f"  curl -s {base}/list_lessons -H 'X-Dylen-User: demo'")
    scheduled = [name for name in ("archive_lessons", "rescue_jobs") if name in FUNCTIONS]
    if scheduled:
        # Dev only: the secret is generated for this run, and task endpoints accept nothing else here.
        print("Run a scheduled function now (Cloud Scheduler calls them in production):")
        for name in scheduled:
            print(f"  curl -s -X POST {base}/{name} -H 'X-Dylen-Task-Secret: {env['DYLEN_TASK_SECRET']}'")
    print("\nCtrl-C stops everything.", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.5):
        for name, proc in procs:
            if proc.poll() is not None:
                print(f"{name} exited with {proc.returncode}; see {DEV_DIR / (name + '.log')}", flush=True)
                stop.set()
    gateway.shutdown()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

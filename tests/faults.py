"""Helpers for fault tests: private stacks of real function processes, and database checks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.support import TASK_SECRET, FunctionServer, Stack, base_env, free_port


def start_stack(
    database_url: str,
    logs_dir: Path,
    *,
    names: Iterable[str] = ("create_job", "get_job", "rescue_jobs"),
    **overrides: str,
) -> Stack:
    """process_job plus `names`, on their own ports, with local dispatch wired to this process_job."""
    env = base_env(database_url, **overrides)
    # process_job dispatches too (a lesson's sections), so it is told its own URL.
    port = free_port()
    env.setdefault("DYLEN_PROCESS_JOB_URL", f"http://127.0.0.1:{port}/")
    process = FunctionServer("process_job", env, logs_dir, port=port).start(wait=False)
    servers = {"process_job": process}
    for name in names:
        servers[name] = FunctionServer(name, env, logs_dir).start(wait=False)
    try:
        for server in servers.values():
            server.wait_ready()
    except BaseException:
        for server in servers.values():
            server.kill()
        raise
    return Stack(servers)


def kill_all(stack: Stack) -> None:
    """Teardown: SIGKILL every process at once (no graceful drain to wait for)."""
    for server in stack.servers.values():
        server.kill()


def rescue(stack: Stack) -> dict[str, Any]:
    response = stack.http.post(
        stack.url("rescue_jobs") + "/", headers={"X-Dylen-Task-Secret": TASK_SECRET}, timeout=30
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.1, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")


def job_statuses(db: sa.Engine, job_ids: Iterable[str]) -> dict[str, str]:
    ids = list(job_ids)
    with db.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id::text AS id, status FROM jobs WHERE id::text = ANY(:ids)"), {"ids": ids}
        )
        return {row.id: row.status for row in rows}


def lessons_per_job(db: sa.Engine, job_ids: Iterable[str]) -> dict[str, int]:
    ids = list(job_ids)
    with db.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT job_id::text AS job_id, count(*) AS n FROM lessons "
                "WHERE job_id::text = ANY(:ids) GROUP BY job_id"
            ),
            {"ids": ids},
        )
        return {row.job_id: int(row.n) for row in rows}


class FreezableProxy:
    """A TCP relay to PostgreSQL that can freeze: it keeps every socket open but stops relaying,
    like a network that silently drops packets (no RST, no FIN), which a restart never shows."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self.closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            if self.frozen.is_set():
                continue  # accepted, never answered
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: Any, sink: Any) -> None:
        while not self.closed.is_set():
            if self.frozen.is_set():
                time.sleep(0.05)  # hold the bytes: nothing is relayed, nothing is closed
                continue
            try:
                source.settimeout(0.1)
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            # Frozen while this recv was under way: hold these bytes too, or one message would
            # slip through after the freeze (a real dropped network relays nothing).
            while self.frozen.is_set() and not self.closed.is_set():
                time.sleep(0.05)
            try:
                sink.sendall(data)
            except OSError:
                break
        if not self.frozen.is_set():
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self.closed.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

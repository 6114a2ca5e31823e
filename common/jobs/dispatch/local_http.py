"""The `local-http` dispatcher (dev only): a direct HTTP POST to process_job with the headers Cloud
Tasks sends, retried with Cloud Tasks-like backoff; a job scheduled for later (a retry, a deferral)
is delivered at its time, as Cloud Tasks' schedule_time would."""

from __future__ import annotations

import heapq
import http.client
import itertools
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import NamedTuple
from urllib.parse import urlsplit

from common.jobs.dispatch.base import LOCAL_QUEUE_NAME, Delivery, backoff_seconds, task_name_for
from common.jobs.model import Job
from common.jobs.settings import JobSettings
from common.platform import telemetry
from common.platform.config import Settings
from common.platform.errors import ConfigError
from common.platform.log import logger


class _Response(NamedTuple):
    status_code: int
    retry_after: str


class _Later:
    """Runs callables at their time on one daemon thread (a heap of deadlines), so a retry's
    backoff holds no pool thread while it waits."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], object]]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def call_in(self, seconds: float, action: Callable[[], object]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._order), action))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dylen-dispatch-later", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, action = heapq.heappop(self._heap)
            action()


class LocalHttpDispatcher:
    """Dev only: POST to process_job from a small thread pool, so create_job answers at once.

    Each pool thread keeps one HTTP/1.1 keep-alive connection (stdlib http.client: a fraction of
    the CPU of a requests.Session per delivery, which matters because the deliveries run in
    create_job's process). No proxy is ever used: process_job is on this machine or network.
    """

    def __init__(self, settings: Settings, jobs: JobSettings) -> None:
        self.settings = settings
        self.jobs = jobs
        self.url = settings.process_job_url
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"DYLEN_PROCESS_JOB_URL must be an http(s) URL, got {self.url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._host_header = parts.netloc.rpartition("@")[2]
        self._executor = ThreadPoolExecutor(
            max_workers=jobs.local_dispatch_workers, thread_name_prefix="dylen-dispatch"
        )
        self._local = threading.local()
        self._later = _Later()

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.settings.db_connect_timeout_seconds)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _post(self, body: bytes, headers: dict[str, str]) -> _Response:
        s = self.settings
        headers = {**headers, "Host": self._host_header, "Content-Length": str(len(body))}
        # A kept-alive connection the server has closed meanwhile fails before any answer; that is
        # not a delivery, so it is retried once at once on a fresh connection.
        for fresh in (getattr(self._local, "conn", None) is None, True):
            conn = self._connection()
            try:
                if conn.sock is None:
                    conn.connect()  # bounded by the connect timeout
                conn.sock.settimeout(self.jobs.timeout_seconds)
                conn.request("POST", self._path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop_connection()
                if fresh:
                    raise
                continue
            except Exception:
                self._drop_connection()
                raise
            if response.will_close:
                self._drop_connection()
            else:
                conn.sock.settimeout(s.db_connect_timeout_seconds)
            return _Response(response.status, response.getheader("Retry-After", ""))
        raise AssertionError("unreachable")

    def dispatch(self, job: Job) -> None:
        logger.info(f"Dispatching task locally to {self.url}", extra={"job_id": str(job.id)})
        job_id, task_name, tries = str(job.id), task_name_for(job), job.max_attempts
        trace = telemetry.inject({})  # taken now, in the dispatch's span, as a task's headers are

        def submit() -> None:
            self._executor.submit(self._deliver, job_id, task_name, tries, trace=trace)

        wait = (job.run_after - datetime.now(UTC)).total_seconds() if job.run_after else 0.0
        if wait > 0:
            self._later.call_in(wait, submit)
        else:
            submit()

    def deliver(self, job: Job) -> Delivery:
        """Deliver in the caller's thread, with the same retries, and say how it ended."""
        return self._deliver(str(job.id), task_name_for(job), job.max_attempts, trace=telemetry.inject({}))

    def _deliver(self, job_id: str, task_name: str, max_attempts: int, *, trace: dict[str, str]) -> Delivery:
        s = self.settings
        headers = {
            **trace,
            "Content-Type": "application/json",
            "X-CloudTasks-QueueName": LOCAL_QUEUE_NAME,
            "X-CloudTasks-TaskName": task_name,
        }
        if s.task_secret:
            headers["X-Dylen-Task-Secret"] = s.task_secret
        body = json.dumps({"job_id": job_id}).encode()
        executions = 0
        previous: str | None = None
        for retry in range(max_attempts):
            attempt_headers = {
                **headers,
                "X-CloudTasks-TaskRetryCount": str(retry),
                "X-CloudTasks-TaskExecutionCount": str(executions),
                "X-CloudTasks-TaskETA": f"{time.time():.6f}",
            }
            if previous is not None:
                attempt_headers["X-CloudTasks-TaskPreviousResponse"] = previous
                attempt_headers["X-CloudTasks-TaskRetryReason"] = f"HTTP {previous}"
            wait = backoff_seconds(
                retry + 1,
                minimum=self.jobs.local_dispatch_min_backoff_seconds,
                maximum=self.jobs.local_dispatch_max_backoff_seconds,
            )
            try:
                response = self._post(body, attempt_headers)
            except Exception as error:  # connection refused, reset, timeout: the target is away
                previous = "UNAVAILABLE"
                logger.warning(
                    "Local delivery failed; backing off",
                    extra={"job_id": job_id, "retry": retry, "error": repr(error), "backoff": wait},
                )
            else:
                executions += 1
                if 200 <= response.status_code < 300:
                    return Delivery(True, f"process_job answered {response.status_code}")
                previous = str(response.status_code)
                retry_after = response.retry_after
                if retry_after.isdigit():
                    wait = min(float(retry_after), self.jobs.local_dispatch_max_backoff_seconds)
                logger.info(
                    "process_job asked for a retry",
                    extra={"job_id": job_id, "status": response.status_code, "backoff": wait},
                )
            if retry + 1 < max_attempts:
                time.sleep(wait)
        logger.error(
            "Local delivery gave up; rescue_jobs will re-dispatch the job",
            extra={"job_id": job_id, "attempts": max_attempts},
        )
        last = "unreachable" if previous == "UNAVAILABLE" else f"answered {previous}"
        return Delivery(False, f"process_job at {self.url} {last} on each of {max_attempts} tries")

"""The local-http dispatcher: Cloud Tasks-like headers, backoff, keep-alive, and no proxies."""

from __future__ import annotations

import http.server
import itertools
import threading
import time
from typing import Any

from common.jobs.dispatch.base import backoff_seconds, task_name_for
from common.jobs.dispatch.local_http import LocalHttpDispatcher
from common.jobs.model import Job
from common.jobs.settings import job_settings
from common.platform.config import load_settings
from tests.factories import job_value
from tests.support import StackFactory, lesson_body


class Recorder(http.server.ThreadingHTTPServer):
    """A stand-in process_job that answers a scripted list of statuses and records each request."""

    def __init__(self, statuses: list[int], *, keep_alive: bool = False, close_after: bool = False) -> None:
        self.statuses = statuses
        self.requests: list[dict[str, Any]] = []
        self.done = threading.Event()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            # HTTP/1.1 keeps the connection open between requests; close_after then drops it
            # silently after each answer, as a server's idle keep-alive timeout does.
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                recorder.requests.append(
                    {
                        "headers": dict(self.headers),
                        "body": self.rfile.read(length),
                        "at": time.monotonic(),
                        "client": self.client_address,
                    }
                )
                if close_after:
                    self.close_connection = True
                status = recorder.statuses.pop(0) if recorder.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if 200 <= status < 300:
                    recorder.done.set()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


def _job(max_attempts: int = 5) -> Job:
    return job_value(max_attempts=max_attempts)


def _dispatcher(url: str, **env: str) -> LocalHttpDispatcher:
    environment = {
        "DYLEN_AUTH_MODE": "dev",
        "DYLEN_PROCESS_JOB_URL": url,
        "DYLEN_TASK_SECRET": "shh",
        "DYLEN_LOCAL_DISPATCH_MIN_BACKOFF_SECONDS": "0.05",
        "DYLEN_LOCAL_DISPATCH_MAX_BACKOFF_SECONDS": "0.4",
        **env,
    }
    return LocalHttpDispatcher(load_settings(environment), job_settings.load(environment))


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_seconds(n, minimum=0.1, maximum=1.0) for n in range(1, 7)] == [
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
        1.0,
    ]


def test_delivery_sends_cloud_tasks_headers_and_retries_with_backoff() -> None:
    # Given process_job answers 503, then 500, then 200
    recorder = Recorder([503, 500, 200])
    job = _job()
    # When the job is dispatched
    _dispatcher(recorder.url).dispatch(job)
    assert recorder.done.wait(10)
    # Then it was delivered three times, like Cloud Tasks would
    reqs = recorder.requests
    assert len(reqs) == 3
    for n, req in enumerate(reqs):
        h = req["headers"]
        assert req["body"] == f'{{"job_id": "{job.id}"}}'.encode()
        assert h["Content-Type"] == "application/json"
        assert h["X-Dylen-Task-Secret"] == "shh"
        assert h["X-CloudTasks-QueueName"]
        assert h["X-CloudTasks-TaskName"] == task_name_for(job)
        assert h["X-CloudTasks-TaskRetryCount"] == str(n)
        assert h["X-CloudTasks-TaskExecutionCount"] == str(n)
        assert float(h["X-CloudTasks-TaskETA"]) > 0
    assert "X-CloudTasks-TaskPreviousResponse" not in reqs[0]["headers"]
    assert reqs[1]["headers"]["X-CloudTasks-TaskPreviousResponse"] == "503"
    assert reqs[2]["headers"]["X-CloudTasks-TaskPreviousResponse"] == "500"
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(reqs)]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.09, gaps


def test_deliveries_reuse_one_keep_alive_connection() -> None:
    recorder = Recorder([], keep_alive=True)
    dispatcher = _dispatcher(recorder.url, DYLEN_LOCAL_DISPATCH_WORKERS="1")
    for _ in range(3):
        recorder.done.clear()
        dispatcher.dispatch(_job())
        assert recorder.done.wait(10)
    assert len({req["client"] for req in recorder.requests}) == 1


def test_a_keep_alive_connection_closed_by_process_job_is_reopened_without_counting_a_retry() -> None:
    # Given process_job closes each connection after answering (no Connection: close header)
    recorder = Recorder([], keep_alive=True, close_after=True)
    dispatcher = _dispatcher(recorder.url, DYLEN_LOCAL_DISPATCH_WORKERS="1")
    jobs = [_job(), _job()]
    for job in jobs:
        recorder.done.clear()
        dispatcher.dispatch(job)
        assert recorder.done.wait(10)
        time.sleep(0.1)  # the close reaches the client's socket before the next delivery
    # Then each job was delivered once, as its first attempt, on a fresh connection each time
    assert [req["headers"]["X-CloudTasks-TaskName"] for req in recorder.requests] == [
        task_name_for(job) for job in jobs
    ]
    assert [req["headers"]["X-CloudTasks-TaskRetryCount"] for req in recorder.requests] == ["0", "0"]
    assert len({req["client"] for req in recorder.requests}) == 2


def test_delivery_is_bounded_by_the_jobs_attempts() -> None:
    recorder = Recorder([500] * 10)
    _dispatcher(recorder.url).dispatch(_job(max_attempts=3))
    time.sleep(1.5)
    assert len(recorder.requests) == 3


def test_dead_proxy_in_the_environment_does_not_stop_local_dispatch(
    make_stack: StackFactory, user: str
) -> None:
    # Given proxies that lead nowhere (port 9 on loopback refuses connections)
    dead = "http://127.0.0.1:9"
    stack = make_stack(HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead)
    # When a job is created, it is still delivered to process_job on loopback and finishes
    job = stack.create(user, lesson_body("Proxies")).json()
    assert stack.wait_for(user, job["job_id"])["status"] == "done"

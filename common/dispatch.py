"""Hand a job to process_job: Cloud Tasks in production (`gcp`), a direct HTTP POST locally.

A dispatch failure never loses the job: it is already committed as `queued`, the failure is logged
as `Failed to enqueue task`, and rescue_jobs dispatches it again later.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol
from urllib.parse import urlsplit

from common.config import Settings, get_settings
from common.log import logger
from common.store import Job

LOCAL_QUEUE_NAME = "dylen-local"


def task_name_for(job: Job) -> str:
    """One task id per (job, dispatch): re-enqueueing the same dispatch is a no-op (ALREADY_EXISTS),
    while a rescue, which moves `dispatched_at`, gets a fresh id. Cloud Tasks keeps ids of finished
    tasks for a while, so a bare job id would block every re-dispatch."""
    stamp = int(job.dispatched_at.timestamp() * 1000) if job.dispatched_at else 0
    return f"job-{job.id}-{stamp}"


class Dispatcher(Protocol):
    def dispatch(self, job: Job) -> None:
        """Hand the job over, or raise; the caller logs and leaves the job queued."""


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def backoff_seconds(retry: int, *, minimum: float, maximum: float) -> float:
    """Cloud Tasks-style: min_backoff doubled per retry, capped at max_backoff."""
    return min(maximum, minimum * (2 ** max(0, retry - 1)))


class LocalHttpDispatcher:
    """Dev only: POST to process_job from a small thread pool, so create_job answers at once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.process_job_url
        self._executor = ThreadPoolExecutor(
            max_workers=settings.local_dispatch_workers, thread_name_prefix="dylen-dispatch"
        )
        self._local = threading.local()

    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            # A proxy from the environment cannot reach 127.0.0.1 on our behalf; never ask it.
            session.trust_env = not is_loopback_url(self.url)
            self._local.session = session
        return session

    def dispatch(self, job: Job) -> None:
        logger.info(f"Dispatching task locally to {self.url}", extra={"job_id": str(job.id)})
        self._executor.submit(self._deliver, str(job.id), task_name_for(job), job.max_attempts)

    def _deliver(self, job_id: str, task_name: str, max_attempts: int) -> None:
        s = self.settings
        headers = {
            "Content-Type": "application/json",
            "X-CloudTasks-QueueName": LOCAL_QUEUE_NAME,
            "X-CloudTasks-TaskName": task_name,
        }
        if s.task_secret:
            headers["X-Dylen-Task-Secret"] = s.task_secret
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
                minimum=s.local_dispatch_min_backoff_seconds,
                maximum=s.local_dispatch_max_backoff_seconds,
            )
            try:
                response = self._session().post(
                    self.url,
                    json={"job_id": job_id},
                    headers=attempt_headers,
                    timeout=(s.db_connect_timeout_seconds, s.job_timeout_seconds),
                )
            except Exception as error:  # connection refused, reset, timeout: the target is away
                previous = "UNAVAILABLE"
                logger.warning(
                    "Local delivery failed; backing off",
                    extra={"job_id": job_id, "retry": retry, "error": repr(error), "backoff": wait},
                )
            else:
                executions += 1
                if 200 <= response.status_code < 300:
                    return
                previous = str(response.status_code)
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    wait = min(float(retry_after), s.local_dispatch_max_backoff_seconds)
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


_dispatcher: Dispatcher | None = None
_lock = threading.Lock()


def get_dispatcher() -> Dispatcher:
    global _dispatcher
    if _dispatcher is None:
        with _lock:
            if _dispatcher is None:
                settings = get_settings()
                if settings.task_provider == "gcp":
                    from common.dispatch_gcp import CloudTasksDispatcher

                    _dispatcher = CloudTasksDispatcher(settings)
                else:
                    _dispatcher = LocalHttpDispatcher(settings)
    return _dispatcher


def dispatch_job(job: Job) -> bool:
    """Dispatch; on failure log `Failed to enqueue task` and return False (the job stays queued)."""
    try:
        get_dispatcher().dispatch(job)
    except Exception as error:
        logger.error(
            "Failed to enqueue task",
            extra={"job_id": str(job.id), "reason": f"{type(error).__name__}: {error}"},
        )
        return False
    return True

"""Hand a job to process_job: Cloud Tasks in production (`gcp`), a direct HTTP POST locally
(`local-http`), chosen by DYLEN_TASK_SERVICE_PROVIDER.

A dispatch failure never loses the job: it is already committed as `queued`, the failure is logged
as `Failed to enqueue task`, and rescue_jobs dispatches it again later.
"""

from __future__ import annotations

import threading

from common.jobs.dispatch.base import Delivery, Dispatcher
from common.jobs.dispatch.local_http import LocalHttpDispatcher
from common.jobs.model import Job
from common.jobs.settings import job_settings
from common.platform.config import get_settings
from common.platform.log import logger

_dispatcher: Dispatcher | None = None
_lock = threading.Lock()


def get_dispatcher() -> Dispatcher:
    global _dispatcher
    if _dispatcher is None:
        with _lock:
            if _dispatcher is None:
                settings = get_settings()
                if settings.task_provider == "gcp":
                    # Lazily: only the gcp provider loads google-cloud-tasks (cold start).
                    from common.jobs.dispatch.cloud_tasks import CloudTasksDispatcher

                    _dispatcher = CloudTasksDispatcher(settings, job_settings())
                else:
                    _dispatcher = LocalHttpDispatcher(settings, job_settings())
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


def deliver_job(job: Job) -> Delivery:
    """Dispatch and wait for the outcome (operators' retries); never raises."""
    try:
        delivery = get_dispatcher().deliver(job)
    except Exception as error:
        delivery = Delivery(False, f"{type(error).__name__}: {error}")
    if not delivery.ok:
        logger.error("Failed to enqueue task", extra={"job_id": str(job.id), "reason": delivery.detail})
    return delivery

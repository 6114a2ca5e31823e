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
from common.platform import telemetry
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


def _span(job: Job) -> telemetry.Scope:
    """The dispatch's span, in the job's trace; the task carries it (`traceparent`) to process_job."""
    if not telemetry.enabled():
        return telemetry.NOTHING
    attributes = {
        "dylen.job.id": str(job.id),
        "dylen.job.kind": job.job_kind,
        "dylen.job.attempts": job.attempts,
        "dylen.task.provider": get_settings().task_provider,
    }
    return telemetry.dispatch_span(f"dispatch {job.job_kind}", job.traceparent, attributes)


def dispatch_job(job: Job) -> bool:
    """Dispatch; on failure log `Failed to enqueue task` and return False (the job stays queued)."""
    with _span(job) as span:
        try:
            get_dispatcher().dispatch(job)
        except Exception as error:
            span.set_attribute("error.type", type(error).__name__)
            logger.error(
                "Failed to enqueue task",
                extra={"job_id": str(job.id), "reason": f"{type(error).__name__}: {error}"},
            )
            return False
    return True


def deliver_job(job: Job) -> Delivery:
    """Dispatch and wait for the outcome (operators' retries); never raises."""
    with _span(job) as span:
        try:
            delivery = get_dispatcher().deliver(job)
        except Exception as error:
            delivery = Delivery(False, f"{type(error).__name__}: {error}")
        if not delivery.ok:
            span.set_attribute("error.type", "undelivered")
            logger.error("Failed to enqueue task", extra={"job_id": str(job.id), "reason": delivery.detail})
    return delivery

"""The `gcp` dispatcher: one Cloud Tasks HTTP task per dispatch, with an OIDC token.

Imported only when DYLEN_TASK_SERVICE_PROVIDER=gcp, and the client is built on first dispatch, so
neither import nor cold start pays for google-cloud-tasks unless it is used.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from common.jobs.dispatch.base import Delivery, task_name_for
from common.jobs.model import Job
from common.jobs.settings import JobSettings
from common.platform import telemetry
from common.platform.config import Settings
from common.platform.log import logger

# Cloud Tasks accepts dispatch deadlines from 15 seconds to 30 minutes for HTTP targets.
MIN_DEADLINE_SECONDS = 15
MAX_DEADLINE_SECONDS = 1800
# create_job waits for create_task before answering: bound it and never retry inside the request.
# A failed dispatch leaves the job `queued` and rescue_jobs tries again, so a fast failure is cheap.
CREATE_TASK_TIMEOUT_SECONDS = 5.0


def dispatch_deadline_seconds(job_timeout_seconds: int) -> int:
    return max(MIN_DEADLINE_SECONDS, min(MAX_DEADLINE_SECONDS, job_timeout_seconds))


def build_client(settings: Settings) -> Any:
    # Lazily (here and below): google-cloud-tasks loads on the first dispatch, not at cold start.
    from google.cloud import tasks_v2

    if settings.cloud_tasks_emulator_host:
        # Emulators speak plain gRPC without credentials; a given channel makes the transport skip
        # Google's credential lookup entirely (nothing here may reach Google's network).
        # Lazily: the emulator's plain channel, only when one is configured.
        import grpc
        from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

        channel = grpc.insecure_channel(settings.cloud_tasks_emulator_host)
        return tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    return tasks_v2.CloudTasksClient()


class CloudTasksDispatcher:
    def __init__(self, settings: Settings, jobs: JobSettings) -> None:
        assert settings.cloud_tasks_queue_path, "checked at config load"
        self.settings = settings
        self.jobs = jobs
        self.queue_path = settings.cloud_tasks_queue_path
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = build_client(self.settings)
        return self._client

    def build_task(self, job: Job) -> Any:
        # Lazily: google-cloud-tasks loads on the first dispatch, not at cold start.
        from google.cloud import tasks_v2
        from google.protobuf import duration_pb2

        s = self.settings
        # The trace travels in the task (`traceparent`, the dispatch's span), a retry's included.
        headers = telemetry.inject({"Content-Type": "application/json"})
        if s.task_secret:
            headers["X-Dylen-Task-Secret"] = s.task_secret
        http_request = tasks_v2.HttpRequest(
            http_method=tasks_v2.HttpMethod.POST,
            url=s.process_job_url,
            headers=headers,
            body=json.dumps({"job_id": str(job.id)}).encode(),
        )
        if s.tasks_invoker_sa:
            http_request.oidc_token = tasks_v2.OidcToken(
                service_account_email=s.tasks_invoker_sa, audience=s.oidc_audience
            )
        task = tasks_v2.Task(
            name=f"{self.queue_path}/tasks/{task_name_for(job)}",
            http_request=http_request,
            dispatch_deadline=duration_pb2.Duration(
                seconds=dispatch_deadline_seconds(self.jobs.timeout_seconds)
            ),
        )
        if job.run_after is not None:
            # A retry or a deferral: Cloud Tasks holds the task until then (the job's own backoff).
            task.schedule_time = job.run_after
        return task

    def dispatch(self, job: Job) -> None:
        # Lazily: google-cloud-tasks loads on the first dispatch, not at cold start.
        from google.api_core import exceptions

        task = self.build_task(job)
        try:
            self.client.create_task(
                parent=self.queue_path, task=task, timeout=CREATE_TASK_TIMEOUT_SECONDS, retry=None
            )
        except exceptions.AlreadyExists:
            # Same job, same dispatch (task_name_for): an earlier call got through; nothing to do.
            logger.info("Task already exists; treating as dispatched", extra={"job_id": str(job.id)})
            return
        logger.info("Task enqueued", extra={"job_id": str(job.id), "task": task.name})

    def deliver(self, job: Job) -> Delivery:
        """Cloud Tasks takes over delivery once the task exists: that is the outcome to report."""
        self.dispatch(job)
        return Delivery(True, f"Cloud Tasks task {task_name_for(job)} is in {self.queue_path}")

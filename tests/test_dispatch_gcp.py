"""The `gcp` dispatcher through the real google-cloud-tasks client and the gcloud-tasks-emulator server.

What the emulator cannot show, and how it is covered instead:
- It does not mint OIDC tokens on delivery (it sends the task's own headers only), so delivered tasks
  authenticate with X-Dylen-Task-Secret; the OIDC fields are asserted on the stored task instead.
- It does not enforce task-name uniqueness, so ALREADY_EXISTS comes from a one-method gRPC stand-in
  speaking the real Cloud Tasks wire protocol to the real client.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.cloud import tasks_v2

from common.jobs.dispatch import dispatch_job
from common.jobs.dispatch.base import task_name_for
from common.jobs.dispatch.cloud_tasks import CloudTasksDispatcher, build_client, dispatch_deadline_seconds
from common.jobs.model import JOB_COLUMNS, Job
from common.jobs.settings import job_settings
from common.platform.config import Settings, load_settings
from tests.factories import job_value
from tests.support import TASK_SECRET, StackFactory, free_port, lesson_body
from tests.tasks_emulator import QUEUE_PATH, TasksEmulator

INVOKER = "tasks-invoker@dylen-test.iam.gserviceaccount.com"
LOCATION = QUEUE_PATH.rsplit("/queues/", 1)[0]


@pytest.fixture(scope="module")
def emulator(logs_dir: Path) -> Iterator[TasksEmulator]:
    server = TasksEmulator(logs_dir).start()
    yield server
    server.stop()


def _settings(emulator_host: str, **env: str) -> Settings:
    return load_settings(
        {
            "DYLEN_AUTH_MODE": "dev",
            "DYLEN_TASK_SERVICE_PROVIDER": "gcp",
            "CLOUD_TASKS_EMULATOR_HOST": emulator_host,
            "DYLEN_CLOUD_TASKS_QUEUE_PATH": QUEUE_PATH,
            "DYLEN_PROCESS_JOB_URL": "http://127.0.0.1:9/process_job",
            **env,
        }
    )


@pytest.fixture(scope="module")
def client(emulator: TasksEmulator) -> Any:
    """The real CloudTasksClient, built by the same code the dispatcher uses."""
    return build_client(_settings(emulator.host))


def _paused_queue(client: Any) -> str:
    name = f"{LOCATION}/queues/paused-{uuid.uuid4().hex[:8]}"
    client.create_queue(parent=LOCATION, queue=tasks_v2.Queue(name=name))
    client.pause_queue(name=name)
    return name


def _tasks(client: Any, queue: str) -> list[Any]:
    return list(
        client.list_tasks(
            request=tasks_v2.ListTasksRequest(parent=queue, response_view=tasks_v2.Task.View.FULL)
        )
    )


def _job(max_attempts: int = 5) -> Job:
    return job_value(max_attempts=max_attempts)


def _stored_job(db: sa.Engine, job_id: str) -> Job:
    with db.connect() as conn:
        row = conn.execute(sa.text(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = :id"), {"id": job_id}).first()
    assert row is not None
    return Job.from_row(row)


def _gcp_stack(make_stack: StackFactory, emulator_host: str) -> Any:
    return make_stack(
        DYLEN_TASK_SERVICE_PROVIDER="gcp",
        CLOUD_TASKS_EMULATOR_HOST=emulator_host,
        DYLEN_CLOUD_TASKS_QUEUE_PATH=QUEUE_PATH,
        DYLEN_TASKS_INVOKER_SA=INVOKER,
    )


def test_twenty_jobs_go_through_the_emulator_to_done(
    make_stack: StackFactory, emulator: TasksEmulator, user: str
) -> None:
    stack = _gcp_stack(make_stack, emulator.host)
    job_ids = []
    for i in range(20):
        response = stack.create(user, lesson_body(f"Topic {i}"))
        assert response.status_code == 202, response.text
        job_ids.append(response.json()["job_id"])
    for job_id in job_ids:
        body = stack.wait_for(user, job_id, timeout=60)
        assert body["status"] == "done", body
        assert body["attempts"] == 1
    received = [
        line
        for line in stack.servers["process_job"].log_lines()
        if line.get("message", "").startswith("Received task for job") and line.get("job_id") in job_ids
    ]
    # Each delivery carried the emulator's X-CloudTasks-TaskName, which is our derived task id.
    assert {line["job_id"] for line in received} == set(job_ids)
    assert all(line["task_name"].startswith(f"job-{line['job_id']}-") for line in received)


def test_a_queued_task_carries_url_body_headers_oidc_and_deadline(
    make_stack: StackFactory, emulator: TasksEmulator, client: Any, user: str, db: sa.Engine
) -> None:
    stack = _gcp_stack(make_stack, emulator.host)
    client.pause_queue(name=QUEUE_PATH)
    try:
        response = stack.create(user, lesson_body("Paused queue"))
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        tasks = [
            t for t in _tasks(client, QUEUE_PATH) if json.loads(t.http_request.body) == {"job_id": job_id}
        ]
        assert len(tasks) == 1
        task = tasks[0]
        process_url = stack.url("process_job")
        assert task.name == f"{QUEUE_PATH}/tasks/{task_name_for(_stored_job(db, job_id))}"
        assert task.http_request.http_method == tasks_v2.HttpMethod.POST
        assert task.http_request.url == process_url
        assert task.http_request.headers["Content-Type"] == "application/json"
        assert task.http_request.headers["X-Dylen-Task-Secret"] == TASK_SECRET
        assert task.http_request.oidc_token.service_account_email == INVOKER
        assert task.http_request.oidc_token.audience == process_url  # default: the target URL
        assert task.dispatch_deadline.total_seconds() == 600  # DYLEN_JOB_TIMEOUT_SECONDS default
        assert stack.get_job(user, job_id).json()["status"] == "queued"
    finally:
        client.resume_queue(name=QUEUE_PATH)
    assert stack.wait_for(user, job_id, timeout=30)["status"] == "done"


def test_a_retry_is_a_task_for_its_time_schedule_time_read_back_with_the_real_client(
    emulator: TasksEmulator, client: Any
) -> None:
    # Given a job whose retry is due in 90 s (what transitions.retry leaves: queued, run_after and
    # dispatched_at at its time, one more attempt on the counter)
    queue = _paused_queue(client)
    settings = _settings(emulator.host, DYLEN_CLOUD_TASKS_QUEUE_PATH=queue)
    due = (datetime.now(UTC) + timedelta(seconds=90)).replace(microsecond=0)
    job = dataclasses.replace(_job(), attempts=2, run_after=due, dispatched_at=due)
    # When it is dispatched
    CloudTasksDispatcher(settings, job_settings.load({})).dispatch(job)
    # Then its task waits for that time, named from the job, its attempt and its due time
    (task,) = _tasks(client, queue)
    assert task.schedule_time == due
    # (the emulator does not enforce name uniqueness: ALREADY_EXISTS is the stand-in's test below)
    assert task.name.endswith(f"/tasks/job-{job.id}-2-{int(due.timestamp() * 1000)}")


@pytest.mark.parametrize(("timeout", "deadline"), [(5, 15), (600, 600), (7200, 1800)])
def test_dispatch_deadline_is_the_job_timeout_clamped_to_cloud_tasks_limits(
    emulator: TasksEmulator, client: Any, timeout: int, deadline: int
) -> None:
    assert dispatch_deadline_seconds(timeout) == deadline
    queue = _paused_queue(client)
    settings = _settings(
        emulator.host,
        DYLEN_CLOUD_TASKS_QUEUE_PATH=queue,
        DYLEN_JOB_TIMEOUT_SECONDS=str(timeout),
        DYLEN_TASKS_INVOKER_SA=INVOKER,
        DYLEN_TASKS_OIDC_AUDIENCE="https://process-job.example.test",
    )
    job = _job()
    CloudTasksDispatcher(settings, job_settings.load({"DYLEN_JOB_TIMEOUT_SECONDS": str(timeout)})).dispatch(
        job
    )
    (task,) = _tasks(client, queue)
    assert task.dispatch_deadline.total_seconds() == deadline
    assert task.http_request.oidc_token.audience == "https://process-job.example.test"
    assert task.http_request.url == "http://127.0.0.1:9/process_job"
    assert "X-Dylen-Task-Secret" not in task.http_request.headers  # none configured here
    assert json.loads(task.http_request.body) == {"job_id": str(job.id)}


def test_emulator_down_keeps_the_job_queued_logs_the_reason_and_still_answers_202(
    make_stack: StackFactory, user: str
) -> None:
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens here
    stack = make_stack(
        DYLEN_TASK_SERVICE_PROVIDER="gcp",
        CLOUD_TASKS_EMULATOR_HOST=nobody,
        DYLEN_CLOUD_TASKS_QUEUE_PATH=QUEUE_PATH,
        DYLEN_TASKS_INVOKER_SA=INVOKER,
    )
    started = time.monotonic()
    response = stack.create(user, lesson_body("Nobody listens"))
    elapsed = time.monotonic() - started
    assert response.status_code == 202, response.text
    assert elapsed < 5, f"create_job took {elapsed:.1f}s with the queue down"
    job_id = response.json()["job_id"]
    assert stack.get_job(user, job_id).json()["status"] == "queued"
    failures = [
        line
        for line in stack.servers["create_job"].log_lines()
        if line.get("message") == "Failed to enqueue task" and line.get("job_id") == job_id
    ]
    assert len(failures) == 1, stack.servers["create_job"].log()[-2000:]
    assert failures[0]["severity"] == "ERROR"
    assert "ServiceUnavailable" in failures[0]["reason"]


class _StandIn:
    """A Cloud Tasks CreateTask endpoint answering one fixed gRPC status, recording what it got."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.requests: list[Any] = []

        def create_task(request: Any, context: grpc.ServicerContext) -> Any:
            self.requests.append(request)
            context.abort(code, f"stand-in answers {code.name}")

        handler = grpc.method_handlers_generic_handler(
            "google.cloud.tasks.v2.CloudTasks",
            {
                "CreateTask": grpc.unary_unary_rpc_method_handler(
                    create_task,
                    request_deserializer=tasks_v2.CreateTaskRequest.deserialize,
                    response_serializer=tasks_v2.Task.serialize,
                )
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.mark.parametrize(
    ("code", "dispatched"),
    [(grpc.StatusCode.ALREADY_EXISTS, True), (grpc.StatusCode.PERMISSION_DENIED, False)],
)
def test_already_exists_counts_as_dispatched_other_errors_do_not(
    monkeypatch: pytest.MonkeyPatch, code: grpc.StatusCode, dispatched: bool
) -> None:
    from common.jobs import dispatch

    stand_in = _StandIn(code)
    try:
        settings = _settings(stand_in.host)
        monkeypatch.setattr(dispatch, "_dispatcher", CloudTasksDispatcher(settings, job_settings.load({})))
        job = _job()
        failures: list[str] = []
        handler = _Capture(failures)
        dispatch.logger.addHandler(handler)
        try:
            assert dispatch_job(job) is dispatched
        finally:
            dispatch.logger.removeHandler(handler)
        (request,) = stand_in.requests
        assert request.parent == QUEUE_PATH
        assert request.task.name == f"{QUEUE_PATH}/tasks/{task_name_for(job)}"
        if dispatched:
            assert failures == []
        else:
            assert len(failures) == 1 and "PermissionDenied" in failures[0]
    finally:
        stand_in.server.stop(grace=None)


class _Capture(logging.Handler):
    """Collects the reasons of `Failed to enqueue task` records (the dylen logger does not propagate)."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "Failed to enqueue task":
            self.sink.append(record.reason)  # type: ignore[attr-defined]


def test_a_rescue_redispatch_gets_a_fresh_task_name() -> None:
    job = _job()
    assert job.dispatched_at is not None
    later = dataclasses.replace(job, dispatched_at=job.dispatched_at + timedelta(minutes=5))
    assert task_name_for(job) != task_name_for(later)
    assert task_name_for(job) == task_name_for(dataclasses.replace(job))


def test_a_queue_that_accepts_but_never_answers_costs_at_most_the_create_task_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A black hole (TCP accepted, no gRPC answer) is the slow failure; the timeout bounds it and no
    client retry multiplies it. The module's 5 s is shortened here to keep the suite fast."""
    from common.jobs import dispatch
    from common.jobs.dispatch import cloud_tasks as dispatch_gcp

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setattr(dispatch_gcp, "CREATE_TASK_TIMEOUT_SECONDS", 0.5)
        monkeypatch.setattr(
            dispatch, "_dispatcher", CloudTasksDispatcher(_settings(host), job_settings.load({}))
        )
        failures: list[str] = []
        handler = _Capture(failures)
        dispatch.logger.addHandler(handler)
        try:
            started = time.monotonic()
            assert dispatch_job(_job()) is False
            elapsed = time.monotonic() - started
        finally:
            dispatch.logger.removeHandler(handler)
    assert 0.4 < elapsed < 3, elapsed
    assert len(failures) == 1 and "DeadlineExceeded" in failures[0], failures

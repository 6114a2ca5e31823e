"""process_job: claim, run, record, and answer Cloud Tasks.

Cloud Tasks reads 429 and 5xx as overload and slows the whole queue, every kind and every user's
job with it, honouring Retry-After queue-wide; its retry settings are per queue, never per task. So
the job owns its retries (docs/ARCHITECTURE.md, "Job life") and the answer is 2xx for every outcome
understood here: done; planned; waiting on sections; retry scheduled; deferred (RetryLater, an
infrastructure fault); a duplicate while another attempt holds a live lease; scheduled for later;
already final; failed for good; unknown job. A 5xx means nothing could be recorded (the database is
unavailable: 503 + Retry-After, from the edge) or the process itself failed; only then may Cloud
Tasks redeliver, which is what it alone can do.

Users see a code and a safe message; the raw error (exception text, traceback) goes on the
attempt's record for operators, and to the log.
"""

from __future__ import annotations

import math
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from common.jobs import transitions
from common.jobs.dispatch import dispatch_job
from common.jobs.kinds import Completion, get_kind
from common.jobs.model import FINAL_STATUSES, Job, JobStatus
from common.jobs.settings import job_settings
from common.jobs.transitions import AttemptRecord
from common.platform import telemetry
from common.platform.db import QueryError, connection
from common.platform.errors import (
    DatabaseUnavailable,
    MalformedRequest,
    PermanentJobError,
    RetryLater,
    ValidationFailed,
)
from common.platform.log import instance_id, logger
from common.platform.validation import parse_uuid

DETAIL_MAX = 4000  # an attempt's raw error, bounded: a traceback, not a core dump
# What users read for each code; a code not here gets the generic text of its kind of ending.
SAFE_MESSAGES = {
    "handler_failed": "This attempt failed; the job will be retried.",
    "attempts_exhausted": "The job failed on every attempt it had.",
    "gave_up_waiting": "The job waited too long for capacity and was stopped; try again later.",
    "unknown_kind": "This kind of job can no longer be run.",
    "invalid_payload": "The job's request can no longer be run.",
    "database_unavailable": "A service the job needs was briefly unavailable; it will run again shortly.",
}
FAILED_FOR_GOOD = "The job failed and cannot be retried."
DEFERRED = "The job will run again shortly."


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class _Superseded(Exception):
    """The claim was lost (canceled, or a newer attempt took over) before the finish committed."""


def parse_task_body(body: Any) -> uuid.UUID | None:
    """The job id of a task body; None for a well-formed id of no possible job."""
    if not isinstance(body, dict) or "job_id" not in body:
        raise ValidationFailed(
            'Task body must be {"job_id": "..."}.',
            errors=[{"field": "job_id", "message": "is required"}],
        )
    raw = body["job_id"]
    if not isinstance(raw, str):
        raise MalformedRequest("job_id must be a string.")
    return parse_uuid(raw)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _detail(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}"
    return text[:DETAIL_MAX]


def process_job(job_id: uuid.UUID | None, *, task_name: str | None = None) -> Answer:
    log: dict[str, Any] = {"job_id": str(job_id) if job_id else None, "task_name": task_name}
    logger.info(f"Received task for job {job_id}", extra=log)
    if job_id is None:
        return Answer(200, {"outcome": "unknown_job"})

    telemetry.annotate({"dylen.job.id": str(job_id)})
    with telemetry.span("claim"), connection() as conn:
        claim = transitions.claim(conn, job_id, lease_seconds=job_settings().timeout_seconds)

    job = claim.job
    if job is None:
        if job_id.int != 0:  # the nil id is no job's (ids are random): a probe, e.g. make run's warm-up
            logger.warning("Task for unknown job; acknowledging so it is not retried", extra=log)
        return Answer(200, {"job_id": str(job_id), "outcome": "unknown_job"})
    if not claim.claimed:
        return _answer_unclaimed(job, claim, log)

    log["attempt"] = job.attempts
    _claimed(job, claim)
    kind = get_kind(job.job_kind)
    try:
        if kind is None:
            raise PermanentJobError("unknown_kind", f"No handler for job kind {job.job_kind!r}.")
        with telemetry.span("run"), telemetry.timed("dylen.job.run.duration", job_kind=job.job_kind):
            completion = kind.run(job)
    except PermanentJobError as failure:
        message = failure.public_message or SAFE_MESSAGES.get(failure.code, FAILED_FOR_GOOD)
        record = AttemptRecord("failed", failure.code, message, _detail(failure), instance_id())
        return _fail(job, record, log)
    except RetryLater as later:
        return _defer(job, later.after_seconds, later.reason, _detail(later), log)
    except DatabaseUnavailable as fault:  # not the job's fault: its attempt is given back
        delay = job_settings().policy(job.job_kind).delay(1)
        return _defer(job, delay, "database_unavailable", _detail(fault), log)
    except Exception as failure:  # the kind's or its generator's own fault: retried with backoff
        logger.warning("Job attempt failed", extra={**log, "error": repr(failure)})
        return _retry(job, _detail(failure), log)

    try:
        with telemetry.span("finish"):
            created = _finish(job.id, job.attempts, completion)
    except (_Superseded, QueryError) as error:
        if isinstance(error, QueryError) and not error.unique_violation:
            raise
        # Canceled meanwhile, or a newer attempt took over and (maybe) finished: our writes rolled back.
        logger.info("Attempt superseded; its writes were discarded", extra=log)
        record = AttemptRecord("superseded", "superseded", "This attempt was replaced.", None, instance_id())
        with connection() as conn:
            transitions.record_attempt(conn, job.id, attempt=job.attempts, record=record)
        return Answer(200, {"job_id": str(job.id), "outcome": "superseded"})
    if created:
        # Committed first, then dispatched (as create_job does): a failed dispatch leaves the
        # section queued for rescue_jobs.
        _dispatch(created)
        logger.info("Job planned; its sections are dispatched", extra={**log, "sections": len(created)})
    else:
        logger.info("Job completed successfully.", extra=log)
        telemetry.record("dylen.jobs.finished", 1, job_kind=job.job_kind, status=JobStatus.DONE)
    return Answer(200, {"job_id": str(job.id), "status": completion.status, "result": completion.result})


def _claimed(job: Job, claim: transitions.Claim) -> None:
    attributes = {"dylen.job.kind": job.job_kind, "dylen.job.attempt": job.attempts}
    if job.parent_id is not None:
        attributes.update(
            {"dylen.job.parent_id": str(job.parent_id), "dylen.section.index": job.section_index}
        )
    telemetry.annotate(attributes)
    if job.attempts == 1 and claim.now is not None:  # created to first claim, on the database's clock
        waited = (claim.now - job.created_at).total_seconds()
        telemetry.record("dylen.job.queue_latency", waited, job_kind=job.job_kind)


def _finish(job_id: uuid.UUID, attempt: int, completion: Completion) -> list[Job]:
    """Store the outputs and make the guarded transition (one statement, atomic without
    BEGIN/COMMIT, unless the kind's finish opens a transaction); the jobs it created. Raises
    _Superseded if the claim was lost."""
    with connection() as conn:
        if completion.finish is None:
            won = transitions.complete(conn, job_id, attempt=attempt, result=completion.result)
            created: list[Job] | None = [] if won else None
        else:
            created = completion.finish(conn, job_id, attempt)
    if created is None:
        raise _Superseded
    return created


def _dispatch(jobs: list[Job]) -> None:
    if job_settings().auto_process:
        for job in jobs:
            dispatch_job(job)


def _answer_unclaimed(job: Job, claim: transitions.Claim, log: dict[str, Any]) -> Answer:
    body = {"job_id": str(job.id), "status": job.status}
    if job.status in FINAL_STATUSES:
        return Answer(200, {**body, "outcome": "already_final"})
    if job.waiting:  # planned: its sections do the work and the last one finishes it
        return Answer(200, {**body, "outcome": "waiting"})
    now = claim.now
    if job.status == JobStatus.RUNNING and job.lease_expires_at and now and job.lease_expires_at > now:
        # A duplicate delivery: the lease owner finishes, and rescue_jobs takes over if it dies.
        wait = max(1, math.ceil((job.lease_expires_at - now).total_seconds()))
        return Answer(200, {**body, "outcome": "lease_held", "lease_seconds_left": wait})
    if job.status == JobStatus.QUEUED and job.run_after and now and job.run_after > now:
        # Early: its own task (or rescue_jobs) delivers it at its time; nothing runs now.
        return Answer(200, {**body, "outcome": "scheduled", "next_attempt_at": _iso(job.run_after)})
    if job.attempts >= job.max_attempts:
        message = SAFE_MESSAGES["attempts_exhausted"]
        with connection() as conn:
            transitions.expire(conn, job.id, code="attempts_exhausted", message=message)
            if job.parent_id is not None:
                transitions.fail_parents_of_failed_sections(conn, parent_id=job.parent_id)
        logger.error("Job out of attempts", extra=log)
        telemetry.record("dylen.jobs.finished", 1, job_kind=job.job_kind, status=JobStatus.ERROR)
        return Answer(200, {**body, "status": JobStatus.ERROR, "outcome": "attempts_exhausted"})
    # Queued yet not claimed: a concurrent delivery won the row lock a moment ago and runs it.
    return Answer(200, {**body, "outcome": "contended"})


def _error_body(job: Job, record: AttemptRecord) -> dict[str, Any]:
    return {"job_id": str(job.id), "error": {"code": record.code, "message": record.message}}


def _fail(job: Job, record: AttemptRecord, log: dict[str, Any]) -> Answer:
    with connection() as conn:
        failed = transitions.fail(conn, job.id, attempt=job.attempts, record=record)
        if failed is not None and job.parent_id is not None:
            # A section out of attempts fails its parent and cancels its siblings (rescue_jobs
            # repeats this for every parent, should we die in between).
            transitions.fail_parents_of_failed_sections(conn, parent_id=job.parent_id)
    if failed is None:
        logger.info("Failure not recorded: the claim was lost meanwhile", extra=log)
        return Answer(200, {**_error_body(job, record), "outcome": "superseded"})
    logger.error("Job failed", extra={**log, "error_code": record.code, "error": record.detail})
    telemetry.record("dylen.jobs.finished", 1, job_kind=job.job_kind, status=JobStatus.ERROR)
    return Answer(200, {**_error_body(job, record), "status": JobStatus.ERROR, "outcome": "failed"})


def _retry(job: Job, detail: str, log: dict[str, Any]) -> Answer:
    if job.attempts >= job.max_attempts:
        message = SAFE_MESSAGES["attempts_exhausted"]
        return _fail(job, AttemptRecord("failed", "attempts_exhausted", message, detail, instance_id()), log)
    record = AttemptRecord("retry", "handler_failed", SAFE_MESSAGES["handler_failed"], detail, instance_id())
    delay = job_settings().policy(job.job_kind).delay(job.attempts)
    with connection() as conn:
        queued = transitions.retry(conn, job.id, attempt=job.attempts, record=record, delay=delay)
    return _rescheduled(job, queued, record, log, outcome="retry_scheduled")


def _defer(job: Job, after: float, reason: str, detail: str, log: dict[str, Any]) -> Answer:
    if job.waited_seconds + after > job_settings().max_wait_seconds:
        message = SAFE_MESSAGES["gave_up_waiting"]
        return _fail(job, AttemptRecord("failed", "gave_up_waiting", message, detail, instance_id()), log)
    message = SAFE_MESSAGES.get(reason, DEFERRED)
    record = AttemptRecord("deferred", reason, message, detail, instance_id())
    with connection() as conn:
        queued = transitions.defer(conn, job.id, attempt=job.attempts, record=record, delay=after)
    return _rescheduled(job, queued, record, log, outcome="deferred")


def _rescheduled(
    job: Job, queued: Job | None, record: AttemptRecord, log: dict[str, Any], *, outcome: str
) -> Answer:
    if queued is None:
        logger.info("Retry not recorded: the claim was lost meanwhile", extra=log)
        return Answer(200, {**_error_body(job, record), "outcome": "superseded"})
    # A task for its time (Cloud Tasks schedule_time; the local dispatcher waits); should that
    # fail, the job stays queued with its run_after and rescue_jobs delivers it after that.
    _dispatch([queued])
    telemetry.record("dylen.jobs.retries", 1, job_kind=job.job_kind, outcome=outcome, code=record.code)
    logger.warning(
        "Job will be retried" if outcome == "retry_scheduled" else "Job deferred",
        extra={**log, "error_code": record.code, "run_after": _iso(queued.run_after), "error": record.detail},
    )
    body = {**_error_body(job, record), "status": JobStatus.QUEUED, "outcome": outcome}
    return Answer(200, {**body, "next_attempt_at": _iso(queued.run_after)})

"""process_job: claim, run, record, and answer Cloud Tasks so it retries exactly when that helps.

Answer rule (docs/ARCHITECTURE.md, "Job life", step 4 "answer"):
- 2xx: done; planned (its sections dispatched); waiting on its sections; already final; permanent
  failure recorded; unknown job; out of attempts.
- 503 + Retry-After: another attempt holds a live lease.
- 500: this attempt failed and attempts remain (job back to `queued`, error kept).
"""

from __future__ import annotations

import math
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

from common.jobs import transitions
from common.jobs.dispatch import dispatch_job
from common.jobs.kinds import Completion, get_kind
from common.jobs.model import FINAL_STATUSES, Job, JobStatus
from common.jobs.settings import job_settings
from common.platform.db import QueryError, connection
from common.platform.errors import MalformedRequest, PermanentJobError, ValidationFailed
from common.platform.log import logger
from common.platform.validation import parse_uuid


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


def _error(code: str, message: str, attempt: int) -> dict[str, Any]:
    return {"code": code, "message": message[:2000], "attempt": attempt}


def process_job(job_id: uuid.UUID | None, *, task_name: str | None = None) -> Answer:
    settings = job_settings()
    log: dict[str, Any] = {"job_id": str(job_id) if job_id else None, "task_name": task_name}
    logger.info(f"Received task for job {job_id}", extra=log)
    if job_id is None:
        return Answer(200, {"outcome": "unknown_job"})

    with connection() as conn:
        claim = transitions.claim(conn, job_id, lease_seconds=settings.timeout_seconds)

    job = claim.job
    if job is None:
        if job_id.int == 0:  # the nil id is no job's (ids are random): a probe, e.g. make run's warm-up
            return Answer(200, {"job_id": str(job_id), "outcome": "unknown_job"})
        logger.warning("Task for unknown job; acknowledging so it is not retried", extra=log)
        return Answer(200, {"job_id": str(job_id), "outcome": "unknown_job"})
    if not claim.claimed:
        return _answer_unclaimed(job, claim, log)

    attempt = job.attempts
    log["attempt"] = attempt
    kind = get_kind(job.job_kind)
    try:
        if kind is None:
            raise PermanentJobError("unknown_kind", f"No handler for job kind {job.job_kind!r}.")
        completion = kind.run(job)
    except PermanentJobError as failure:
        return _record_failure(job, _error(failure.code, failure.detail, attempt), final=True, log=log)
    except Exception as failure:  # the handler's own fault: retry while attempts remain
        logger.warning(
            "Job attempt failed",
            extra={**log, "error": repr(failure), "traceback": traceback.format_exc(limit=8)},
        )
        final = attempt >= job.max_attempts
        code = "attempts_exhausted" if final else "handler_failed"
        message = f"{type(failure).__name__}: {failure}"
        return _record_failure(job, _error(code, message, attempt), final=final, log=log)

    try:
        created = _finish(job.id, attempt, completion)
    except (_Superseded, QueryError) as error:
        if isinstance(error, QueryError) and not error.unique_violation:
            raise
        # Canceled meanwhile, or a newer attempt took over and (maybe) finished: our writes rolled back.
        logger.info("Attempt superseded; its writes were discarded", extra=log)
        return Answer(200, {"job_id": str(job.id), "outcome": "superseded"})
    if created:
        # Committed first, then dispatched (as create_job does): a failed dispatch leaves the
        # section queued for rescue_jobs.
        if settings.auto_process:
            for child in created:
                dispatch_job(child)
        logger.info("Job planned; its sections are dispatched", extra={**log, "sections": len(created)})
    else:
        logger.info("Job completed successfully.", extra=log)
    return Answer(200, {"job_id": str(job.id), "status": completion.status, "result": completion.result})


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


def _answer_unclaimed(job: Job, claim: transitions.Claim, log: dict[str, Any]) -> Answer:
    body = {"job_id": str(job.id), "status": job.status}
    if job.status in FINAL_STATUSES:
        return Answer(200, {**body, "outcome": "already_final"})
    if job.waiting:  # planned: its sections do the work and the last one finishes it
        return Answer(200, {**body, "outcome": "waiting"})
    lease_live = (
        job.status == JobStatus.RUNNING
        and job.lease_expires_at is not None
        and claim.now is not None
        and job.lease_expires_at > claim.now
    )
    if lease_live:
        assert job.lease_expires_at is not None and claim.now is not None
        wait = max(1, math.ceil((job.lease_expires_at - claim.now).total_seconds()))
        return Answer(503, {**body, "outcome": "lease_held"}, {"Retry-After": str(wait)})
    if job.attempts >= job.max_attempts:
        error = _error("attempts_exhausted", "No attempts left after the last lease expired.", job.attempts)
        with connection() as conn:
            transitions.expire(conn, job.id, error=error)
            if job.parent_id is not None:
                transitions.fail_parents_of_failed_sections(conn, parent_id=job.parent_id)
        logger.error("Job out of attempts", extra=log)
        return Answer(200, {**body, "status": JobStatus.ERROR, "outcome": "attempts_exhausted"})
    # Queued yet not claimed: a concurrent delivery won the row lock a moment ago.
    return Answer(503, {**body, "outcome": "contended"}, {"Retry-After": "1"})


def _record_failure(job: Job, error: dict[str, Any], *, final: bool, log: dict[str, Any]) -> Answer:
    with connection() as conn:
        recorded = transitions.fail(conn, job.id, attempt=job.attempts, error=error, final=final)
        if recorded and final and job.parent_id is not None:
            # A section out of attempts fails its parent and cancels its siblings (rescue_jobs
            # repeats this for every parent, should we die in between).
            transitions.fail_parents_of_failed_sections(conn, parent_id=job.parent_id)
    body = {"job_id": str(job.id), "error": {"code": error["code"], "message": error["message"]}}
    if not recorded:
        logger.info("Failure not recorded: the claim was lost meanwhile", extra=log)
        return Answer(200, {**body, "outcome": "superseded"})
    if final:
        logger.error("Job failed", extra={**log, "error_code": error["code"]})
        return Answer(200, {**body, "status": JobStatus.ERROR})
    logger.warning("Job will be retried", extra={**log, "error_code": error["code"]})
    return Answer(500, {**body, "status": JobStatus.QUEUED, "outcome": "retry"})

"""Creating, reading and canceling jobs: the operations behind create_job, get_job and cancel_job
(and the operators' cancel, and the scheduled maintenance jobs' submit)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from common.jobs import queries, transitions
from common.jobs.dispatch import dispatch_job
from common.jobs.kinds import get_kind, user_kind
from common.jobs.model import Job, JobStatus, Progress
from common.jobs.settings import job_settings
from common.platform import telemetry
from common.platform.db import connection, transaction
from common.platform.errors import Conflict, IdempotencyConflict, NotFound, ValidationFailed
from common.platform.log import logger
from common.platform.validation import FieldErrors, check_text, parse_id, reject_unknown


@dataclass(frozen=True)
class Created:
    job: Job
    created: bool  # False: an identical earlier request with the same key


def parse_create_request(body: Any) -> tuple[str, str, dict[str, Any]]:
    """(job_kind, idempotency_key, normalised payload) or ValidationFailed with every problem."""
    if not isinstance(body, dict):
        raise ValidationFailed(
            "The body must be a JSON object.",
            errors=[{"field": "", "message": "must be an object"}],
        )
    errors = FieldErrors()
    reject_unknown(errors, body, {"job_kind", "idempotency_key", "payload"})
    key = check_text(errors, body, "idempotency_key", required=True, min_len=1, max_len=200)
    kind = body.get("job_kind")
    if kind is None:
        errors.add("job_kind", "is required")
    errors.raise_if_any()
    job_kind = user_kind(kind)
    assert key is not None
    return job_kind.kind, key, job_kind.validate(body.get("payload"))


def create_job(user_id: str, body: Any) -> Created:
    kind, key, payload = parse_create_request(body)
    return submit_job(
        user_id=user_id,
        job_kind=kind,
        idempotency_key=key,
        request_json={"job_kind": kind, "payload": payload},
    )


def submit_job(
    *, user_id: str | None, job_kind: str, idempotency_key: str, request_json: dict[str, Any]
) -> Created:
    """Insert a queued job and dispatch it, or return the job an identical earlier request created
    (409 if the key was used with a different request). Shared by create_job and the scheduled
    maintenance jobs (user_id None). A kind with an admission (tiers) is held to its limits in the
    create statement itself."""
    settings = job_settings()
    kind = get_kind(job_kind)
    admission = kind.admission if kind is not None and user_id is not None else None
    # Autocommit: the create (for a user: the lock, the user upsert, the limits' counts) is one
    # statement; the replay lookup after a conflict needs no atomicity with it because a key, once
    # taken, stays taken.
    with connection() as conn:
        job = transitions.create(
            conn,
            user_id=user_id,
            job_kind=job_kind,
            idempotency_key=idempotency_key,
            request_json=request_json,
            max_attempts=settings.policy(job_kind).max_attempts,
            limits=admission.limits() if admission is not None else None,
            traceparent=telemetry.traceparent(),
        )
        if isinstance(job, transitions.Refused):
            assert admission is not None
            raise admission.refusal(job)
        if job is None:
            existing = queries.find_job_by_key(
                conn, user_id=user_id, job_kind=job_kind, idempotency_key=idempotency_key
            )
            if existing is None:  # the conflicting row vanished; cannot happen without deletes
                raise IdempotencyConflict("The idempotency key is in use; retry.")
            if existing.request_json != request_json:
                raise IdempotencyConflict("This idempotency_key was already used with a different request.")
            return Created(job=existing, created=False)
    if logger.isEnabledFor(logging.INFO):  # the hot path: skip building the record when off
        logger.info("Job created", extra={"job_id": str(job.id), "job_kind": job_kind})
    telemetry.record("dylen.jobs.created", 1, job_kind=job_kind)
    if settings.auto_process:
        dispatch_job(job)
    return Created(job=job, created=True)


def get_job(user_id: str, raw_id: str) -> tuple[Job, Progress]:
    """The caller's job with its progress; a section (internal) is not found, like another's job."""
    job_id = parse_id(raw_id, what="job", caller="user")
    with connection() as conn:
        found = queries.get_job_with_progress(conn, job_id)
    if found is None or found[0].user_id != user_id or found[0].parent_id is not None:
        raise NotFound("No such job.")
    return found


def cancel_job(user_id: str, raw_id: str) -> Job:
    """The caller's queued or running job -> canceled; 404 if not theirs, 409 if already final."""
    return cancel(parse_id(raw_id, what="job", caller="user"), owner=user_id)


def cancel(job_id: uuid.UUID, *, owner: str | None) -> Job:
    """`queued|running` -> `canceled`: the owner's job when `owner` is given, any job for operators
    (None). 404 when there is no such job (or it is not the owner's), 409 when it is already final."""
    with transaction() as conn:
        canceled = transitions.cancel(conn, job_id, owner=owner)
        current = None if canceled is not None else queries.get_job(conn, job_id)
    if canceled is not None:
        job, sections = canceled
        logger.info("Job canceled", extra={"job_id": str(job.id), "sections_canceled": sections})
        return job
    if current is None or (owner is not None and (current.user_id != owner or current.parent_id)):
        raise NotFound("No such job." if owner is not None else f"No job {job_id}.")
    if current.parent_id is not None:
        raise Conflict(f"Job {job_id} is a section of job {current.parent_id}; cancel that job.")
    subject = "The job" if owner is not None else f"Job {job_id}"
    raise Conflict(f"{subject} is already {current.status}; only queued or running jobs can be canceled.")


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def job_view(job: Job, progress: Progress | None = None) -> dict[str, Any]:
    """The user's view; `progress` where it was read with the job (get_job). An error is a code and
    the safe message the job system wrote for it, never an exception's text."""
    error = None
    if job.error_json:
        error = {"code": job.error_json.get("code"), "message": job.error_json.get("message")}
    view = {
        "job_id": str(job.id),
        "job_kind": job.job_kind,
        "status": job.status,
        "attempts": job.attempts_used,
        "next_attempt_at": _iso(job.run_after) if job.status == JobStatus.QUEUED else None,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "completed_at": _iso(job.completed_at),
        "result": job.result_json if job.status == JobStatus.DONE else None,
        "error": error,
    }
    if progress is not None:
        view["progress"] = {"completed": progress.completed, "total": progress.total}
    return view

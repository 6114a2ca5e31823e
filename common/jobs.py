"""create_job, get_job and cancel_job: the user-facing job operations."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from common import store
from common.config import get_settings
from common.db import connection, transaction
from common.errors import Conflict, IdempotencyConflict, NotFound, ValidationFailed
from common.handlers import user_handler
from common.log import logger
from common.validation import FieldErrors, check_text, reject_unknown


@dataclass(frozen=True)
class Created:
    job: store.Job
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
    handler = user_handler(kind)
    assert key is not None
    return handler.kind, key, handler.validate(body.get("payload"))


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
    maintenance jobs (user_id None)."""
    settings = get_settings()
    # Autocommit: the insert (with its user upsert) is one statement; the replay lookup after a
    # conflict needs no atomicity with it because jobs are never deleted.
    with connection() as conn:
        job = store.insert_job(
            conn,
            user_id=user_id,
            job_kind=job_kind,
            idempotency_key=idempotency_key,
            request_json=request_json,
            max_attempts=settings.job_max_attempts,
        )
        if job is None:
            existing = store.find_job_by_key(
                conn, user_id=user_id, job_kind=job_kind, idempotency_key=idempotency_key
            )
            if existing is None:  # the conflicting row vanished; cannot happen without deletes
                raise IdempotencyConflict("The idempotency key is in use; retry.")
            if existing.request_json != request_json:
                raise IdempotencyConflict("This idempotency_key was already used with a different request.")
            return Created(job=existing, created=False)
    if logger.isEnabledFor(logging.INFO):  # the hot path: skip building the record when off
        logger.info("Job created", extra={"job_id": str(job.id), "job_kind": job_kind})
    if settings.auto_process:
        from common.dispatch import dispatch_job

        dispatch_job(job)
    return Created(job=job, created=True)


def parse_job_id(raw: str) -> uuid.UUID:
    """A malformed id is simply not found: never a 500, and no hint of what exists."""
    try:
        return uuid.UUID(raw)
    except (ValueError, AttributeError, TypeError):
        raise NotFound("No such job.") from None


def get_job(user_id: str, raw_id: str) -> store.Job:
    job_id = parse_job_id(raw_id)
    with connection() as conn:
        job = store.get_job(conn, job_id)
    if job is None or job.user_id != user_id:
        raise NotFound("No such job.")
    return job


def cancel_job(user_id: str, raw_id: str) -> store.Job:
    """The caller's queued or running job -> canceled; 404 if not theirs, 409 if already final."""
    job_id = parse_job_id(raw_id)
    with transaction() as conn:
        job = store.cancel_job(conn, job_id, owner=user_id)
        current = None if job is not None else store.get_job(conn, job_id)
    if job is not None:
        logger.info("Job canceled", extra={"job_id": str(job.id)})
        return job
    if current is None or current.user_id != user_id:
        raise NotFound("No such job.")
    raise Conflict(f"The job is already {current.status}; only queued or running jobs can be canceled.")


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def job_view(job: store.Job) -> dict[str, Any]:
    error = None
    if job.error_json:
        error = {"code": job.error_json.get("code"), "message": job.error_json.get("message")}
    return {
        "job_id": str(job.id),
        "job_kind": job.job_kind,
        "status": job.status,
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "completed_at": _iso(job.completed_at),
        "result": job.result_json if job.status == "done" else None,
        "error": error,
    }

"""Creating, reading and canceling jobs: the operations behind create_job, get_job and cancel_job
(and the operators' cancel, and the scheduled maintenance jobs' submit)."""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from common.jobs import queries
from common.jobs.dispatch import dispatch_job
from common.jobs.kinds import get_kind, user_kind
from common.jobs.model import Job, JobStatus, Progress
from common.platform.config import Settings, get_settings
from common.platform.db import connection, transaction
from common.platform.errors import (
    Conflict,
    IdempotencyConflict,
    NotFound,
    QuotaExceeded,
    TooManyActiveJobs,
    ValidationFailed,
)
from common.platform.log import logger
from common.platform.validation import FieldErrors, check_text, parse_uuid, reject_unknown


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
    maintenance jobs (user_id None)."""
    settings = get_settings()
    kind = get_kind(job_kind)
    # Autocommit: the insert (with its user upsert, and for a limited kind the lock and the count)
    # is one statement; the replay lookup after a conflict needs no atomicity with it because jobs
    # are never deleted.
    with connection() as conn:
        job: Job | queries.Refused | None
        if user_id is not None and kind is not None and kind.quota_limited:
            job = queries.insert_limited_job(
                conn,
                user_id=user_id,
                job_kind=job_kind,
                idempotency_key=idempotency_key,
                request_json=request_json,
                max_attempts=settings.job_max_attempts,
                daily_limits=settings.tier_daily_jobs,
                active_limits=settings.tier_active_jobs,
            )
        else:  # maintenance jobs (no user) and kinds without a quota
            job = queries.insert_job(
                conn,
                user_id=user_id,
                job_kind=job_kind,
                idempotency_key=idempotency_key,
                request_json=request_json,
                max_attempts=settings.job_max_attempts,
            )
        if isinstance(job, queries.Refused):
            raise limit_error(job, settings)
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
    if settings.auto_process:
        dispatch_job(job)
    return Created(job=job, created=True)


# The active limit frees up as soon as one of the user's jobs finishes: seconds, not hours.
ACTIVE_RETRY_AFTER_SECONDS = 5
_unknown_tiers_logged: set[str] = set()


def note_unknown_tier(tier: str | None, settings: Settings) -> None:
    """A tier missing from the limit maps gets free's limits; say so once per process and tier."""
    if tier is None or tier in _unknown_tiers_logged:
        return
    if tier not in settings.tier_daily_jobs or tier not in settings.tier_active_jobs:
        _unknown_tiers_logged.add(tier)
        logger.warning(
            "A user's tier is missing from DYLEN_TIER_DAILY_JOBS or DYLEN_TIER_ACTIVE_JOBS; "
            "it gets the free tier's limits",
            extra={"tier": tier},
        )


def limit_error(refused: queries.Refused, settings: Settings) -> QuotaExceeded | TooManyActiveJobs:
    note_unknown_tier(refused.tier, settings)
    if refused.outcome == "quota-exceeded":
        assert refused.resets_at is not None
        retry_after = max(1, math.ceil((refused.resets_at - refused.now).total_seconds()))
        return QuotaExceeded(
            f"The {refused.tier} tier allows {refused.limit} lesson jobs per UTC day; "
            f"the quota resets at {refused.resets_at.isoformat()}.",
            limit=refused.limit,
            used=refused.used,
            tier=refused.tier,
            retry_after=retry_after,
        )
    return TooManyActiveJobs(
        f"The {refused.tier} tier allows {refused.limit} jobs queued or running at once; "
        "retry when one has finished.",
        limit=refused.limit,
        used=refused.used,
        tier=refused.tier,
        retry_after=ACTIVE_RETRY_AFTER_SECONDS,
    )


def usage_view(usage: queries.Usage) -> dict[str, Any]:
    """`{"tier", "daily": {"limit", "used", "resets_at"}, "active": {"limit", "used"}}` of a
    quota-limited kind (a user with no job yet is on the free tier)."""
    settings = get_settings()
    tier = usage.tier or "free"
    note_unknown_tier(tier, settings)
    daily, active = settings.tier_daily_jobs, settings.tier_active_jobs
    return {
        "tier": tier,
        "daily": {
            "limit": daily.get(tier, daily["free"]),
            "used": usage.daily_used,
            "resets_at": (usage.day_start + timedelta(days=1)).isoformat(),
        },
        "active": {"limit": active.get(tier, active["free"]), "used": usage.active_used},
    }


def parse_job_id(raw: str) -> uuid.UUID:
    """A malformed id is simply not found: never a 500, and no hint of what exists."""
    job_id = parse_uuid(raw)
    if job_id is None:
        raise NotFound("No such job.")
    return job_id


def get_job(user_id: str, raw_id: str) -> tuple[Job, Progress]:
    """The caller's job with its progress; a section (internal) is not found, like another's job."""
    job_id = parse_job_id(raw_id)
    with connection() as conn:
        found = queries.get_job_with_progress(conn, job_id)
    if found is None or found[0].user_id != user_id or found[0].parent_id is not None:
        raise NotFound("No such job.")
    return found


def cancel_job(user_id: str, raw_id: str) -> Job:
    """The caller's queued or running job -> canceled; 404 if not theirs, 409 if already final."""
    return cancel(parse_job_id(raw_id), owner=user_id)


def cancel(job_id: uuid.UUID, *, owner: str | None) -> Job:
    """`queued|running` -> `canceled`: the owner's job when `owner` is given, any job for operators
    (None). 404 when there is no such job (or it is not the owner's), 409 when it is already final."""
    with transaction() as conn:
        job = queries.cancel_job(conn, job_id, owner=owner)
        # The parent first, then its sections (the lock order): none starts after this commits, and
        # a running one's result is discarded.
        sections = queries.cancel_sections(conn, job_id) if job is not None else 0
        current = None if job is not None else queries.get_job(conn, job_id)
    if job is not None:
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
    """The user's view; `progress` where it was read with the job (get_job)."""
    error = None
    if job.error_json:
        error = {"code": job.error_json.get("code"), "message": job.error_json.get("message")}
    view = {
        "job_id": str(job.id),
        "job_kind": job.job_kind,
        "status": job.status,
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "completed_at": _iso(job.completed_at),
        "result": job.result_json if job.status == JobStatus.DONE else None,
        "error": error,
    }
    if progress is not None:
        view["progress"] = {"completed": progress.completed, "total": progress.total}
    return view

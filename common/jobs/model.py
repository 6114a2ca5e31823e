"""The Job model: one dataclass, one status type."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    """`queued -> running -> done | error`, and `queued|running -> canceled`. The SQL spells the same
    values; a CHECK constraint in the migration keeps the column to them.

    A parent waiting on its sections is `running` with no lease (`Job.waiting`): nothing claims,
    times out or rescues it; its last section finishes it."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    CANCELED = "canceled"


FINAL_STATUSES = frozenset({JobStatus.DONE, JobStatus.ERROR, JobStatus.CANCELED})
ACTIVE_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
RETRYABLE_STATUSES = (JobStatus.ERROR, JobStatus.CANCELED)


JOB_COLUMNS = (
    "id, user_id, job_kind, status, idempotency_key, request_json, result_json, error_json, "
    "attempts, max_attempts, lease_expires_at, dispatched_at, created_at, updated_at, "
    "started_at, completed_at, parent_id, section_index, run_after, deferrals, waited_seconds, "
    "attempt_started_at, traceparent"
)


@dataclass(frozen=True)
class Job:
    id: uuid.UUID
    user_id: str | None
    job_kind: str
    status: JobStatus
    idempotency_key: str
    request_json: dict[str, Any]
    result_json: dict[str, Any] | None
    error_json: dict[str, Any] | None
    attempts: int
    max_attempts: int
    lease_expires_at: datetime | None
    dispatched_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    parent_id: uuid.UUID | None = None  # set on a section: the job that planned it
    section_index: int | None = None
    run_after: datetime | None = None  # a scheduled retry or deferral: not claimed before this
    deferrals: int = 0  # claims given back (RetryLater, infrastructure faults): not attempts used
    waited_seconds: float = 0.0  # deferred so far by RetryLater and infrastructure faults
    attempt_started_at: datetime | None = None  # when the current (or last) attempt began
    traceparent: str | None = None  # the span that created it (W3C): its dispatches continue that trace

    @classmethod
    def queued(
        cls,
        *,
        id: uuid.UUID,
        user_id: str | None,
        job_kind: str,
        idempotency_key: str,
        request_json: dict[str, Any],
        max_attempts: int,
        now: datetime,
        traceparent: str | None = None,
    ) -> Job:
        """A job as insert_job stores it: queued, dispatched now, no attempt yet."""
        return cls(
            id=id,
            user_id=user_id,
            job_kind=job_kind,
            status=JobStatus.QUEUED,
            idempotency_key=idempotency_key,
            request_json=request_json,
            result_json=None,
            error_json=None,
            attempts=0,
            max_attempts=max_attempts,
            lease_expires_at=None,
            dispatched_at=now,
            created_at=now,
            updated_at=now,
            started_at=None,
            completed_at=None,
            traceparent=traceparent,
        )

    @classmethod
    def from_row(cls, row: Any) -> Job:
        values = {key: getattr(row, key) for key in cls.__dataclass_fields__}
        values["status"] = JobStatus(values["status"])
        return cls(**values)

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def attempts_used(self) -> int:
        """Attempts that counted: `attempts` is every claim (the finish's fence), deferrals aside."""
        return self.attempts - self.deferrals

    @property
    def waiting(self) -> bool:
        """Planned, its sections at work: a claim always sets a lease, so only a parent lacks one."""
        return self.status == JobStatus.RUNNING and self.lease_expires_at is None


@dataclass(frozen=True)
class Progress:
    """Sections done of sections planned; a job that has no sections (yet) counts as one step."""

    completed: int
    total: int

    @classmethod
    def of(cls, job: Job, *, sections_done: int, sections: int) -> Progress:
        if sections:
            return cls(completed=sections_done, total=sections)
        return cls(completed=1 if job.status == JobStatus.DONE else 0, total=1)


# Built once: json.dumps(..., ensure_ascii=False) builds an encoder per call.

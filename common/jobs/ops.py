"""Operator actions on jobs (`python -m common.cli jobs ...`): inspect, retry, cancel, stats.

Inputs arrive as the raw strings an operator typed; every bad one becomes a DylenError with a message
that says what was wrong, so the CLI prints it and exits non-zero instead of showing a traceback.
SQL lives in common.jobs.queries; this module validates, sequences transactions and dispatches.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from common.jobs import queries, service, transitions
from common.jobs.dispatch import deliver_job
from common.jobs.dispatch.base import Delivery
from common.jobs.kinds import get_kind, known_kinds, retry_refusals, section_kinds
from common.jobs.model import RETRYABLE_STATUSES, Job, JobStatus
from common.jobs.settings import job_settings
from common.platform.db import Connection, named_errors, transaction
from common.platform.errors import Conflict, NotFound, ValidationFailed
from common.platform.validation import parse_id, text_problem

STATUSES = tuple(JobStatus)
ERROR_RATE_WINDOW_SECONDS = 3600.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
MAX_DURATION_DAYS = 36500  # a century: beyond it PostgreSQL's interval arithmetic overflows soon


@contextmanager
def _db() -> Iterator[Connection]:
    """transaction(), naming the cause of a database failure."""
    with named_errors(), transaction() as conn:
        yield conn


# --- input parsing ---------------------------------------------------------------------------------


def parse_duration(raw: str) -> float:
    """`30s`, `10m`, `2h`, `1d` -> seconds (> 0)."""
    match = _DURATION.match(raw or "")
    seconds = float(match.group(1)) * _UNITS[match.group(2)] if match else 0.0
    if seconds <= 0:
        raise ValidationFailed(
            f"Malformed duration {raw!r}: use a positive number and a unit, e.g. 30s, 10m, 2h, 1d."
        )
    if seconds > MAX_DURATION_DAYS * 86400:
        raise ValidationFailed(f"Duration {raw!r} is too long: at most {MAX_DURATION_DAYS}d.")
    return seconds


def checked_text(value: str | None, *, what: str) -> str | None:
    """`value` as typed, or a 422 naming the filter when PostgreSQL could not compare it (a NUL)."""
    problem = text_problem(value) if value is not None else None
    if problem:
        raise ValidationFailed(f"The {what} {value!r} {problem}.")
    return value


def parse_statuses(
    values: Sequence[str] | None, *, allowed: Sequence[str] = STATUSES
) -> tuple[str, ...] | None:
    """Repeated and/or comma-separated statuses, each one of `allowed`; None when not given."""
    if not values:
        return None
    statuses = tuple(dict.fromkeys(s.strip() for v in values for s in v.split(",") if s.strip()))
    unknown = [s for s in statuses if s not in allowed]
    if unknown or not statuses:
        raise ValidationFailed(
            f"Unknown status {', '.join(unknown) or '(empty)'}: use one of {', '.join(allowed)}."
        )
    return statuses


def _check_kinds(conn: Connection, values: Sequence[str] | None) -> tuple[str, ...] | None:
    """Kinds with a handler, or present in the table (maintenance kinds); a typo is an error."""
    if not values:
        return None
    kinds = tuple(dict.fromkeys(k.strip() for v in values for k in v.split(",") if k.strip()))
    for kind in kinds:
        checked_text(kind, what="job kind")
    unknown = [k for k in kinds if get_kind(k) is None and not queries.job_kind_exists(conn, k)]
    if unknown or not kinds:
        known = ", ".join(known_kinds())
        raise ValidationFailed(
            f"Unknown job kind {', '.join(unknown) or '(empty)'}: known kinds are {known}."
        )
    return kinds


@dataclass(frozen=True)
class Filters:
    """What the operator typed; validated into a JobFilter inside a transaction."""

    statuses: Sequence[str] | None = None
    kinds: Sequence[str] | None = None
    user_id: str | None = None
    older_than: str | None = None
    since: str | None = None
    error_code: str | None = None
    before: tuple[datetime, uuid.UUID] | None = None  # a page's cursor (the last row's created_at, id)

    def resolve(self, conn: Connection, *, allowed_statuses: Sequence[str] = STATUSES) -> queries.JobFilter:
        kinds = _check_kinds(conn, self.kinds)
        return queries.JobFilter(
            error_code=checked_text(self.error_code, what="error code"),
            before=self.before,
            statuses=parse_statuses(self.statuses, allowed=allowed_statuses),
            kinds=kinds,
            # Asked for by their kind, sections are listed; otherwise they show under their parent.
            top_level=not (kinds and set(kinds) & set(section_kinds())),
            user_id=checked_text(self.user_id, what="user"),
            created_before_seconds=parse_duration(self.older_than) if self.older_than is not None else None,
            finished_within_seconds=parse_duration(self.since) if self.since is not None else None,
        )


# --- commands --------------------------------------------------------------------------------------


def list_jobs(filters: Filters, *, limit: int = 50) -> list[Job]:
    if limit < 1:
        raise ValidationFailed(f"--limit must be at least 1, got {limit}.")
    with _db() as conn:
        return queries.list_jobs(conn, filters.resolve(conn), limit=limit)


@dataclass(frozen=True)
class Shown:
    job: Job
    sections: list[Job]  # a parent's, in plan order
    attempts: list[queries.Attempt]


def show_job(raw_id: str) -> Shown:
    """The job, its attempts and, for a parent, its sections in plan order."""
    job_id = parse_id(raw_id, what="job", caller="operator")
    with _db() as conn:
        job = queries.get_job(conn, job_id)
        if job is None:
            raise NotFound(f"No job {job_id}.")
        return Shown(job, queries.list_sections(conn, job_id), queries.list_attempts(conn, job))


def cancel_job(raw_id: str) -> Job:
    job_id = parse_id(raw_id, what="job", caller="operator")
    with named_errors():
        return service.cancel(job_id, owner=None)


@dataclass(frozen=True)
class Canceled:
    jobs: list[Job]
    refused: dict[uuid.UUID, str]  # job id -> why it was not canceled (already final, a section, gone)


def cancel_jobs(job_ids: Sequence[uuid.UUID]) -> Canceled:
    """Cancel each of these jobs as `cancel_job` does (each its own transaction, its sections with
    it); the ones that cannot be canceled are reported, not raised, so one does not stop the rest."""
    canceled: list[Job] = []
    refused: dict[uuid.UUID, str] = {}
    for job_id in job_ids:
        try:
            with named_errors():
                canceled.append(service.cancel(job_id, owner=None))
        except (Conflict, NotFound) as error:
            refused[job_id] = error.detail
    return Canceled(canceled, refused)


@dataclass(frozen=True)
class Retried:
    jobs: list[Job]
    deliveries: list[Delivery]  # one per `to_dispatch` job when dispatch is enabled; failed ones stay queued
    dispatch_enabled: bool
    sections: list[Job] = field(default_factory=list)  # unfinished sections of retried parents

    @property
    def to_dispatch(self) -> list[Job]:
        """Queued ones: a parent that had planned waits on its sections instead."""
        return [job for job in (*self.jobs, *self.sections) if job.status == JobStatus.QUEUED]

    @property
    def dispatched(self) -> int:
        return sum(1 for delivery in self.deliveries if delivery.ok)


def retry_job(raw_id: str) -> Retried:
    job_id = parse_id(raw_id, what="job", caller="operator")
    with _db() as conn:
        current = queries.get_job(conn, job_id)
        refusal = retry_refusals(conn, [current]).get(job_id) if current is not None else None
        jobs = (
            [] if refusal else transitions.requeue(conn, [job_id], extra_attempts=job_settings().max_attempts)
        )
    if not jobs:
        if current is None:
            raise NotFound(f"No job {job_id}.")
        if current.status not in RETRYABLE_STATUSES:
            raise Conflict(f"Job {job_id} is {current.status}; only error or canceled jobs can be retried.")
        if refusal:
            raise Conflict(f"Job {job_id} {refusal}; it cannot be retried.")
        raise Conflict(f"Job {job_id} changed while retrying; look at it again.")
    return _dispatch(jobs)


def retry_candidates(filters: Filters) -> list[Job]:
    """The jobs a bulk retry would requeue (error or canceled only), for the operator to confirm."""
    if not any(
        (
            filters.statuses,
            filters.kinds,
            filters.user_id,
            filters.older_than,
            filters.since,
            filters.error_code,
        )
    ):
        raise ValidationFailed("Give a job id, or at least one filter (--status, --kind, --user, --since).")
    with _db() as conn:
        # Top-level jobs only: a section is retried with its lesson (requeue takes parents only).
        job_filter = replace(filters.resolve(conn, allowed_statuses=RETRYABLE_STATUSES), top_level=True)
        if job_filter.statuses is None:
            job_filter = replace(job_filter, statuses=RETRYABLE_STATUSES)
        return queries.list_jobs(conn, job_filter, limit=None)


def retry_jobs(job_ids: Sequence[uuid.UUID]) -> Retried:
    """Requeue exactly these jobs (those still error or canceled) and dispatch them."""
    if not job_ids:
        return Retried(jobs=[], deliveries=[], dispatch_enabled=job_settings().auto_process)
    with _db() as conn:
        refused = retry_refusals(conn, queries.get_jobs(conn, list(job_ids)))
        allowed = [job_id for job_id in job_ids if job_id not in refused]
        jobs = (
            transitions.requeue(conn, allowed, extra_attempts=job_settings().max_attempts) if allowed else []
        )
    return _dispatch(jobs)


def _dispatch(requeued: list[Job]) -> Retried:
    # Like create_job: committed first, then dispatched; with auto-process off (manual setups) the
    # job waits for a manual delivery or rescue_jobs. The operator waits for each outcome.
    jobs = [job for job in requeued if job.parent_id is None]
    sections = [job for job in requeued if job.parent_id is not None]
    outcome = Retried(
        jobs=jobs, deliveries=[], dispatch_enabled=job_settings().auto_process, sections=sections
    )
    if not outcome.dispatch_enabled or not outcome.to_dispatch:
        return outcome
    with ThreadPoolExecutor(max_workers=min(8, len(outcome.to_dispatch))) as pool:
        deliveries = list(pool.map(deliver_job, outcome.to_dispatch))
    return replace(outcome, deliveries=deliveries)


def stats() -> dict[str, Any]:
    with _db() as conn:
        counts = queries.job_counts(conn)
        oldest = queries.oldest_queued(conn)
        finished = queries.finished_counts(
            conn, within_seconds=ERROR_RATE_WINDOW_SECONDS, leave_out=list(section_kinds())
        )
    by_kind: dict[str, dict[str, int]] = {}
    for row in counts:
        by_kind.setdefault(row.job_kind, dict.fromkeys(STATUSES, 0))[row.status] = int(row.n)
    outcomes = int(finished.done) + int(finished.error)
    return {
        "counts": by_kind,
        "oldest_queued": None
        if oldest is None
        else {
            "job_id": str(oldest.id),
            "job_kind": oldest.job_kind,
            "age_seconds": float(oldest.age_seconds),
        },
        "last_hour": {
            "done": int(finished.done),
            "error": int(finished.error),
            # Share of jobs that finished in the window and ended `error` (canceled ones and
            # sections excluded: a lesson counts once, however many of its sections failed).
            "error_rate": (int(finished.error) / outcomes) if outcomes else None,
        },
    }


def format_duration(seconds: float) -> str:
    """`42.0s`, `3m12s`, `2h5m`, `1d3h`: how operators read an age or a run's length."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            major, rest = divmod(int(seconds), size)
            minor = {"d": (rest // 3600, "h"), "h": (rest // 60, "m"), "m": (rest, "s")}[unit]
            return f"{major}{unit}{minor[0]}{minor[1]}"
    return f"{seconds:.0f}s"


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def job_detail(
    job: Job, sections: Sequence[Job] = (), attempts: Sequence[queries.Attempt] = ()
) -> dict[str, Any]:
    """Everything an operator needs about one job, JSON-ready; a parent's sections with their
    status and attempts, a section's parent."""
    detail: dict[str, Any] = {
        "job_id": str(job.id),
        "user_id": job.user_id,
        "job_kind": job.job_kind,
        "status": job.status,
        "attempts": job.attempts_used,
        "deferrals": job.deferrals,
        "waited_seconds": job.waited_seconds,
        "next_attempt_at": _iso(job.run_after),
        "max_attempts": job.max_attempts,
        "idempotency_key": job.idempotency_key,
        "created_at": _iso(job.created_at),
        "dispatched_at": _iso(job.dispatched_at),
        "started_at": _iso(job.started_at),
        "completed_at": _iso(job.completed_at),
        "updated_at": _iso(job.updated_at),
        "lease_expires_at": _iso(job.lease_expires_at),
        "request": job.request_json,
        "result": job.result_json,
        "error": job.error_json,
    }
    if job.parent_id is not None:
        detail.update(parent_id=str(job.parent_id), section_index=job.section_index)
    if attempts:
        detail["attempt_history"] = [
            {
                "attempt": a.attempt,
                "outcome": a.outcome,
                "started_at": _iso(a.started_at),
                "ended_at": _iso(a.ended_at),
                "seconds": a.seconds,
                "error_code": a.error_code,
                "error_message": a.error_message,
                "error_detail": a.error_detail,
                "instance": a.instance,
            }
            for a in attempts
        ]
    if sections:
        detail["sections"] = [
            {
                "section_index": s.section_index,
                "job_id": str(s.id),
                "heading": s.request_json.get("heading"),
                "status": s.status,
                "attempts": s.attempts,
                "max_attempts": s.max_attempts,
                "error": s.error_json,
            }
            for s in sections
        ]
    return detail

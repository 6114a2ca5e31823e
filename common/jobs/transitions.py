"""A job's life: every change of `jobs` happens here, each a named, guarded transition.

    create -> queued -> claim -> running -> complete | plan (waiting) -> fan_in -> done
                                        -> retry | defer (queued, run_after) | fail (error)
                                        | expire (error, lease gone, no attempts left)
    queued | running -> cancel -> canceled;  error | canceled -> requeue (operators)
    rescue: queued and stale, or running with its lease gone -> queued (or error)
    prune: finished long enough ago -> deleted (retention)

Statements that decide correctness are single set-based UPDATEs guarded by the row's state, so
concurrent deliveries are serialised by PostgreSQL's row lock. A finish is conditional on the claim
still being this attempt's (`running`, same `attempts`): a duplicate delivery, a stale attempt or a
cancel never finishes a job twice. A parent waiting on its sections is `running` with no lease; lock
order wherever a parent and its sections change together: the parent row first.

The SQL is in transitions.sql beside this file, one named block per statement. Products never
write it. A kind that stores an output with `done` declares an `Output` (an
INSERT ... SELECT ... FROM done) at module level; the transition runs it in the same statement.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from common.jobs.model import JOB_COLUMNS, Job
from common.platform.db import Connection, Statement, jsonb
from common.platform.db.sqlfile import named_sql

_ATTEMPT_HOLDS = "id = :id AND status = 'running' AND attempts = :attempt"
_SQL = named_sql(
    Path(__file__).with_suffix(".sql"),
    columns=JOB_COLUMNS,
    jobs_columns=", ".join("jobs." + c.strip() for c in JOB_COLUMNS.split(",")),
    attempt_holds=_ATTEMPT_HOLDS,
    done="status = 'done', result_json = CAST(:result AS jsonb), error_json = NULL, "
    "lease_expires_at = NULL, completed_at = now(), updated_at = now()",
)

# --- create -----------------------------------------------------------------------------------------

_CREATE = Statement(_SQL["create"], prepare=True)
_CREATE_FOR_USER = Statement(_SQL["create_for_user"], prepare=True)


@dataclass(frozen=True)
class Limits:
    """Per-tier limits a kind's creates are held to (tier -> number; a missing tier gets free's):
    jobs a UTC day, jobs active at once, and the user's tokens a UTC day (None: not limited)."""

    daily: dict[str, int]
    active: dict[str, int]
    tokens: dict[str, int] | None = None


@dataclass(frozen=True)
class Refused:
    """Why a create wrote nothing: `outcome` is 'quota-exceeded', 'token-budget-exceeded' or
    'too-many-active-jobs'."""

    outcome: str
    tier: str
    limit: int
    used: int
    resets_at: datetime | None  # a daily limit's reset (the next UTC midnight)
    now: datetime  # the database's clock (or the injected one)


def create(
    conn: Connection,
    *,
    user_id: str | None,
    job_kind: str,
    idempotency_key: str,
    request_json: dict[str, Any],
    max_attempts: int,
    limits: Limits | None = None,
    now: datetime | None = None,
    traceparent: str | None = None,
) -> Job | Refused | None:
    """-> `queued`; None when the key exists (a replay or a 409: the caller looks), Refused when a
    limit says no. `now` None is the database's clock; tests inject one to cross a UTC midnight."""
    params: dict[str, Any] = {"job_kind": job_kind, "key": idempotency_key, "request": jsonb(request_json)}
    params.update(max_attempts=max_attempts, traceparent=traceparent)
    if user_id is None:
        row = conn.execute(_CREATE, params).first()
    else:
        params.update(
            user_id=user_id,
            daily_limits=jsonb(limits.daily) if limits else None,
            active_limits=jsonb(limits.active) if limits else None,
            token_limits=jsonb(limits.tokens) if limits and limits.tokens is not None else None,
            now=now,
        )
        row = conn.execute(_CREATE_FOR_USER, params).first()
        if row is None or row.outcome == "exists":
            return None
        if row.outcome != "created":
            return Refused(row.outcome, row.tier, row.quota_limit, row.used, row.resets_at, row.db_now)
    if row is None:
        return None
    return Job.queued(
        id=row.id,
        user_id=user_id,
        job_kind=job_kind,
        idempotency_key=idempotency_key,
        request_json=request_json,
        max_attempts=max_attempts,
        now=row.created_at,
        traceparent=traceparent,
    )


# --- claim ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """Outcome of one claim statement: `claimed` is True only for the delivery that won."""

    claimed: bool
    job: Job | None  # None: no such job
    now: datetime | None = None


_CLAIM = Statement(_SQL["claim"], prepare=True)


# A delivery this much before its job's run_after still runs it: Cloud Tasks' clock and the
# database's differ a little, and a scheduled task turned away would wait for rescue_jobs.
EARLY_SECONDS = 2.0


def claim(conn: Connection, job_id: uuid.UUID, *, lease_seconds: int) -> Claim:
    """`queued` (due: no run_after in the future) or `running` with its lease gone -> `running`,
    attempts + 1, a new lease."""
    params = {"id": job_id, "lease_seconds": lease_seconds, "early_seconds": EARLY_SECONDS}
    row = conn.execute(_CLAIM, params).first()
    if row is None:
        return Claim(claimed=False, job=None)
    return Claim(claimed=bool(row.claimed), job=Job.from_row(row), now=row.db_now)


# --- done, and the outputs products attach to it ------------------------------------------------------

# What an Output's SQL reads from `done`: the finished job. `section_results` is the sections'
# results in plan order (fan-in), NULL for a one-step job.
DONE_ROW = "id, user_id, request_json, plan, section_results"

_COMPLETE = Statement(_SQL["complete"], prepare=True)


class Output(Statement):
    """A product's statement that stores a job's output from the row its `done` transition returns:
    an `INSERT ... SELECT ... FROM done RETURNING ...` reading DONE_ROW's columns, prefixed with the
    transition it rides on (a one-step job's complete, or with `fan_in` a parent's fan-in): one
    prepared statement, so the output and `done` commit together or not at all. Declared at module
    level, like any prepared Statement."""

    __slots__ = ()

    def __init__(self, sql: str, *, fan_in: bool = False) -> None:
        super().__init__(_SQL["fan_in_with" if fan_in else "complete_with"] + "\n" + sql, prepare=True)


def complete(
    conn: Connection,
    job_id: uuid.UUID,
    *,
    attempt: int,
    result: dict[str, Any],
    output: Output | None = None,
    params: dict[str, Any] | None = None,
) -> bool:
    """`running` -> `done` (with the kind's output), only if this attempt still holds the claim."""
    values = {**(params or {}), "id": job_id, "attempt": attempt, "result": jsonb(result)}
    if output is None:
        return conn.execute(_COMPLETE, values).rowcount == 1
    return conn.execute(output, values).first() is not None


def fan_in(
    conn: Connection, parent_id: uuid.UUID, *, result: dict[str, Any], output: Output, params: dict[str, Any]
) -> bool:
    """The waiting parent -> `done` with its output once every section is; False while any is not."""
    values = {**params, "id": parent_id, "result": jsonb(result)}
    return conn.execute(output, values).first() is not None


# --- plan: a job that fans out into sections ----------------------------------------------------------

_PLAN = Statement(_SQL["plan"])


def plan(
    conn: Connection,
    job_id: uuid.UUID,
    *,
    attempt: int,
    plan: dict[str, Any],
    section_kind: str,
    max_attempts: int,
    instance: str | None = None,
    traceparent: str | None = None,
) -> list[Job] | None:
    """Store the plan, leave the job waiting (`running`, no lease) and insert one queued section per
    `plan["sections"]` entry, one statement; None if this attempt lost its claim."""
    rows = conn.execute(
        _PLAN,
        {
            "id": job_id,
            "attempt": attempt,
            "plan": jsonb(plan),
            "kind": section_kind,
            "max_attempts": max_attempts,
            "instance": instance,
            "traceparent": traceparent,
        },
    ).all()
    return [Job.from_row(row) for row in rows] or None


_FINISH_SECTION = Statement(_SQL["finish_section"], prepare=True)


def finish_section(conn: Connection, section: Job, *, attempt: int, result: dict[str, Any]) -> bool:
    """The section -> `done` if this attempt holds it and its parent still waits; run inside the
    transaction that then tries the parent's fan_in."""
    values = {"id": section.id, "parent_id": section.parent_id, "attempt": attempt, "result": jsonb(result)}
    return conn.execute(_FINISH_SECTION, values).rowcount == 1


# --- failure ------------------------------------------------------------------------------------------

_END_ATTEMPT = Statement(_SQL["end_attempt"], prepare=True)
_RECORD_ATTEMPT = Statement(_SQL["record_attempt"])


@dataclass(frozen=True)
class AttemptRecord:
    """What operators keep of an attempt that did not finish its job (job_attempts)."""

    outcome: str  # retry | deferred | failed | superseded
    code: str
    message: str  # the safe text users may see
    detail: str | None  # the raw error (exception, traceback), for operators only
    instance: str | None  # which instance ran it


def _end(
    conn: Connection,
    job_id: uuid.UUID,
    *,
    attempt: int,
    record: AttemptRecord,
    final: bool,
    delay: float = 0.0,
    refund: bool = False,
) -> Job | None:
    row = conn.execute(
        _END_ATTEMPT,
        {
            "id": job_id,
            "attempt": attempt,
            "final": final,
            "delay": delay,
            "refund": 1 if refund else 0,
            "waited": delay if refund else 0.0,
            "error": jsonb({"code": record.code, "message": record.message, "attempt": attempt}),
            **asdict(record),  # outcome, code, message, detail, instance
        },
    ).first()
    return Job.from_row(row) if row else None


def retry(
    conn: Connection, job_id: uuid.UUID, *, attempt: int, record: AttemptRecord, delay: float
) -> Job | None:
    """A failed attempt with attempts left -> `queued` for `delay` seconds from now (its backoff);
    None if this attempt no longer held the claim."""
    return _end(conn, job_id, attempt=attempt, record=record, final=False, delay=delay)


def defer(
    conn: Connection, job_id: uuid.UUID, *, attempt: int, record: AttemptRecord, delay: float
) -> Job | None:
    """ "Not now" (RetryLater, an infrastructure fault) -> `queued` for `delay` seconds from now,
    the attempt given back and the wait added to the job's `waited_seconds`."""
    return _end(conn, job_id, attempt=attempt, record=record, final=False, delay=delay, refund=True)


def fail(conn: Connection, job_id: uuid.UUID, *, attempt: int, record: AttemptRecord) -> Job | None:
    """The last attempt failed, or retrying cannot help -> `error`."""
    return _end(conn, job_id, attempt=attempt, record=record, final=True)


def record_attempt(conn: Connection, job_id: uuid.UUID, *, attempt: int, record: AttemptRecord) -> None:
    """Put on record an attempt that changed nothing (it lost its claim before it finished)."""
    conn.execute(_RECORD_ATTEMPT, {"id": job_id, "attempt": attempt, **asdict(record)})


_EXPIRE = Statement(_SQL["expire"])


def expire(conn: Connection, job_id: uuid.UUID, *, code: str, message: str) -> bool:
    """A job out of attempts whose last lease ran out -> `error`, the lost attempt on record."""
    params = {
        "id": job_id,
        "error": jsonb({"code": code, "message": message}),
        "code": code,
        "message": message,
    }
    return conn.execute(_EXPIRE, params).rowcount == 1


# Run right after a section's last attempt fails, and by rescue_jobs for every parent, so a crash
# in between is repaired.
_FAIL_PARENTS = Statement(_SQL["fail_parents"])


def fail_parents_of_failed_sections(conn: Connection, *, parent_id: uuid.UUID | None = None) -> int:
    """Apply the rule above to one parent (`parent_id`) or every waiting one (None)."""
    return len(conn.execute(_FAIL_PARENTS, {"parent_id": parent_id}).all())


# --- cancel and requeue (users and operators) --------------------------------------------------------

_CANCEL = Statement(_SQL["cancel"])
_CANCEL_SECTIONS = Statement(_SQL["cancel_sections"])


def cancel(conn: Connection, job_id: uuid.UUID, *, owner: str | None) -> tuple[Job, int] | None:
    """`queued|running` -> `canceled` (only the owner's job when `owner` is given), then its
    unfinished sections (the lock order: parent first); call inside a transaction. None if unchanged.

    An attempt still running keeps running, but its finish is guarded by `running` and its attempt
    number, so it becomes a no-op and its output rolls back; no section starts after this commits.
    """
    row = conn.execute(_CANCEL, {"id": job_id, "owner": owner}).first()
    if row is None:
        return None
    return Job.from_row(row), conn.execute(_CANCEL_SECTIONS, {"id": job_id}).rowcount


_REQUEUE = Statement(_SQL["requeue"])


def requeue(conn: Connection, job_ids: list[uuid.UUID], *, extra_attempts: int) -> list[Job]:
    """`error|canceled` top-level jobs -> `queued` (a planned parent: waiting, its unfinished
    sections queued) with `extra_attempts` more attempts and a new `dispatched_at`; the error is kept
    as history until the job is done."""
    rows = conn.execute(_REQUEUE, {"ids": [str(i) for i in job_ids], "extra": extra_attempts})
    return [Job.from_row(row) for row in rows]


# --- rescue -------------------------------------------------------------------------------------------

_RESCUE = Statement(_SQL["rescue"])


@dataclass(frozen=True)
class Rescued:
    job: Job
    previous_dispatched_at: datetime | None


def rescue(conn: Connection, *, stale_after_seconds: int, limit: int) -> list[Rescued]:
    """Up to `limit` stale queued / lease-expired running jobs -> `queued` with a new dispatch stamp,
    or `error` (attempts_exhausted). The caller dispatches the queued ones after commit."""
    rows = conn.execute(_RESCUE, {"stale": stale_after_seconds, "limit": limit})
    return [Rescued(Job.from_row(row), row.previous_dispatched_at) for row in rows]


_RESTORE_DISPATCH_STAMP = Statement(_SQL["restore_dispatch_stamp"])


def restore_dispatch_stamp(
    conn: Connection, job_id: uuid.UUID, *, ours: datetime | None, previous: datetime | None
) -> bool:
    """After a failed dispatch: `dispatched_at` back, so the next rescue sees the job stale at once
    (unless something touched the job meanwhile)."""
    values = {"id": job_id, "ours": ours, "previous": previous}
    return conn.execute(_RESTORE_DISPATCH_STAMP, values).rowcount == 1


_PRUNE = Statement(_SQL["prune"])


def prune(conn: Connection, *, days: int, done_mark: datetime, batch: int) -> tuple[int, int]:
    """Retention's one bounded batch: (top-level jobs, rows with their sections) deleted."""
    row = conn.execute(_PRUNE, {"days": days, "done_mark": done_mark, "batch": batch}).one()
    return int(row.jobs), int(row.rows)

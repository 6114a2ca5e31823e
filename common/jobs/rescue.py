"""rescue_jobs: give stuck jobs another dispatch (docs/ARCHITECTURE.md, "Job life", step 5 "rescue").

A job can be stuck `queued` (its dispatch failed, or the queue gave up on it) or `running` with an
expired lease (the instance running it died). One bounded, SKIP LOCKED statement claims a batch and
moves `dispatched_at` forward, so concurrent rescuers never dispatch a job twice; the dispatches
happen after that commit, so process_job never sees a job that is not yet `queued`.

Sections are jobs like any other and are rescued the same way. A parent waiting on its sections has
no lease, so it is never rescued itself; a run also fails every waiting parent that has a failed
section (a section whose lease ran out on its last attempt, or a crash right after a section's last
attempt failed).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from common.jobs import transitions
from common.jobs.dispatch import dispatch_job
from common.jobs.model import Job, JobStatus
from common.jobs.settings import job_settings
from common.platform import telemetry
from common.platform.db import connection, transaction
from common.platform.log import logger

DEFAULT_LIMIT = 500


@dataclass
class RescueReport:
    redispatched: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)  # dispatch failed; still queued
    exhausted: list[uuid.UUID] = field(default_factory=list)  # out of attempts; now `error`
    parents_failed: int = 0  # waiting parents ended `error` (section_failed) by this run

    def counts(self) -> dict[str, int]:
        return {
            "redispatched": len(self.redispatched),
            "failed": len(self.failed),
            "exhausted": len(self.exhausted),
            "parents_failed": self.parents_failed,
        }


def rescue_jobs(
    *,
    limit: int = DEFAULT_LIMIT,
    stale_after_seconds: int | None = None,
    dispatch: Callable[[Job], bool] = dispatch_job,
) -> RescueReport:
    stale = stale_after_seconds if stale_after_seconds is not None else job_settings().rescue_after_seconds
    with transaction() as conn:
        rescued = transitions.rescue(conn, stale_after_seconds=stale, limit=limit)

    report = RescueReport()
    for item in rescued:
        job = item.job
        if job.status == JobStatus.ERROR:
            report.exhausted.append(job.id)
            logger.error("Job out of attempts after its lease expired", extra={"job_id": str(job.id)})
            telemetry.record("dylen.jobs.finished", 1, job_kind=job.job_kind, status=JobStatus.ERROR)
            continue
        if dispatch(job):
            report.redispatched.append(job.id)
            continue
        report.failed.append(job.id)
        # Make it stale again at once, so the next run retries it instead of waiting a full window.
        with transaction() as conn:
            transitions.restore_dispatch_stamp(
                conn, job.id, ours=job.dispatched_at, previous=item.previous_dispatched_at
            )
    # Its own statement, after the commit above: it locks parents before their sections, the order
    # every parent/section transition takes (the statement above locked sections only).
    with connection() as conn:
        report.parents_failed = transitions.fail_parents_of_failed_sections(conn)
    logger.info("Rescue run finished", extra=report.counts())
    return report

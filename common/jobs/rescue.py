"""rescue_jobs: give stuck jobs another dispatch (DESIGN, Job life 4).

A job can be stuck `queued` (its dispatch failed, or the queue gave up on it) or `running` with an
expired lease (the instance running it died). One bounded, SKIP LOCKED statement claims a batch and
moves `dispatched_at` forward, so concurrent rescuers never dispatch a job twice; the dispatches
happen after that commit, so process_job never sees a job that is not yet `queued`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from common.jobs import queries
from common.jobs.dispatch import dispatch_job
from common.jobs.model import Job, JobStatus
from common.platform.config import get_settings
from common.platform.db import transaction
from common.platform.log import logger

DEFAULT_LIMIT = 500


@dataclass
class RescueReport:
    redispatched: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)  # dispatch failed; still queued
    exhausted: list[uuid.UUID] = field(default_factory=list)  # out of attempts; now `error`

    def counts(self) -> dict[str, int]:
        return {
            "redispatched": len(self.redispatched),
            "failed": len(self.failed),
            "exhausted": len(self.exhausted),
        }


def rescue_jobs(
    *,
    limit: int = DEFAULT_LIMIT,
    stale_after_seconds: int | None = None,
    dispatch: Callable[[Job], bool] = dispatch_job,
) -> RescueReport:
    stale = stale_after_seconds if stale_after_seconds is not None else get_settings().rescue_after_seconds
    with transaction() as conn:
        rescued = queries.rescue_stale_jobs(conn, stale_after_seconds=stale, limit=limit)

    report = RescueReport()
    for item in rescued:
        job = item.job
        if job.status == JobStatus.ERROR:
            report.exhausted.append(job.id)
            logger.error("Job out of attempts after its lease expired", extra={"job_id": str(job.id)})
            continue
        if dispatch(job):
            report.redispatched.append(job.id)
            continue
        report.failed.append(job.id)
        # Make it stale again at once, so the next run retries it instead of waiting a full window.
        with transaction() as conn:
            queries.restore_dispatch_stamp(
                conn, job.id, ours=job.dispatched_at, previous=item.previous_dispatched_at
            )
    logger.info("Rescue run finished", extra=report.counts())
    return report

"""What every dispatcher shares: the interface and the task naming and backoff rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from common.jobs.model import Job

LOCAL_QUEUE_NAME = "dylen-local"


def task_name_for(job: Job) -> str:
    """One task id per (job, attempt, dispatch): re-enqueueing the same dispatch is a no-op
    (ALREADY_EXISTS), while a retry (a new attempt, `dispatched_at` at its time) or a rescue (which
    moves `dispatched_at`) gets a fresh id. Cloud Tasks keeps ids of finished tasks for a while, so
    a bare job id would block every re-dispatch."""
    stamp = int(job.dispatched_at.timestamp() * 1000) if job.dispatched_at else 0
    return f"job-{job.id}-{job.attempts}-{stamp}"


@dataclass(frozen=True)
class Delivery:
    """What became of one hand-over, for an operator who waits for it."""

    ok: bool
    detail: str


class Dispatcher(Protocol):
    def dispatch(self, job: Job) -> None:
        """Hand the job over, or raise; the caller logs and leaves the job queued."""

    def deliver(self, job: Job) -> Delivery:
        """Hand the job over and wait until it is known whether that worked."""


def backoff_seconds(retry: int, *, minimum: float, maximum: float) -> float:
    """Cloud Tasks-style: min_backoff doubled per retry, capped at max_backoff."""
    return min(maximum, minimum * (2 ** max(0, retry - 1)))

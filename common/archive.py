"""Lesson history limits: archive every lesson beyond a user's tier limit, in short batches.

Semantics of one run (also in the README):
- At start the run snapshots `cutoff` (the database clock). Only lessons created before it can be
  archived by this run; lessons created later (while it runs) are left for the next run.
- For every user, the newest N non-archived lessons (by created_at, then id) stay, where N is the
  limit of the user's tier (a tier missing from the map gets `free`'s limit, and is logged). Lessons
  created after the cutoff still count toward those N, because the limit is about what the user sees.
- Users are walked in id order, in windows of users; each batch archives at most `batch_size` rows
  and commits on its own, so row locks are held for one batch only, memory stays flat, and a killed
  run loses nothing: a re-run (or the next attempt) finds only the rest, since archived lessons leave
  the partial index the walk reads. A finished run followed by another archives nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from common import store
from common.db import transaction
from common.log import logger

KIND = "maintenance.archive_lessons"
MAX_BATCH_SIZE = 10_000
# Window sizing: start small, then aim each window at about one batch of work. Bounds keep a window
# cheap to re-walk (it is re-read until a batch comes back short) and the walk moving when few users
# are over their limit.
FIRST_WINDOW_USERS = 1_000
MIN_WINDOW_USERS = 100
MAX_WINDOW_USERS = 20_000


@dataclass(frozen=True)
class Batch:
    number: int
    archived: int
    through_user: str


@dataclass(frozen=True)
class ArchiveReport:
    users_over_limit: int
    lessons_archived: int
    batches: int
    max_batch: int
    seconds: float
    cutoff: datetime

    def as_result(self) -> dict[str, Any]:
        return {
            "users_over_limit": self.users_over_limit,
            "lessons_archived": self.lessons_archived,
            "batches": self.batches,
            "max_batch": self.max_batch,
            "seconds": round(self.seconds, 3),
            "cutoff": self.cutoff.isoformat(),
        }


def tier_limits(limits: dict[str, int]) -> store.TierLimits:
    """The configured map (always has `free`: config refuses one without it)."""
    return store.TierLimits(limits=dict(limits), fallback=limits["free"])


def log_unknown_tiers(limits: store.TierLimits) -> list[str]:
    with transaction() as conn:
        unknown = store.unknown_tiers(conn, list(limits.limits))
    if unknown:
        logger.warning(
            "Users have tiers missing from DYLEN_TIER_HISTORY_LIMITS; they get the free tier's limit",
            extra={"tiers": unknown, "limit": limits.fallback},
        )
    return unknown


def archive_over_limit(
    limits: dict[str, int],
    *,
    batch_size: int = MAX_BATCH_SIZE,
    on_batch: Callable[[Batch], None] | None = None,
) -> ArchiveReport:
    """Archive every lesson beyond its owner's limit. `on_batch` runs after each committed batch."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}")
    started = time.monotonic()
    tiers = tier_limits(limits)
    log_unknown_tiers(tiers)
    with transaction() as conn:
        cutoff = store.database_now(conn)

    users_over = archived = batches = max_batch = 0
    after_user = ""
    window = FIRST_WINDOW_USERS
    while True:
        with transaction() as conn:
            through_user = store.user_window_end(conn, after_user=after_user, size=window)
        if through_user is None:
            break
        # A window is re-batched until a batch comes back short; its owners are a set of at most
        # `window` ids, so memory does not grow with the table.
        owners: set[str] = set()
        window_archived = 0
        while True:
            with transaction() as conn:
                archived_owners = store.archive_batch(
                    conn,
                    limits=tiers,
                    after_user=after_user,
                    through_user=through_user,
                    cutoff=cutoff,
                    batch_size=batch_size,
                )
            count = len(archived_owners)
            if count:
                batches += 1
                max_batch = max(max_batch, count)
                owners.update(archived_owners)
                window_archived += count
                if on_batch is not None:
                    on_batch(Batch(number=batches, archived=count, through_user=through_user))
            if count < batch_size:
                break
        users_over += len(owners)
        archived += window_archived
        after_user = through_user
        window = _next_window(window, window_archived, batch_size)

    report = ArchiveReport(
        users_over_limit=users_over,
        lessons_archived=archived,
        batches=batches,
        max_batch=max_batch,
        seconds=time.monotonic() - started,
        cutoff=cutoff,
    )
    logger.info("Archive run finished", extra=report.as_result())
    return report


def _next_window(window: int, archived: int, batch_size: int) -> int:
    if archived == 0:
        return min(MAX_WINDOW_USERS, window * 2)
    return max(MIN_WINDOW_USERS, min(MAX_WINDOW_USERS, window * batch_size // archived))


def preview(limits: dict[str, int]) -> list[store.TierPreview]:
    """What a run now would archive, per tier, without changing anything."""
    tiers = tier_limits(limits)
    with transaction() as conn:
        return store.preview_archive(conn, limits=tiers, cutoff=store.database_now(conn))


def archive_key(today: datetime | None = None) -> str:
    """One maintenance job per UTC day: Cloud Scheduler may call twice, only one job runs."""
    return f"archive-{(today or datetime.now(UTC)).astimezone(UTC).date().isoformat()}"


@dataclass(frozen=True)
class Enqueued:
    job: store.Job
    created: bool  # False: today's job already existed (a repeated scheduler call)


def enqueue_daily_archive(today: datetime | None = None) -> Enqueued:
    """Create today's maintenance job (owned by no user) and dispatch it; idempotent per UTC day."""
    from common.config import get_settings

    settings = get_settings()
    key = archive_key(today)
    with transaction() as conn:
        job = store.insert_job(
            conn,
            user_id=None,
            job_kind=KIND,
            idempotency_key=key,
            request_json={"job_kind": KIND, "payload": {}},
            max_attempts=settings.job_max_attempts,
        )
        if job is None:
            existing = store.find_job_by_key(conn, user_id=None, job_kind=KIND, idempotency_key=key)
            assert existing is not None, "the conflicting job cannot vanish: jobs are never deleted"
            return Enqueued(job=existing, created=False)
    logger.info("Archive job created", extra={"job_id": str(job.id), "idempotency_key": key})
    if settings.auto_process:
        from common.dispatch import dispatch_job

        dispatch_job(job)
    return Enqueued(job=job, created=True)

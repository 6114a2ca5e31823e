"""Lesson history limits: archive every lesson beyond a user's tier limit, in short batches.

Semantics of one run (also in the README):
- At start the run snapshots `cutoff` (the database clock) and archives what was over the limit at
  that moment: for every user, the lessons created before the cutoff that are not among their newest
  N non-archived ones created before it (newest by created_at, then id). N is the limit of the user's
  tier; a tier missing from the map gets `free`'s limit, and is logged.
- Lessons created while it runs are neither archived by it nor push older ones out: the next run
  (the next day) sees them. A run therefore never archives anything that was within the limit when
  it started, however busy users are meanwhile.
- Each batch archives at most `batch_size` rows and commits on its own, so row locks are held for
  one batch only and memory stays flat. A killed run loses nothing: the next attempt (or run)
  recomputes the boundaries from the lessons still visible and archives only the rest, and a
  finished run followed by another archives nothing more.
- Batches walk the lessons table in block order (see common.store), which keeps each batch's reads
  and writes on a compact run of pages.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from common import store
from common.db import get_engine, transaction
from common.log import logger

KIND = "maintenance.archive_lessons"
MAX_BATCH_SIZE = 10_000
# Block ranges: start small, then aim each range at about one batch of work. The bounds keep a range
# cheap to re-read (it is re-read until a batch comes back short) and the walk moving over pages
# with nothing to archive.
FIRST_RANGE_BLOCKS = 64
MIN_RANGE_BLOCKS = 8
MAX_RANGE_BLOCKS = 65_536


@dataclass(frozen=True)
class Batch:
    number: int
    archived: int
    first_block: int
    last_block: int


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
    archived = batches = max_batch = 0
    # One connection for the run: the boundaries live in its temp table. Each batch is its own
    # transaction on it.
    with get_engine().connect() as conn:
        try:
            with conn.begin():
                cutoff = store.database_now(conn)
                users_over = store.record_archive_boundaries(conn, limits=tiers, cutoff=cutoff)
            with conn.begin():
                # Rows stored beyond this were written after the cutoff: not this run's business.
                end_block = store.lesson_blocks(conn) if users_over else 0
            block, step = 0, FIRST_RANGE_BLOCKS
            while block < end_block:
                last = min(block + step, end_block)
                range_archived = 0
                while True:
                    with conn.begin():
                        count = store.archive_blocks(
                            conn, first_block=block, last_block=last, cutoff=cutoff, batch_size=batch_size
                        )
                    range_archived += count
                    if count:
                        batches += 1
                        archived += count
                        max_batch = max(max_batch, count)
                        if on_batch is not None:
                            on_batch(
                                Batch(number=batches, archived=count, first_block=block, last_block=last)
                            )
                    if count < batch_size:
                        break
                block = last
                step = _next_step(step, range_archived, batch_size)
        finally:
            # Best effort: the pooled connection would carry the table, but the next run drops it
            # before use anyway, and a failure here must not hide the run's own error.
            with contextlib.suppress(Exception), conn.begin():
                store.drop_archive_boundaries(conn)

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


def _next_step(step: int, archived: int, batch_size: int) -> int:
    if archived == 0:
        return min(MAX_RANGE_BLOCKS, step * 2)
    return max(MIN_RANGE_BLOCKS, min(MAX_RANGE_BLOCKS, step * batch_size // archived))


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

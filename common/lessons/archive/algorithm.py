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
- The boundaries (each user's newest lesson beyond the limit) are computed once per run, on each
  worker's connection. Batches walk the lessons table in block order (see queries), which keeps
  each batch's reads and writes on a compact run of pages; `workers` of them run at once on disjoint
  block ranges.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.lessons.archive import queries
from common.platform.db import Connection, connection, transaction
from common.platform.log import logger

MAX_BATCH_SIZE = 10_000
# Batches on disjoint block ranges are independent and run concurrently, each worker on its own
# connection (one backend, one database core each). On the 2-vCPU benchmark server two workers took
# 12 s where one took 19.5 s (1M lessons, bench/RESULTS.md); more than the database's idle cores
# only adds contention. Each worker also uses one pooled connection for the whole run.
DEFAULT_WORKERS = 2
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


def tier_limits(limits: dict[str, int]) -> queries.TierLimits:
    """The configured map (always has `free`: config refuses one without it)."""
    return queries.TierLimits(limits=dict(limits), fallback=limits["free"])


def log_unknown_tiers(limits: queries.TierLimits) -> list[str]:
    with transaction() as conn:
        unknown = queries.unknown_tiers(conn, list(limits.limits))
    if unknown:
        logger.warning(
            "Users have tiers missing from DYLEN_TIER_HISTORY_LIMITS; they get the free tier's limit",
            extra={"tiers": unknown, "limit": limits.fallback},
        )
    return unknown


class _Walk:
    """Hands out block ranges to workers, sizing each to about one batch of work."""

    def __init__(self, end_block: int, batch_size: int) -> None:
        self.lock = threading.Lock()
        self.end_block = end_block
        self.batch_size = batch_size
        self.block = 0
        self.step = FIRST_RANGE_BLOCKS
        self.stop = threading.Event()
        self.batches = self.archived = self.max_batch = self.users_over = 0

    def users_over_limit(self, users: int) -> None:
        """A worker's boundaries are ready. A worker that starts after another's first batch sees
        fewer users over the limit (some are done): the largest count is the one at the cutoff."""
        with self.lock:
            self.users_over = max(self.users_over, users)

    def next_range(self) -> tuple[int, int] | None:
        with self.lock:
            if self.stop.is_set() or self.block >= self.end_block:
                return None
            first, self.block = self.block, min(self.block + self.step, self.end_block)
            return first, self.block

    def range_done(self, archived: int) -> None:
        with self.lock:
            self.step = _next_step(self.step, archived, self.batch_size)

    def batch_done(self, count: int, first: int, last: int) -> Batch:
        with self.lock:
            self.batches += 1
            self.archived += count
            self.max_batch = max(self.max_batch, count)
            return Batch(number=self.batches, archived=count, first_block=first, last_block=last)


def archive_over_limit(
    limits: dict[str, int],
    *,
    batch_size: int = MAX_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    on_batch: Callable[[Batch], None] | None = None,
) -> ArchiveReport:
    """Archive every lesson beyond its owner's limit. `on_batch` runs after each committed batch.

    `workers` batches run at once, on disjoint block ranges, each on its own connection.
    """
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}")
    started = time.monotonic()
    tiers = tier_limits(limits)
    log_unknown_tiers(tiers)
    with transaction() as conn:
        cutoff = queries.database_now(conn)
        # Rows stored beyond this block were written after the cutoff: not this run's business.
        end_block = queries.lesson_blocks(conn)
    walk = _Walk(end_block, batch_size)

    def work(conn: Connection) -> None:
        users_over = queries.create_boundaries(conn, limits=tiers, cutoff=cutoff)
        walk.users_over_limit(users_over)
        if not users_over:
            return  # nothing (left) to archive: no need to read the table
        while (block_range := walk.next_range()) is not None:
            first, last = block_range
            range_archived = 0
            while not walk.stop.is_set():
                with conn.transaction():  # one batch: its own transaction
                    count = queries.archive_blocks(
                        conn, first_block=first, last_block=last, cutoff=cutoff, batch_size=batch_size
                    )
                range_archived += count
                if count:
                    batch = walk.batch_done(count, first, last)
                    if on_batch is not None:
                        on_batch(batch)
                if count < batch_size:
                    break
            walk.range_done(range_archived)

    def guarded() -> None:
        try:
            # One connection per worker for the whole run: its batches use the boundaries it computed.
            with connection() as conn:
                try:
                    work(conn)
                finally:
                    with contextlib.suppress(Exception):  # a dead connection took the table with it
                        queries.drop_boundaries(conn)
        except BaseException:
            walk.stop.set()  # the others finish their current batch and stop
            raise

    if workers <= 1:
        guarded()
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dylen-archive") as pool:
            futures = [pool.submit(guarded) for _ in range(workers)]
        for future in futures:
            future.result()  # re-raise the first failure

    report = ArchiveReport(
        users_over_limit=walk.users_over,
        lessons_archived=walk.archived,
        batches=walk.batches,
        max_batch=walk.max_batch,
        seconds=time.monotonic() - started,
        cutoff=cutoff,
    )
    logger.info("Archive run finished", extra=report.as_result())
    return report


def _next_step(step: int, archived: int, batch_size: int) -> int:
    if archived == 0:
        return min(MAX_RANGE_BLOCKS, step * 2)
    return max(MIN_RANGE_BLOCKS, min(MAX_RANGE_BLOCKS, step * batch_size // archived))


def preview(limits: dict[str, int]) -> list[queries.TierPreview]:
    """What a run now would archive, per tier, without changing anything."""
    tiers = tier_limits(limits)
    with transaction() as conn:
        return queries.preview_archive(conn, limits=tiers, cutoff=queries.database_now(conn))

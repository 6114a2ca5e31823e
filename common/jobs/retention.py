"""Retention: the daily maintenance deletes finished jobs older than DYLEN_JOB_RETENTION_DAYS, with
their sections and attempts, in bounded batches (each its own statement and transaction, so a long
backlog never holds locks for long, and a run cut short resumes where it stopped). Lessons are kept:
their `job_id` is nulled. All-time totals stay right (common.jobs.totals)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from common.jobs import totals, transitions
from common.platform.db import connection
from common.platform.log import logger

BATCH = 2000
MAX_SECONDS = 300.0  # the rest waits for tomorrow's run: maintenance never holds a worker for long


@dataclass(frozen=True)
class Pruned:
    jobs: int  # top-level jobs deleted
    rows: int  # with their sections
    batches: int
    complete: bool  # False: stopped at MAX_SECONDS with more to delete

    def as_result(self) -> dict[str, int | bool]:
        return {"jobs_pruned": self.jobs, "job_rows_pruned": self.rows, "prune_complete": self.complete}


def prune_finished(*, days: int, batch: int = BATCH, max_seconds: float = MAX_SECONDS) -> Pruned:
    started = time.monotonic()
    with connection() as conn:
        totals.advance_done_total(conn)  # count recent done jobs into the stored total first
        mark = totals.done_mark(conn)
    jobs = rows = batches = 0
    complete = False
    while time.monotonic() - started < max_seconds:
        with connection() as conn:
            deleted, with_sections = transitions.prune(conn, days=days, done_mark=mark, batch=batch)
        jobs, rows, batches = jobs + deleted, rows + with_sections, batches + 1
        if deleted < batch:
            complete = True
            break
    logger.info("Finished jobs pruned", extra={"jobs": jobs, "rows": rows, "batches": batches, "days": days})
    return Pruned(jobs, rows, batches, complete)

"""All-time job counts that never count the table: the stored done total and its mark (migration
0003), and what retention deleted (job_pruned_totals, migration 0005). `done` is absorbing, so done
jobs completed before the mark never change the total; retention deletes only those."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from common.platform.db import Connection, Statement

# The done total moves forward once `through` is two hours old, to an hour before now: an hour's
# margin over any done transition still in flight, and at most two hours of done jobs per move.
# SKIP LOCKED: while one instance moves it, the others' overviews read the old mark and go on.
_LOCK_STALE_MARK = Statement(
    "SELECT through FROM job_done_mark WHERE through < now() - interval '2 hours' FOR UPDATE SKIP LOCKED"
)
_ADD_DONE = Statement(
    """
    WITH added AS (
        SELECT job_kind, count(*) AS n FROM jobs
         WHERE status = 'done' AND completed_at >= CAST(:through AS timestamptz)
           AND completed_at < now() - interval '1 hour'
         GROUP BY job_kind
    ), totals AS (
        INSERT INTO job_done_totals (job_kind, n) SELECT job_kind, n FROM added
        ON CONFLICT (job_kind) DO UPDATE SET n = job_done_totals.n + EXCLUDED.n
    )
    UPDATE job_done_mark SET through = now() - interval '1 hour'
    """
)

# (job_kind, status, n) over every job ever, from cheap parts: the live jobs (jobs_live_idx), error /
# canceled (jobs_failed_idx) plus those retention deleted, and done = the stored total + its index
# tail from `through` (retention deletes only done jobs the stored total already counts).
# `through` is bound as a value, read in the same snapshot (all_time_counts): as a subquery the
# planner cannot see how short the tail is and plans a parallel scan of the whole index.
_ALL_TIME = Statement(
    """
    SELECT job_kind, status, sum(n)::bigint AS n FROM (
        SELECT job_kind, status, count(*) AS n FROM jobs
         WHERE status IN ('queued', 'running') GROUP BY job_kind, status
        UNION ALL
        SELECT job_kind, status, count(*) FROM jobs
         WHERE status IN ('error', 'canceled') GROUP BY job_kind, status
        UNION ALL
        SELECT job_kind, 'done', n FROM job_done_totals
        UNION ALL
        SELECT job_kind, status, n FROM job_pruned_totals WHERE status <> 'done'
        UNION ALL
        SELECT job_kind, 'done', count(*) FROM jobs
         WHERE status = 'done' AND completed_at >= CAST(:through AS timestamptz)
         GROUP BY job_kind
    ) parts GROUP BY job_kind, status ORDER BY job_kind, status
    """
)

_MARK = Statement("SELECT through FROM job_done_mark")


def advance_done_total(conn: Connection) -> None:
    with conn.transaction():
        through = conn.execute(_LOCK_STALE_MARK).scalar()
        if through is not None:
            conn.execute(_ADD_DONE, {"through": through})


def all_time_counts(conn: Connection) -> list[Any]:
    # One snapshot for the mark and the counts: a job moving between parts is never counted twice.
    with conn.transaction():
        conn.execute_simple("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        through = conn.execute(_MARK).scalar()
        return conn.execute(_ALL_TIME, {"through": through}).all()


def done_mark(conn: Connection) -> datetime:
    """Done jobs completed before this are in the stored total."""
    mark: datetime = conn.execute(_MARK).scalar()
    return mark

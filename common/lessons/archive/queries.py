"""The archiver's SQL (lesson history limits).

A run snapshots a cutoff. A user's "boundary" is the newest of their visible lessons created before
the cutoff that is beyond their limit: found on the partial index lessons_user_visible_idx, reading
N+1 entries of that user, with no ranking of the table. The boundary and every older visible lesson
are archived. A run computes every boundary once (an index-only probe per user, into a temporary
table of the worker's connection), then batches walk the table in physical (block) order, so each
reads and rewrites a compact run of pages, as a sequential scan would, instead of hopping between
users' rows scattered over the whole heap. Archiving never moves a boundary (only older lessons go),
so a batch can stop anywhere, batches on disjoint block ranges can run concurrently, and the next
one (or a re-run after a crash, which computes the boundaries again) finds exactly the rest.
The price: every run reads the whole heap once, sequentially, even when little is over the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.platform.db import Connection, Statement

_LIMITS_CTE = """
    limits AS (
        SELECT tier, keep FROM unnest(CAST(:tiers AS text[]), CAST(:keeps AS integer[])) AS t(tier, keep)
    )"""


# Each user's boundary: their newest visible lesson before the cutoff beyond their tier's limit.
_BOUNDARIES = """
    SELECT u.id AS user_id, u.tier, f.created_at, f.id
      FROM users u
      LEFT JOIN limits ON limits.tier = u.tier
     CROSS JOIN LATERAL (
           SELECT created_at, id FROM lessons
            WHERE user_id = u.id AND archived_at IS NULL AND created_at < :cutoff
            ORDER BY created_at DESC, id DESC
           OFFSET coalesce(limits.keep, :fallback_keep) LIMIT 1
     ) f
"""


# Lesson `l` is archived when it is visible, older than the cutoff, and not newer than its owner's
# boundary `b`.
_DOOMED = """
    l.archived_at IS NULL AND l.created_at < :cutoff AND (l.created_at, l.id) <= (b.created_at, b.id)"""


@dataclass(frozen=True)
class TierLimits:
    """Visible-history limit per tier; tiers not in `limits` get `fallback` (the free tier's)."""

    limits: dict[str, int]
    fallback: int

    def params(self) -> dict[str, Any]:
        return {
            "tiers": list(self.limits),
            "keeps": list(self.limits.values()),
            "fallback_keep": self.fallback,
        }


def database_now(conn: Connection) -> datetime:
    return conn.execute(Statement("SELECT clock_timestamp()")).value()


def lesson_blocks(conn: Connection) -> int:
    """How many heap blocks lessons has now: the end of the archiver's walk."""
    return int(
        conn.execute(
            Statement("SELECT pg_relation_size('lessons') / current_setting('block_size')::integer")
        ).value()
    )


# A run computes every boundary once, into a temporary table of the connection that runs its
# batches (one row per user over the limit), instead of looking them up again in every batch for
# each user the batch meets: with lessons spread over the heap a batch meets thousands of users, and
# the repeated lookups cost as much as the batch's writes (1M-lesson bench: a 10,000-row batch met
# ~7,000 users and spent ~0.4 s of its ~0.9 s probing them; the hash join on the table takes ~25 ms).
# The boundaries stay right for the whole run: archiving only removes lessons older than a boundary,
# and lessons created after the cutoff do not count. A crashed run loses the table with its
# connection; the retry computes it again from the lessons still visible.
_CREATE_BOUNDARIES = Statement(
    "CREATE TEMPORARY TABLE archive_boundaries "
    "(user_id text PRIMARY KEY, created_at timestamptz NOT NULL, id uuid NOT NULL)"
)
_FILL_BOUNDARIES = Statement(
    f"""
    WITH {_LIMITS_CTE}
    INSERT INTO archive_boundaries (user_id, created_at, id)
    SELECT b.user_id, b.created_at, b.id FROM ({_BOUNDARIES}) AS b
    """
)


def create_boundaries(conn: Connection, *, limits: TierLimits, cutoff: datetime) -> int:
    """Fill this connection's `archive_boundaries`; returns how many users are over their limit."""
    conn.execute(_CREATE_BOUNDARIES)
    users = int(conn.execute(_FILL_BOUNDARIES, {**limits.params(), "cutoff": cutoff}).rowcount)
    conn.execute_simple("ANALYZE archive_boundaries")  # temporary tables get no autovacuum
    return users


def drop_boundaries(conn: Connection) -> None:
    conn.execute_simple("DROP TABLE IF EXISTS archive_boundaries")


# The block range is a TID range scan (PostgreSQL 14+), hash-joined to the boundaries;
# ctid = ANY(ARRAY(...)) is a TID scan, so the batch rewrites exactly the rows it found, on the pages
# it just read, with no index lookups.
_ARCHIVE_BLOCKS = Statement(
    """
    UPDATE lessons SET archived_at = now()
     WHERE ctid = ANY(ARRAY(
               SELECT l.ctid FROM lessons l JOIN archive_boundaries b ON b.user_id = l.user_id
                WHERE l.ctid >= CAST(:first AS tid) AND l.ctid < CAST(:last AS tid)
                  AND l.archived_at IS NULL AND l.created_at < :cutoff
                  AND (l.created_at, l.id) <= (b.created_at, b.id)
                LIMIT :batch_size))
       AND archived_at IS NULL
    """
)


def archive_blocks(
    conn: Connection,
    *,
    first_block: int,
    last_block: int,
    cutoff: datetime,
    batch_size: int,
) -> int:
    """Archive up to `batch_size` doomed lessons stored in blocks [first_block, last_block), by the
    boundaries `create_boundaries` put on this connection.

    Fewer than `batch_size` means that block range is done.
    """
    return int(
        conn.execute(
            _ARCHIVE_BLOCKS,
            {
                "first": f"({first_block},0)",
                "last": f"({last_block},0)",
                "cutoff": cutoff,
                "batch_size": batch_size,
            },
        ).rowcount
    )


@dataclass(frozen=True)
class TierPreview:
    tier: str
    users_over_limit: int
    lessons: int


_PREVIEW_ARCHIVE = Statement(
    f"""
    WITH {_LIMITS_CTE},
    boundaries AS ({_BOUNDARIES})
    SELECT b.tier, count(*) AS users_over_limit, sum(n.lessons) AS lessons
      FROM boundaries b
     CROSS JOIN LATERAL (
           SELECT count(*) AS lessons FROM lessons l WHERE l.user_id = b.user_id AND {_DOOMED}
     ) n
     GROUP BY b.tier
     ORDER BY b.tier
    """
)


def preview_archive(conn: Connection, *, limits: TierLimits, cutoff: datetime) -> list[TierPreview]:
    """What a run with this cutoff would archive, per tier (read-only)."""
    rows = conn.execute(_PREVIEW_ARCHIVE, {**limits.params(), "cutoff": cutoff})
    return [TierPreview(r.tier, int(r.users_over_limit), int(r.lessons)) for r in rows]


def unknown_tiers(conn: Connection, known: list[str]) -> list[str]:
    rows = conn.execute(
        Statement(
            "SELECT DISTINCT tier FROM users WHERE NOT (tier = ANY(CAST(:known AS text[]))) ORDER BY tier"
        ),
        {"known": known},
    )
    return [row.tier for row in rows]

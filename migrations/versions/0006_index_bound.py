"""index-bound request path: the quota count index-only, the Users page, archived lessons

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

Found by tests/test_plans.py (every statement planned over a realistic volume) and measured by
bench/growth_bench.py at 0 and millions of jobs (bench/RESULTS.md, "Growth").

Like every migration here it runs in one transaction: each CREATE INDEX holds a write lock on its
table while it builds (bench/RESULTS.md gives the build time of each index at the benchmark's size).
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- The daily quota count (job_usage) filters a user's jobs of the day on status: with status
        -- in the index it is an index-only scan instead of a heap visit per job (54 ms for a heavy
        -- user's day, cold). A key column, not INCLUDE: an index with INCLUDE columns gets no
        -- deduplication, and a lesson's sections share (user, kind, created_at), so INCLUDE made
        -- it 1.6x the size of this one (volume of 260k jobs: 14 MB against 8.5 MB; 7.1 MB before).
        -- Same name, so nothing that names it changes.
        DROP INDEX jobs_user_kind_created_idx;
        CREATE INDEX jobs_user_kind_created_idx ON jobs (user_id, job_kind, created_at, status);

        -- An index-only scan skips the heap only on pages the visibility map marks all-visible, which
        -- vacuum does; today's rows are the newest pages. By default an insert-driven autovacuum waits
        -- for 20% of the table (2M rows at 10M jobs: days), so a day's rows were never index-only. A
        -- fixed threshold vacuums after every 20,000 new rows, whatever the table's size: only the
        -- last minutes of rows are checked in the heap. Such a vacuum reads the pages changed since
        -- the last one, and skips index cleanup when few rows died (PostgreSQL 14+).
        ALTER TABLE jobs SET (autovacuum_vacuum_insert_threshold = 20000,
                              autovacuum_vacuum_insert_scale_factor = 0);

        -- The dashboard's Jobs page filtered on error or canceled walked every job newest first
        -- until it had a page of them (thousands of rows read for 50 shown); ordered by created_at
        -- within the status, it reads the page. The overview's all-time counts by status and kind
        -- still read it index-only (job_kind last, a key column for deduplication as above).
        DROP INDEX jobs_failed_idx;
        CREATE INDEX jobs_failed_idx ON jobs (status, created_at, job_kind)
            WHERE status IN ('error', 'canceled');

        -- The dashboard's Users page lists the newest users: without this, a sort of the whole table.
        CREATE INDEX users_created_idx ON users (created_at DESC, id);

        -- The Users page's archived count was the only reader of lessons_user_idx (user_id), a
        -- heap visit per lesson of the user. Partial on archived lessons, it answers that count
        -- index-only, and a new (visible) lesson no longer pays an index entry for it: archiving
        -- enters the row (that update is never HOT anyway: archived_at is in
        -- lessons_user_visible_idx's predicate).
        DROP INDEX lessons_user_idx;
        CREATE INDEX lessons_user_archived_idx ON lessons (user_id) WHERE archived_at IS NOT NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX lessons_user_archived_idx;
        CREATE INDEX lessons_user_idx ON lessons (user_id);
        DROP INDEX users_created_idx;
        DROP INDEX jobs_failed_idx;
        CREATE INDEX jobs_failed_idx ON jobs (status, job_kind) WHERE status IN ('error', 'canceled');
        ALTER TABLE jobs RESET (autovacuum_vacuum_insert_threshold, autovacuum_vacuum_insert_scale_factor);
        DROP INDEX jobs_user_kind_created_idx;
        CREATE INDEX jobs_user_kind_created_idx ON jobs (user_id, job_kind, created_at);
        """
    )

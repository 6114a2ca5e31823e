"""operator dashboard: indexes for its views, the running total of done jobs, the CSRF secret

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- Jobs page (newest first), the 24 h counts and the per-minute "created" line: index-only.
        CREATE INDEX jobs_created_idx ON jobs (created_at, status, job_kind);
        -- Finished jobs by time: the chart's done/failed lines, the error rate, the Failures page and
        -- the tail of the done total. Rows enter when they finish, so live transitions skip it.
        CREATE INDEX jobs_completed_idx ON jobs (completed_at, status, job_kind)
            WHERE completed_at IS NOT NULL;
        -- All-time error / canceled counts, exact and small (a minority; done is counted below).
        CREATE INDEX jobs_failed_idx ON jobs (status, job_kind) WHERE status IN ('error', 'canceled');
        -- Users page: a user's lessons, visible and archived.
        CREATE INDEX lessons_user_idx ON lessons (user_id);

        -- `done` is absorbing (nothing leaves it, nothing deletes jobs), so the count of jobs done
        -- before `through` never changes: the overview adds the index range completed_at >= through
        -- to it instead of counting a million rows. The dashboard moves `through` forward.
        CREATE TABLE job_done_totals (
            job_kind text PRIMARY KEY,
            n        bigint NOT NULL
        );
        CREATE TABLE job_done_mark (
            one     boolean PRIMARY KEY DEFAULT true CHECK (one),
            through timestamptz NOT NULL
        );
        -- An hour's margin: no done transition still uncommitted can stamp completed_at before it.
        INSERT INTO job_done_mark (through) VALUES (now() - interval '1 hour');
        INSERT INTO job_done_totals (job_kind, n)
            SELECT job_kind, count(*) FROM jobs
             WHERE status = 'done' AND (completed_at < now() - interval '1 hour' OR completed_at IS NULL)
             GROUP BY job_kind;

        -- The dashboard's CSRF key: shared by every instance, never in an env var or a log.
        CREATE TABLE dashboard_secret (
            one    boolean PRIMARY KEY DEFAULT true CHECK (one),
            secret text NOT NULL
        );
        INSERT INTO dashboard_secret (secret)
            SELECT string_agg(replace(gen_random_uuid()::text, '-', ''), '') FROM generate_series(1, 4);
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP TABLE dashboard_secret; DROP TABLE job_done_mark; DROP TABLE job_done_totals; "
        "DROP INDEX lessons_user_idx; DROP INDEX jobs_failed_idx; DROP INDEX jobs_completed_idx; "
        "DROP INDEX jobs_created_idx;"
    )

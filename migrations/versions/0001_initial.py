"""users, jobs, lessons

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain SQL: the schema is the contract, and this reads like it.
    op.execute(
        """
        CREATE TABLE users (
            id          text PRIMARY KEY,
            tier        text NOT NULL DEFAULT 'free',
            created_at  timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE jobs (
            id               uuid PRIMARY KEY,
            user_id          text REFERENCES users (id),
            job_kind         text NOT NULL,
            status           text NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'running', 'done', 'error', 'canceled')),
            idempotency_key  text NOT NULL,
            request_json     jsonb NOT NULL,
            result_json      jsonb,
            error_json       jsonb,
            attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
            lease_expires_at timestamptz,
            dispatched_at    timestamptz,
            created_at       timestamptz NOT NULL DEFAULT now(),
            updated_at       timestamptz NOT NULL DEFAULT now(),
            started_at       timestamptz,
            completed_at     timestamptz
        );
        -- NULLS NOT DISTINCT: maintenance jobs have no user and are still idempotent per key.
        CREATE UNIQUE INDEX jobs_idempotency_uq
            ON jobs (user_id, job_kind, idempotency_key) NULLS NOT DISTINCT;
        -- rescue_jobs scans only live jobs.
        CREATE INDEX jobs_live_idx ON jobs (status, dispatched_at)
            WHERE status IN ('queued', 'running');

        CREATE TABLE lessons (
            id          uuid PRIMARY KEY,
            user_id     text NOT NULL REFERENCES users (id),
            job_id      uuid NOT NULL UNIQUE REFERENCES jobs (id),
            topic       text NOT NULL,
            title       text NOT NULL,
            content     jsonb NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            archived_at timestamptz
        );
        -- "newest non-archived lessons of a user": list_lessons pages and the archiver's ranking.
        CREATE INDEX lessons_user_visible_idx
            ON lessons (user_id, created_at DESC, id DESC) WHERE archived_at IS NULL;
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE lessons; DROP TABLE jobs; DROP TABLE users;")

"""lesson sections as child jobs: parent_id, section_index, plan

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- A section is a job of its own (claimed, leased, retried, rescued like any), pointing at
        -- the lesson job that planned it. `plan` is the parent's stored plan.
        ALTER TABLE jobs
            ADD COLUMN parent_id     uuid REFERENCES jobs (id),
            ADD COLUMN section_index integer,
            ADD COLUMN plan          jsonb,
            ADD CONSTRAINT jobs_section_ck
                CHECK ((parent_id IS NULL) = (section_index IS NULL) AND section_index >= 0);
        -- "the sections of a parent": fan-in, progress, cancel, retry, `jobs show`; one row per
        -- section, whatever delivers it twice.
        CREATE UNIQUE INDEX jobs_parent_section_uq ON jobs (parent_id, section_index)
            WHERE parent_id IS NOT NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP INDEX jobs_parent_section_uq; "
        "ALTER TABLE jobs DROP CONSTRAINT jobs_section_ck, DROP COLUMN plan, "
        "DROP COLUMN section_index, DROP COLUMN parent_id;"
    )

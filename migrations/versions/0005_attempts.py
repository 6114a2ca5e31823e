"""retries owned by the job: run_after, waited time, every attempt on record, retention

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- run_after: a queued job scheduled for later (a retry's backoff, a RetryLater) is not
        -- claimed before it. deferrals / waited_seconds: the claims RetryLater and infrastructure
        -- faults gave back, and the time they deferred the job so far (bounded per job); attempts
        -- counts every claim (it fences the finish), so attempts - deferrals is what was used.
        -- attempt_started_at: when the current attempt began.
        ALTER TABLE jobs
            ADD COLUMN run_after          timestamptz,
            ADD COLUMN deferrals          integer NOT NULL DEFAULT 0,
            ADD COLUMN waited_seconds     double precision NOT NULL DEFAULT 0,
            ADD COLUMN attempt_started_at timestamptz;

        -- Every claim's outcome, for operators: a retry's, a deferral's and a lease that ran out
        -- included. error_message is the safe text users may see; error_detail is the raw error
        -- (exception, traceback: bounded), for operators only. Deleted with its job.
        CREATE TABLE job_attempts (
            job_id        uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            attempt       integer NOT NULL,
            started_at    timestamptz,
            ended_at      timestamptz NOT NULL DEFAULT now(),
            outcome       text NOT NULL CHECK (outcome IN
                              ('done', 'planned', 'retry', 'deferred', 'failed', 'superseded',
                               'lease_expired')),
            error_code    text,
            error_message text,
            error_detail  text,
            instance      text,
            PRIMARY KEY (job_id, attempt)
        );

        -- Retention deletes finished jobs; a lesson outlives its job, its link nulled on purpose.
        ALTER TABLE lessons ALTER COLUMN job_id DROP NOT NULL,
            DROP CONSTRAINT lessons_job_id_fkey,
            ADD CONSTRAINT lessons_job_id_fkey FOREIGN KEY (job_id) REFERENCES jobs (id) ON DELETE SET NULL;
        ALTER TABLE jobs DROP CONSTRAINT jobs_parent_id_fkey,
            ADD CONSTRAINT jobs_parent_id_fkey FOREIGN KEY (parent_id) REFERENCES jobs (id) ON DELETE CASCADE;
        -- Errors recorded before this version carried the raw exception text (an API key in a URL,
        -- once) into what users read: each moves to its attempt's record, for operators, and the
        -- job keeps a safe message.
        INSERT INTO job_attempts (job_id, attempt, outcome, error_code, error_message, error_detail)
        SELECT id, greatest(attempts, 1), CASE WHEN status = 'error' THEN 'failed' ELSE 'retry' END,
               error_json ->> 'code', 'An earlier attempt failed.', error_json ->> 'message'
          FROM jobs
         WHERE error_json ->> 'code' IN ('handler_failed', 'attempts_exhausted', 'section_failed')
        ON CONFLICT (job_id, attempt) DO NOTHING;
        UPDATE jobs
           SET error_json = (error_json - 'section_error') || jsonb_build_object('message',
                   CASE error_json ->> 'code'
                       WHEN 'handler_failed' THEN 'This attempt failed; the job will be retried.'
                       WHEN 'attempts_exhausted' THEN 'The job failed on every attempt it had.'
                       ELSE format('Section %s failed.', error_json ->> 'section_index') END)
         WHERE error_json ->> 'code' IN ('handler_failed', 'attempts_exhausted', 'section_failed');

        -- What retention deleted, per kind and final status: all-time totals stay right after it.
        CREATE TABLE job_pruned_totals (
            job_kind text NOT NULL,
            status   text NOT NULL,
            n        bigint NOT NULL,
            PRIMARY KEY (job_kind, status)
        );
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE job_pruned_totals;
        ALTER TABLE jobs DROP CONSTRAINT jobs_parent_id_fkey,
            ADD CONSTRAINT jobs_parent_id_fkey FOREIGN KEY (parent_id) REFERENCES jobs (id);
        ALTER TABLE lessons DROP CONSTRAINT lessons_job_id_fkey,
            ADD CONSTRAINT lessons_job_id_fkey FOREIGN KEY (job_id) REFERENCES jobs (id),
            ALTER COLUMN job_id SET NOT NULL;
        DROP TABLE job_attempts;
        ALTER TABLE jobs DROP COLUMN attempt_started_at, DROP COLUMN waited_seconds, DROP COLUMN deferrals,
            DROP COLUMN run_after;
        """
    )

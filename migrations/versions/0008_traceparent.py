"""the trace a job belongs to: jobs.traceparent, written by its create

Revision ID: 0008
Revises: 0009
Create Date: 2026-12-21
"""

from alembic import op

# 0008 was this branch's while 0009 (spending) landed first: it follows 0009, whose
# insert_limited_job it extends.
revision = "0008"
down_revision = "0009"
branch_labels = None
depends_on = None

# insert_limited_job of 0009, with (traced) or without the traceparent to store.
_LIMITED_INSERT = """
        CREATE OR REPLACE FUNCTION insert_limited_job(
            p_user_id text, p_job_kind text, p_key text, p_request jsonb, p_max_attempts integer,
            p_daily_limits jsonb, p_active_limits jsonb, p_token_limits jsonb, p_now timestamptz{parameter}
        )
        RETURNS TABLE (outcome text, id uuid, created_at timestamptz, tier text, quota_limit bigint,
                       used bigint, resets_at timestamptz, db_now timestamptz)
        LANGUAGE plpgsql VOLATILE AS $$
        #variable_conflict use_column
        DECLARE
            v_now timestamptz := coalesce(p_now, now());
            v_tier text;
            v_daily integer;
            v_active integer;
            v_tokens bigint;
            v_usage record;
        BEGIN
            PERFORM pg_advisory_xact_lock(hashtext('dylen.job_quota'), hashtext(p_user_id));
            INSERT INTO users (id) VALUES (p_user_id) ON CONFLICT (id) DO NOTHING;
            IF EXISTS (SELECT 1 FROM jobs j WHERE j.user_id = p_user_id AND j.job_kind = p_job_kind
                                            AND j.idempotency_key = p_key) THEN
                RETURN QUERY SELECT 'exists', NULL::uuid, NULL::timestamptz, NULL::text,
                                    NULL::bigint, NULL::bigint, NULL::timestamptz, v_now;
                RETURN;
            END IF;
            SELECT u.tier INTO v_tier FROM users u WHERE u.id = p_user_id;
            v_daily := coalesce((p_daily_limits ->> v_tier)::integer, (p_daily_limits ->> 'free')::integer);
            v_active := coalesce((p_active_limits ->> v_tier)::integer, (p_active_limits ->> 'free')::integer);
            v_tokens := coalesce((p_token_limits ->> v_tier)::bigint, (p_token_limits ->> 'free')::bigint);
            SELECT * INTO v_usage FROM job_usage(p_user_id, p_job_kind, v_now);
            IF v_usage.daily_used >= v_daily THEN
                RETURN QUERY SELECT 'quota-exceeded', NULL::uuid, NULL::timestamptz, v_tier,
                                    v_daily::bigint, v_usage.daily_used::bigint,
                                    v_usage.day_start + interval '1 day', v_now;
                RETURN;
            END IF;
            IF v_usage.tokens_used >= v_tokens THEN
                RETURN QUERY SELECT 'token-budget-exceeded', NULL::uuid, NULL::timestamptz, v_tier,
                                    v_tokens, v_usage.tokens_used,
                                    v_usage.day_start + interval '1 day', v_now;
                RETURN;
            END IF;
            IF v_usage.active_used >= v_active THEN
                RETURN QUERY SELECT 'too-many-active-jobs', NULL::uuid, NULL::timestamptz, v_tier,
                                    v_active::bigint, v_usage.active_used::bigint, NULL::timestamptz,
                                    v_now;
                RETURN;
            END IF;
            RETURN QUERY
                INSERT INTO jobs AS j (id, user_id, job_kind, status, idempotency_key, request_json,
                                       attempts, max_attempts, dispatched_at, created_at, updated_at{column})
                VALUES (gen_random_uuid(), p_user_id, p_job_kind, 'queued', p_key, p_request, 0,
                        p_max_attempts, v_now, v_now, v_now{value})
                ON CONFLICT (user_id, job_kind, idempotency_key) DO NOTHING
                RETURNING 'created', j.id, j.created_at, v_tier, NULL::bigint, NULL::bigint,
                          NULL::timestamptz, v_now;
        END
        $$;
"""


def _limited_insert(*, traced: bool) -> str:
    if not traced:
        return _LIMITED_INSERT.format(parameter="", column="", value="")
    return _LIMITED_INSERT.format(
        parameter=", p_traceparent text", column=", traceparent", value=", p_traceparent"
    )


def upgrade() -> None:
    op.execute(
        """
        -- The W3C traceparent of the span that created the job (create_job's request, or for a
        -- section its planning attempt), NULL with telemetry off. A dispatch outside that trace
        -- (rescue_jobs, an operator's retry) starts its span under it: one job stays one trace.
        ALTER TABLE jobs ADD COLUMN traceparent text;
        """
        + _limited_insert(traced=True)
        + """
        -- 0009's signature stays, calling the new one with NULL: functions still running the
        -- previous release keep creating jobs while this one deploys.
        CREATE OR REPLACE FUNCTION insert_limited_job(
            p_user_id text, p_job_kind text, p_key text, p_request jsonb, p_max_attempts integer,
            p_daily_limits jsonb, p_active_limits jsonb, p_token_limits jsonb, p_now timestamptz
        )
        RETURNS TABLE (outcome text, id uuid, created_at timestamptz, tier text, quota_limit bigint,
                       used bigint, resets_at timestamptz, db_now timestamptz)
        LANGUAGE sql VOLATILE AS $$
            SELECT * FROM insert_limited_job(p_user_id, p_job_kind, p_key, p_request, p_max_attempts,
                                             p_daily_limits, p_active_limits, p_token_limits, p_now,
                                             NULL::text)
        $$;
        """
    )


def downgrade() -> None:
    op.execute(
        _limited_insert(traced=False)
        + """
        DROP FUNCTION insert_limited_job(text, text, text, jsonb, integer, jsonb, jsonb, jsonb, timestamptz, text);
        ALTER TABLE jobs DROP COLUMN traceparent;
        """
    )

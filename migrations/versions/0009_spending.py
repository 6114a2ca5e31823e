"""spending: quotas count what was spent (model calls, attempts), token budgets, operators' grants

Revision ID: 0009
Revises: 0007
Create Date: 2026-12-20
"""

from alembic import op

revision = "0009"
down_revision = "0007"  # 0006 and 0008 are other branches'; the merge rechains them
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The result types of job_usage and insert_limited_job change, so they are
    # dropped and created again (CREATE OR REPLACE cannot change a result or parameter list).
    # Each stays one VOLATILE plpgsql call for its caller: a lock, then statements each taking a
    # fresh snapshot after it (migration 0002 says why that makes the counts exact).
    op.execute(
        """
        DROP FUNCTION insert_limited_job(text, text, text, jsonb, integer, jsonb, jsonb, timestamptz);
        DROP FUNCTION job_usage(text, text, timestamptz);

        -- What operators gave back of a user's day (`users refund`: a failure of ours), subtracted
        -- from the day's count and tokens. One row per user and UTC day, added to.
        CREATE TABLE quota_grants (
            user_id    text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            day        date NOT NULL,
            jobs       integer NOT NULL DEFAULT 0 CHECK (jobs >= 0),
            tokens     bigint NOT NULL DEFAULT 0 CHECK (tokens >= 0),
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (user_id, day)
        );

        -- A user's calls in flight (the jobs still spending): small, a row leaves
        -- it when its call ends.
        CREATE INDEX model_calls_user_in_flight_idx ON model_calls (user_id, lease_expires_at)
            WHERE ended_at IS NULL;

        -- The one definition of usage. Spent is spent: a job created this UTC day counts if it is
        -- live or done, or if anything of it ran: an attempt not given back (attempts > deferrals)
        -- or a model call on the ledger (a section's calls carry its lesson's id). Only a job
        -- canceled or failed before any of that gives its place back. Active: live jobs, plus the
        -- user's ended jobs (a canceled lesson) with a model call still in flight. Tokens: the
        -- user's calls started this UTC day (settled tokens, else the estimate). Grants subtract.
        CREATE FUNCTION job_usage(p_user_id text, p_job_kind text, p_now timestamptz)
        RETURNS TABLE (day_start timestamptz, daily_used integer, active_used integer,
                       tokens_used bigint)
        LANGUAGE sql STABLE AS $$
            WITH day AS (SELECT date_trunc('day', p_now, 'UTC') AS start),
            granted AS (
                SELECT coalesce(max(g.jobs), 0) AS jobs, coalesce(max(g.tokens), 0) AS tokens
                  FROM quota_grants g, day
                 WHERE g.user_id = p_user_id AND g.day = (day.start AT TIME ZONE 'UTC')::date
            )
            SELECT day.start,
                   greatest(0, (SELECT count(*) FROM jobs j
                                 WHERE j.user_id = p_user_id AND j.job_kind = p_job_kind
                                   AND j.created_at >= day.start
                                   AND j.created_at < day.start + interval '1 day'
                                   AND (j.status IN ('queued', 'running', 'done')
                                        OR j.attempts > j.deferrals
                                        OR EXISTS (SELECT 1 FROM model_calls c WHERE c.job_id = j.id)))
                               - granted.jobs)::integer,
                   ((SELECT count(*) FROM jobs j
                      WHERE j.user_id = p_user_id AND j.job_kind = p_job_kind
                        AND j.status IN ('queued', 'running'))
                    + (SELECT count(DISTINCT c.job_id) FROM model_calls c JOIN jobs j ON j.id = c.job_id
                        WHERE c.user_id = p_user_id AND c.ended_at IS NULL
                          AND c.lease_expires_at > p_now
                          AND j.job_kind = p_job_kind AND j.status NOT IN ('queued', 'running')))::integer,
                   greatest(0, (SELECT coalesce(sum(coalesce(c.input_tokens + c.output_tokens,
                                                             c.estimated_tokens)), 0)
                                  FROM model_calls c
                                 WHERE c.user_id = p_user_id AND c.started_at >= day.start
                                   AND c.started_at < day.start + interval '1 day')
                               - granted.tokens)::bigint
              FROM day, granted
        $$;

        -- As in 0002, with the token budget (p_token_limits: tier -> tokens a day) checked after the
        -- daily count: 'token-budget-exceeded' when the tokens spent today are at or over it. Only
        -- creates are held to it: a lesson already running may overshoot by its own cost.
        CREATE FUNCTION insert_limited_job(
            p_user_id text, p_job_kind text, p_key text, p_request jsonb, p_max_attempts integer,
            p_daily_limits jsonb, p_active_limits jsonb, p_token_limits jsonb, p_now timestamptz
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
                                       attempts, max_attempts, dispatched_at, created_at, updated_at)
                VALUES (gen_random_uuid(), p_user_id, p_job_kind, 'queued', p_key, p_request, 0,
                        p_max_attempts, v_now, v_now, v_now)
                ON CONFLICT (user_id, job_kind, idempotency_key) DO NOTHING
                RETURNING 'created', j.id, j.created_at, v_tier, NULL::bigint, NULL::bigint,
                          NULL::timestamptz, v_now;
        END
        $$;
        """
    )


def downgrade() -> None:
    # Back to 0002's usage rule, as that revision made it.
    op.execute(
        """
        DROP FUNCTION insert_limited_job(text, text, text, jsonb, integer, jsonb, jsonb, jsonb, timestamptz);
        DROP FUNCTION job_usage(text, text, timestamptz);
        DROP INDEX model_calls_user_in_flight_idx;
        DROP TABLE quota_grants;

        CREATE FUNCTION job_usage(p_user_id text, p_job_kind text, p_now timestamptz)
        RETURNS TABLE (day_start timestamptz, daily_used integer, active_used integer)
        LANGUAGE sql STABLE AS $$
            SELECT date_trunc('day', p_now, 'UTC'),
                   (SELECT count(*)::integer FROM jobs
                     WHERE user_id = p_user_id AND job_kind = p_job_kind
                       AND created_at >= date_trunc('day', p_now, 'UTC')
                       AND created_at < date_trunc('day', p_now, 'UTC') + interval '1 day'
                       AND status IN ('queued', 'running', 'done')),
                   (SELECT count(*)::integer FROM jobs
                     WHERE user_id = p_user_id AND job_kind = p_job_kind
                       AND status IN ('queued', 'running'))
        $$;

        CREATE FUNCTION insert_limited_job(
            p_user_id text, p_job_kind text, p_key text, p_request jsonb, p_max_attempts integer,
            p_daily_limits jsonb, p_active_limits jsonb, p_now timestamptz
        )
        RETURNS TABLE (outcome text, id uuid, created_at timestamptz, tier text, quota_limit integer,
                       used integer, resets_at timestamptz, db_now timestamptz)
        LANGUAGE plpgsql VOLATILE AS $$
        #variable_conflict use_column
        DECLARE
            v_now timestamptz := coalesce(p_now, now());
            v_tier text;
            v_daily integer;
            v_active integer;
            v_usage record;
        BEGIN
            PERFORM pg_advisory_xact_lock(hashtext('dylen.job_quota'), hashtext(p_user_id));
            INSERT INTO users (id) VALUES (p_user_id) ON CONFLICT (id) DO NOTHING;
            IF EXISTS (SELECT 1 FROM jobs j WHERE j.user_id = p_user_id AND j.job_kind = p_job_kind
                                            AND j.idempotency_key = p_key) THEN
                RETURN QUERY SELECT 'exists', NULL::uuid, NULL::timestamptz, NULL::text,
                                    NULL::integer, NULL::integer, NULL::timestamptz, v_now;
                RETURN;
            END IF;
            SELECT u.tier INTO v_tier FROM users u WHERE u.id = p_user_id;
            v_daily := coalesce((p_daily_limits ->> v_tier)::integer, (p_daily_limits ->> 'free')::integer);
            v_active := coalesce((p_active_limits ->> v_tier)::integer, (p_active_limits ->> 'free')::integer);
            SELECT * INTO v_usage FROM job_usage(p_user_id, p_job_kind, v_now);
            IF v_usage.daily_used >= v_daily THEN
                RETURN QUERY SELECT 'quota-exceeded', NULL::uuid, NULL::timestamptz, v_tier, v_daily,
                                    v_usage.daily_used, v_usage.day_start + interval '1 day', v_now;
                RETURN;
            END IF;
            IF v_usage.active_used >= v_active THEN
                RETURN QUERY SELECT 'too-many-active-jobs', NULL::uuid, NULL::timestamptz, v_tier,
                                    v_active, v_usage.active_used, NULL::timestamptz, v_now;
                RETURN;
            END IF;
            RETURN QUERY
                INSERT INTO jobs AS j (id, user_id, job_kind, status, idempotency_key, request_json,
                                       attempts, max_attempts, dispatched_at, created_at, updated_at)
                VALUES (gen_random_uuid(), p_user_id, p_job_kind, 'queued', p_key, p_request, 0,
                        p_max_attempts, v_now, v_now, v_now)
                ON CONFLICT (user_id, job_kind, idempotency_key) DO NOTHING
                RETURNING 'created', j.id, j.created_at, v_tier, NULL::integer, NULL::integer,
                          NULL::timestamptz, v_now;
        END
        $$;
        """
    )

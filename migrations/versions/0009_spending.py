"""spending: quotas count what was spent (model calls, attempts), token budgets, each user's share
of the calls in flight, operators' grants

Revision ID: 0009
Revises: 0007
Create Date: 2026-12-20
"""

from alembic import op

revision = "0009"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The result types of job_usage, insert_limited_job and take_model_slot change, so they are
    # dropped and created again (CREATE OR REPLACE cannot change a result or parameter list).
    # Each stays one VOLATILE plpgsql call for its caller: a lock, then statements each taking a
    # fresh snapshot after it (migration 0002 says why that makes the counts exact).
    op.execute(
        """
        DROP FUNCTION insert_limited_job(text, text, text, jsonb, integer, jsonb, jsonb, timestamptz);
        DROP FUNCTION job_usage(text, text, timestamptz);
        DROP FUNCTION take_model_slot(text, integer, integer, integer, double precision, integer,
                                      double precision, uuid, integer, integer, text, text, text);

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

        -- A user's calls in flight (their share, and the jobs still spending): small, a row leaves
        -- it when its call ends.
        CREATE INDEX model_calls_user_in_flight_idx ON model_calls (user_id, lease_expires_at)
            WHERE ended_at IS NULL;

        -- The daily count reads attempts, deferrals and (for the ledger probe) id too now:
        -- carried in the index, so the count stays index-only (0006). attempts changes at every
        -- claim, as status does, so carrying it costs no HOT update that status did not already.
        DROP INDEX jobs_user_kind_created_idx;
        CREATE INDEX jobs_user_kind_created_idx ON jobs (user_id, job_kind, created_at, status)
            INCLUDE (attempts, deferrals, id);

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

        -- As in 0007, with two checks first. A call for a job that has ended (canceled, failed, or
        -- done by another attempt) is refused: 'job_ended', its result could only be discarded.
        -- p_user_shares (tier -> calls in flight; NULL, or no entry for the tier nor 'free': not
        -- limited): the user's calls in flight, any model, under a per-user lock taken before the
        -- lane's (one order everywhere: user, then lane), refused with 'user_share' at the share.
        CREATE FUNCTION take_model_slot(
            p_model text, p_rpm integer, p_tpm integer, p_concurrency integer,
            p_window_seconds double precision, p_estimated_tokens integer, p_lease_seconds double precision,
            p_job_id uuid, p_section_index integer, p_attempt integer, p_user_id text,
            p_purpose text, p_prompt_version text, p_user_shares jsonb
        )
        RETURNS TABLE (call_id bigint, wait_seconds double precision, reason text)
        LANGUAGE plpgsql VOLATILE AS $$
        DECLARE
            v_now timestamptz;
            v_since timestamptz;
            v_paused timestamptz;
            v_share integer;
            v_count integer;
            v_tokens bigint;
            v_until timestamptz;
            v_id bigint;
        BEGIN
            IF p_job_id IS NOT NULL AND EXISTS (
                SELECT 1 FROM jobs j WHERE j.id = p_job_id AND j.status IN ('canceled', 'error', 'done')
            ) THEN
                RETURN QUERY SELECT NULL::bigint, 0.0::double precision, 'job_ended';
                RETURN;
            END IF;
            IF p_user_id IS NOT NULL AND p_user_shares IS NOT NULL THEN
                SELECT coalesce((p_user_shares ->> u.tier)::integer, (p_user_shares ->> 'free')::integer)
                  INTO v_share FROM users u WHERE u.id = p_user_id;
                IF NOT FOUND THEN
                    v_share := (p_user_shares ->> 'free')::integer;
                END IF;
            END IF;
            IF v_share IS NOT NULL THEN
                PERFORM pg_advisory_xact_lock(hashtext('dylen.model_share'), hashtext(p_user_id));
                SELECT count(*) INTO v_count FROM model_calls c
                 WHERE c.user_id = p_user_id AND c.ended_at IS NULL
                   AND c.lease_expires_at > clock_timestamp();
                IF v_count >= v_share THEN
                    RETURN QUERY SELECT NULL::bigint, 0.0::double precision, 'user_share';
                    RETURN;
                END IF;
            END IF;
            INSERT INTO model_lanes (model) VALUES (p_model) ON CONFLICT (model) DO NOTHING;
            SELECT l.paused_until INTO v_paused FROM model_lanes l WHERE l.model = p_model FOR UPDATE;
            v_now := clock_timestamp();  -- after the locks: the moment this call would start
            v_since := v_now - make_interval(secs => p_window_seconds);
            IF v_paused > v_now THEN
                RETURN QUERY SELECT NULL::bigint, extract(epoch FROM v_paused - v_now)::double precision,
                                    'paused';
                RETURN;
            END IF;
            IF p_concurrency IS NOT NULL THEN
                SELECT count(*) INTO v_count FROM model_calls c
                 WHERE c.model = p_model AND c.ended_at IS NULL AND c.lease_expires_at > v_now;
                IF v_count >= p_concurrency THEN
                    RETURN QUERY SELECT NULL::bigint, 0.0::double precision, 'concurrency';
                    RETURN;
                END IF;
            END IF;
            IF p_rpm IS NOT NULL THEN
                SELECT count(*) INTO v_count FROM model_calls c
                 WHERE c.model = p_model AND c.started_at > v_since;
                IF v_count >= p_rpm THEN
                    SELECT c.started_at INTO v_until FROM model_calls c
                     WHERE c.model = p_model AND c.started_at > v_since
                     ORDER BY c.started_at OFFSET v_count - p_rpm LIMIT 1;
                    RETURN QUERY SELECT NULL::bigint,
                        extract(epoch FROM v_until - v_since)::double precision, 'rpm';
                    RETURN;
                END IF;
            END IF;
            IF p_tpm IS NOT NULL THEN
                SELECT coalesce(sum(coalesce(c.input_tokens + c.output_tokens, c.estimated_tokens)), 0)
                  INTO v_tokens FROM model_calls c
                 WHERE c.model = p_model AND c.started_at > v_since;
                IF v_tokens > 0 AND v_tokens + p_estimated_tokens > p_tpm THEN
                    SELECT w.started_at INTO v_until FROM (
                        SELECT c.started_at, sum(coalesce(c.input_tokens + c.output_tokens,
                                                          c.estimated_tokens))
                                   OVER (ORDER BY c.started_at, c.id) AS freed
                          FROM model_calls c
                         WHERE c.model = p_model AND c.started_at > v_since) w
                     WHERE w.freed >= v_tokens + p_estimated_tokens - p_tpm
                     ORDER BY w.started_at LIMIT 1;
                    RETURN QUERY SELECT NULL::bigint,
                        extract(epoch FROM coalesce(v_until, v_now) - v_since)::double precision, 'tpm';
                    RETURN;
                END IF;
            END IF;
            INSERT INTO model_calls (model, job_id, section_index, attempt, user_id, purpose,
                                     prompt_version, started_at, lease_expires_at, estimated_tokens)
            VALUES (p_model, p_job_id, p_section_index, p_attempt, p_user_id, p_purpose,
                    p_prompt_version, v_now, v_now + make_interval(secs => p_lease_seconds),
                    p_estimated_tokens)
            RETURNING id INTO v_id;
            RETURN QUERY SELECT v_id, 0.0::double precision, NULL::text;
        END
        $$;
        """
    )


def downgrade() -> None:
    # Back to 0002's usage rule and 0007's take_model_slot, as those revisions made them.
    op.execute(
        """
        DROP INDEX jobs_user_kind_created_idx;
        CREATE INDEX jobs_user_kind_created_idx ON jobs (user_id, job_kind, created_at, status);
        DROP FUNCTION take_model_slot(text, integer, integer, integer, double precision, integer,
                                      double precision, uuid, integer, integer, text, text, text, jsonb);
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

        CREATE FUNCTION take_model_slot(
            p_model text, p_rpm integer, p_tpm integer, p_concurrency integer,
            p_window_seconds double precision, p_estimated_tokens integer, p_lease_seconds double precision,
            p_job_id uuid, p_section_index integer, p_attempt integer, p_user_id text,
            p_purpose text, p_prompt_version text
        )
        RETURNS TABLE (call_id bigint, wait_seconds double precision, reason text)
        LANGUAGE plpgsql VOLATILE AS $$
        DECLARE
            v_now timestamptz;
            v_since timestamptz;
            v_paused timestamptz;
            v_count integer;
            v_tokens bigint;
            v_until timestamptz;
            v_id bigint;
        BEGIN
            INSERT INTO model_lanes (model) VALUES (p_model) ON CONFLICT (model) DO NOTHING;
            SELECT l.paused_until INTO v_paused FROM model_lanes l WHERE l.model = p_model FOR UPDATE;
            v_now := clock_timestamp();
            v_since := v_now - make_interval(secs => p_window_seconds);
            IF v_paused > v_now THEN
                RETURN QUERY SELECT NULL::bigint, extract(epoch FROM v_paused - v_now)::double precision,
                                    'paused';
                RETURN;
            END IF;
            IF p_concurrency IS NOT NULL THEN
                SELECT count(*) INTO v_count FROM model_calls c
                 WHERE c.model = p_model AND c.ended_at IS NULL AND c.lease_expires_at > v_now;
                IF v_count >= p_concurrency THEN
                    RETURN QUERY SELECT NULL::bigint, 0.0::double precision, 'concurrency';
                    RETURN;
                END IF;
            END IF;
            IF p_rpm IS NOT NULL THEN
                SELECT count(*) INTO v_count FROM model_calls c
                 WHERE c.model = p_model AND c.started_at > v_since;
                IF v_count >= p_rpm THEN
                    SELECT c.started_at INTO v_until FROM model_calls c
                     WHERE c.model = p_model AND c.started_at > v_since
                     ORDER BY c.started_at OFFSET v_count - p_rpm LIMIT 1;
                    RETURN QUERY SELECT NULL::bigint,
                        extract(epoch FROM v_until - v_since)::double precision, 'rpm';
                    RETURN;
                END IF;
            END IF;
            IF p_tpm IS NOT NULL THEN
                SELECT coalesce(sum(coalesce(c.input_tokens + c.output_tokens, c.estimated_tokens)), 0)
                  INTO v_tokens FROM model_calls c
                 WHERE c.model = p_model AND c.started_at > v_since;
                IF v_tokens > 0 AND v_tokens + p_estimated_tokens > p_tpm THEN
                    SELECT w.started_at INTO v_until FROM (
                        SELECT c.started_at, sum(coalesce(c.input_tokens + c.output_tokens,
                                                          c.estimated_tokens))
                                   OVER (ORDER BY c.started_at, c.id) AS freed
                          FROM model_calls c
                         WHERE c.model = p_model AND c.started_at > v_since) w
                     WHERE w.freed >= v_tokens + p_estimated_tokens - p_tpm
                     ORDER BY w.started_at LIMIT 1;
                    RETURN QUERY SELECT NULL::bigint,
                        extract(epoch FROM coalesce(v_until, v_now) - v_since)::double precision, 'tpm';
                    RETURN;
                END IF;
            END IF;
            INSERT INTO model_calls (model, job_id, section_index, attempt, user_id, purpose,
                                     prompt_version, started_at, lease_expires_at, estimated_tokens)
            VALUES (p_model, p_job_id, p_section_index, p_attempt, p_user_id, p_purpose,
                    p_prompt_version, v_now, v_now + make_interval(secs => p_lease_seconds),
                    p_estimated_tokens)
            RETURNING id INTO v_id;
            RETURN QUERY SELECT v_id, 0.0::double precision, NULL::text;
        END
        $$;
        """
    )

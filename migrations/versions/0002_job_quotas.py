"""job quotas: what a user's jobs count against their tier, and the limited insert

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Why a function and not one CTE statement: a statement's snapshot is taken when it starts, so a
    # per-user lock taken inside it cannot make the jobs committed by whoever held that lock before
    # visible to its count. A VOLATILE function takes a fresh snapshot for each statement it runs
    # (READ COMMITTED), so the count after the lock sees every earlier create of the user: exact,
    # and still one statement (one round trip) for the caller.
    op.execute(
        """
        -- A user's daily count (created_at in the UTC day of p_now; canceled and error give it back)
        -- and the user's live jobs of the kind.
        CREATE INDEX jobs_user_kind_created_idx ON jobs (user_id, job_kind, created_at);
        CREATE INDEX jobs_user_kind_live_idx ON jobs (user_id, job_kind)
            WHERE status IN ('queued', 'running');

        -- The one definition of usage: read by the limited insert and by the usage views.
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

        -- Insert a queued job of a limited kind for a user, unless it would go over the tier's
        -- limits. Limits are jsonb maps tier -> number; a tier missing from a map gets 'free''s.
        -- outcome: 'created' (id, created_at), 'exists' (the key is taken: a replay or a 409, the
        -- caller looks), or 'quota-exceeded' / 'too-many-active-jobs' (tier, quota_limit, used,
        -- resets_at for the daily one, db_now). p_now NULL is the database clock; tests pass one.
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
            -- One user's limited creates run one at a time, until this transaction ends; other
            -- users' never wait (a hashtext collision only serialises two users now and then).
            PERFORM pg_advisory_xact_lock(hashtext('dylen.job_quota'), hashtext(p_user_id));
            INSERT INTO users (id) VALUES (p_user_id) ON CONFLICT (id) DO NOTHING;
            -- A replay is never limited (checked under the lock: a racing twin may just have won).
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


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION insert_limited_job(text, text, text, jsonb, integer, jsonb, jsonb, timestamptz); "
        "DROP FUNCTION job_usage(text, text, timestamptz); "
        "DROP INDEX jobs_user_kind_live_idx; DROP INDEX jobs_user_kind_created_idx;"
    )

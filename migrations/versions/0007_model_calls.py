"""model calls: provider lanes (rpm, tpm, concurrency per model, shared by every instance) and the
ledger of every call

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-14
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per call is both the lane's sliding log and the ledger: the slot is the row inserted
    # before the call, the settle after it completes that row (tokens, latency, outcome) in one
    # statement. So a call costs no round trip beyond the lane's two, and a call whose instance
    # died is still on the ledger (no outcome, its lease past: "lost") instead of missing.
    op.execute(
        """
        -- One row per model that was ever called: the row every take of the model locks (so the
        -- counts below are exact across instances), and a provider's 429 pause, seen by all.
        CREATE TABLE model_lanes (
            model        text PRIMARY KEY,
            paused_until timestamptz,
            pause_reason text
        );

        CREATE TABLE model_calls (
            id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            model            text NOT NULL,
            -- The lesson job (a section's calls carry its lesson's id and section_index); kept
            -- when job retention deletes the job: the ledger is for cost and audit.
            job_id           uuid REFERENCES jobs (id) ON DELETE SET NULL,
            section_index    integer,
            attempt          integer,
            user_id          text,
            purpose          text NOT NULL,
            prompt_version   text,
            started_at       timestamptz NOT NULL,
            -- In flight until ended_at is set or this passes (an instance that died mid-call).
            lease_expires_at timestamptz NOT NULL,
            -- What the tpm window counts for the call until its real tokens are settled.
            estimated_tokens integer NOT NULL DEFAULT 0,
            ended_at         timestamptz,
            latency_ms       integer,
            input_tokens     integer,
            output_tokens    integer,
            outcome          text CHECK (outcome IN
                                 ('ok', 'invalid', 'refused', 'rate_limited', 'error', 'timeout')),
            error_code       text,  -- operators only
            request_body     jsonb, -- only with DYLEN_MODEL_CALL_BODIES=true: they hold user text
            response_body    jsonb
        );
        -- The lane's window (calls and tokens started in the last minute, per model).
        CREATE INDEX model_calls_window_idx ON model_calls (model, started_at);
        -- The lane's in-flight count; small: a row leaves it when its call ends.
        CREATE INDEX model_calls_in_flight_idx ON model_calls (model, lease_expires_at)
            WHERE ended_at IS NULL;
        -- A job's usage (get_job, jobs show); a user's usage per day; retention and per-day views.
        CREATE INDEX model_calls_job_idx ON model_calls (job_id);
        CREATE INDEX model_calls_user_idx ON model_calls (user_id, started_at);
        CREATE INDEX model_calls_started_idx ON model_calls (started_at);

        -- Take a slot of a model's lane, or say how long until one may free. Why a function: the
        -- lane row's lock serialises the takes of one model across every instance, and a VOLATILE
        -- function's statements each take a fresh snapshot after that lock (as insert_limited_job
        -- of 0002 does), so the counts see every call committed before: exact, one round trip.
        -- Limits NULL: not limited. The window is a sliding one (p_window_seconds, 60 outside
        -- tests): a fixed per-minute row would let 2 x rpm through around a minute's boundary.
        -- Returns the new call's id, or NULL with the seconds to wait and why ('paused', 'rpm',
        -- 'tpm', 'concurrency').
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
            v_now := clock_timestamp();  -- after the lock: the moment this call would start
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
                    -- When a call ends is unknown; its lease is only the latest it frees.
                    RETURN QUERY SELECT NULL::bigint, 0.0::double precision, 'concurrency';
                    RETURN;
                END IF;
            END IF;
            IF p_rpm IS NOT NULL THEN
                SELECT count(*) INTO v_count FROM model_calls c
                 WHERE c.model = p_model AND c.started_at > v_since;
                IF v_count >= p_rpm THEN
                    -- A slot frees when the (count - rpm + 1)th oldest call leaves the window.
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
                -- An empty window admits any one call, or a call bigger than tpm would wait forever.
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
    op.execute(
        "DROP FUNCTION take_model_slot(text, integer, integer, integer, double precision, integer, "
        "double precision, uuid, integer, integer, text, text, text); "
        "DROP TABLE model_calls; DROP TABLE model_lanes;"
    )

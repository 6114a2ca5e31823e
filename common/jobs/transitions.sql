-- The statements of common/jobs/transitions.py, one per named block, read once at import.
-- Placeholders filled in there: {columns} (a job row), {jobs_columns} (the same, qualified by
-- `jobs.`), {attempt_holds} (this attempt still holds the claim), {done} (the `done` assignment).

-- name: create
-- A job without an owner (maintenance). Only the id and created_at come back: the rest is known.
INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json,
                  attempts, max_attempts, dispatched_at, traceparent)
VALUES (gen_random_uuid(), NULL, :job_kind, 'queued', :key, CAST(:request AS jsonb), 0,
        :max_attempts, now(), CAST(:traceparent AS text))
ON CONFLICT (user_id, job_kind, idempotency_key) DO NOTHING
RETURNING id, created_at

-- name: create_for_user
-- The database function (migrations 0002, 0009) takes a per-user lock, upserts the user, checks
-- the key and the tier's limits (NULL maps: no limit) and inserts; each of its statements takes a
-- fresh snapshot after the lock, so the limits are exact. One round trip for us.
SELECT outcome, id, created_at, tier, quota_limit, used, resets_at, db_now
  FROM insert_limited_job(CAST(:user_id AS text), CAST(:job_kind AS text), CAST(:key AS text),
                          CAST(:request AS jsonb), CAST(:max_attempts AS integer),
                          CAST(:daily_limits AS jsonb), CAST(:active_limits AS jsonb),
                          CAST(:token_limits AS jsonb), CAST(:now AS timestamptz), CAST(:traceparent AS text))

-- name: claim
-- A section starts only while its parent waits on it and no sibling has failed: checked inside the
-- claim, so nothing starts after a cancel or a failed section commits. A job scheduled for later
-- (run_after) is not claimed before its time, give or take a clock's skew between the queue and
-- the database. When the claim loses, the row comes back as it stood, in the same round trip, so
-- the caller answers without a second query.
WITH claimed AS (
    UPDATE jobs
       SET status = 'running', attempts = attempts + 1,
           lease_expires_at = now() + make_interval(secs => :lease_seconds),
           started_at = coalesce(started_at, now()), attempt_started_at = now(), run_after = NULL,
           updated_at = now()
     WHERE id = :id
       AND attempts < max_attempts
       AND (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))
       AND (run_after IS NULL OR run_after <= now() + make_interval(secs => :early_seconds))
       AND (parent_id IS NULL OR (
            EXISTS (SELECT 1 FROM jobs parent
                     WHERE parent.id = jobs.parent_id AND parent.status = 'running'
                       AND parent.lease_expires_at IS NULL)
            AND NOT EXISTS (SELECT 1 FROM jobs sibling
                             WHERE sibling.parent_id = jobs.parent_id AND sibling.status = 'error')))
    RETURNING {columns}
)
SELECT true AS claimed, now() AS db_now, {columns} FROM claimed
UNION ALL
SELECT false, now(), {columns} FROM jobs WHERE id = :id AND NOT EXISTS (SELECT 1 FROM claimed)

-- name: complete
UPDATE jobs SET {done} WHERE {attempt_holds}

-- name: complete_with
-- Followed by a kind's Output (INSERT ... SELECT ... FROM done): one statement.
WITH done AS (
    UPDATE jobs SET {done} WHERE {attempt_holds}
    RETURNING id, user_id, request_json, plan, NULL::jsonb AS section_results
)

-- name: fan_in_with
-- A waiting parent -> `done` only if none of its sections is not done, followed by its Output. Run
-- in the transaction that locked the parent (finish_section): it sees every section finished before.
WITH done AS (
    UPDATE jobs SET {done}
     WHERE id = :id AND status = 'running' AND lease_expires_at IS NULL AND plan IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM jobs s WHERE s.parent_id = jobs.id AND s.status <> 'done')
    RETURNING id, user_id, request_json, plan,
              (SELECT jsonb_agg(s.result_json ORDER BY s.section_index)
                 FROM jobs s WHERE s.parent_id = jobs.id) AS section_results
)

-- name: plan
WITH parent AS (
    UPDATE jobs SET plan = CAST(:plan AS jsonb), lease_expires_at = NULL, updated_at = now()
     WHERE {attempt_holds}
    RETURNING id, user_id, attempts, attempt_started_at
), recorded AS (
    INSERT INTO job_attempts (job_id, attempt, started_at, outcome, instance)
    SELECT id, attempts, attempt_started_at, 'planned', :instance FROM parent
    ON CONFLICT (job_id, attempt) DO NOTHING
)
INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json,
                  attempts, max_attempts, dispatched_at, parent_id, section_index, traceparent)
SELECT gen_random_uuid(), parent.user_id, CAST(:kind AS text), 'queued',
       parent.id || ':' || (brief.n - 1),
       jsonb_build_object('job_kind', CAST(:kind AS text), 'section_index', brief.n - 1,
                          'heading', brief.value ->> 'heading'),
       0, :max_attempts, now(), parent.id, brief.n - 1, CAST(:traceparent AS text)
  FROM parent,
       jsonb_array_elements(CAST(:plan AS jsonb) -> 'sections') WITH ORDINALITY AS brief(value, n)
RETURNING {columns}

-- name: finish_section
-- The parent is locked first (FOR UPDATE, re-checked after the wait): sections finishing at once
-- finish one after another, so the fan-in after it in the same transaction sees every sibling that
-- finished before. A parent no longer waiting (canceled, failed) discards the section's result.
WITH parent AS (
    SELECT id FROM jobs
     WHERE id = :parent_id AND status = 'running' AND lease_expires_at IS NULL
     FOR UPDATE
)
UPDATE jobs SET {done} WHERE {attempt_holds} AND parent_id = (SELECT id FROM parent)

-- name: end_attempt
-- An attempt that did not finish its job: back to `queued` for `run_after` (a retry uses the
-- attempt; a deferral gives it back by raising max_attempts, since attempts is the claim's fence
-- and never goes down) or, when final, `error`. The attempt goes on record in the same statement.
-- dispatched_at is when the new task is due, so rescue_jobs sees the job stale only past that.
WITH ended AS (
    UPDATE jobs
       SET status = CASE WHEN CAST(:final AS boolean) THEN 'error' ELSE 'queued' END,
           error_json = CAST(:error AS jsonb), lease_expires_at = NULL,
           run_after = CASE WHEN CAST(:final AS boolean) THEN NULL
                            ELSE now() + make_interval(secs => CAST(:delay AS float8)) END,
           dispatched_at = CASE WHEN CAST(:final AS boolean) THEN dispatched_at
                                ELSE now() + make_interval(secs => CAST(:delay AS float8)) END,
           max_attempts = max_attempts + CAST(:refund AS integer),
           deferrals = deferrals + CAST(:refund AS integer),
           waited_seconds = waited_seconds + CAST(:waited AS float8),
           completed_at = CASE WHEN CAST(:final AS boolean) THEN now() END, updated_at = now()
     WHERE {attempt_holds}
    RETURNING {columns}
), recorded AS (
    INSERT INTO job_attempts (job_id, attempt, started_at, outcome, error_code, error_message,
                              error_detail, instance)
    SELECT id, attempts, attempt_started_at, :outcome, :code, :message, :detail, :instance FROM ended
    ON CONFLICT (job_id, attempt) DO NOTHING
)
SELECT {columns} FROM ended

-- name: record_attempt
-- An attempt that lost its claim before it could finish (canceled, or a newer attempt took over).
INSERT INTO job_attempts (job_id, attempt, started_at, outcome, error_code, error_message,
                          error_detail, instance)
SELECT id, :attempt, attempt_started_at, :outcome, :code, :message, :detail, :instance
  FROM jobs WHERE id = :id
ON CONFLICT (job_id, attempt) DO NOTHING

-- name: expire
WITH expired AS (
    UPDATE jobs
       SET status = 'error', error_json = CAST(:error AS jsonb), lease_expires_at = NULL,
           completed_at = now(), updated_at = now()
     WHERE id = :id AND attempts >= max_attempts
       AND (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))
    RETURNING id, attempts, attempt_started_at
)
INSERT INTO job_attempts (job_id, attempt, started_at, outcome, error_code, error_message)
SELECT id, attempts, attempt_started_at, 'lease_expired', :code, :message FROM expired
ON CONFLICT (job_id, attempt) DO NOTHING

-- name: fail_parents
-- A waiting parent with a failed section fails (`section_failed`, naming the section and its error)
-- and its unfinished sections are canceled, in one statement (the parent row first).
WITH failed AS (
    UPDATE jobs parent
       SET status = 'error', lease_expires_at = NULL, completed_at = now(), updated_at = now(),
           error_json = jsonb_build_object(
               'code', 'section_failed',
               'message', format('Section %s failed: %s', section.section_index,
                                 coalesce(section.error_json ->> 'message', 'no message')),
               'section_index', section.section_index, 'section_job_id', section.id,
               'section_error', section.error_json)
      FROM (SELECT DISTINCT ON (s.parent_id) s.parent_id, s.id, s.section_index, s.error_json
              FROM jobs s JOIN jobs p ON p.id = s.parent_id
             WHERE s.status = 'error' AND p.status = 'running' AND p.lease_expires_at IS NULL
               AND (CAST(:parent_id AS uuid) IS NULL OR p.id = CAST(:parent_id AS uuid))
             ORDER BY s.parent_id, s.section_index) AS section
     WHERE parent.id = section.parent_id
       AND parent.status = 'running' AND parent.lease_expires_at IS NULL
    RETURNING parent.id
)
UPDATE jobs SET status = 'canceled', lease_expires_at = NULL, completed_at = now(), updated_at = now()
  FROM failed
 WHERE jobs.parent_id = failed.id AND jobs.status IN ('queued', 'running')
RETURNING failed.id

-- name: cancel
UPDATE jobs SET status = 'canceled', lease_expires_at = NULL, completed_at = now(), updated_at = now()
 WHERE id = :id AND status IN ('queued', 'running') AND parent_id IS NULL
   AND (CAST(:owner AS text) IS NULL OR user_id = CAST(:owner AS text))
RETURNING {columns}

-- name: cancel_sections
UPDATE jobs SET status = 'canceled', lease_expires_at = NULL, completed_at = now(), updated_at = now()
 WHERE parent_id = :id AND status IN ('queued', 'running')

-- name: requeue
-- `attempts` is never reset: it fences the conditional finish, so an attempt of the old run still
-- going can never finish the new one; `max_attempts` is raised instead. A parent that planned is not
-- planned again: it waits again and only its sections not done are requeued (in the same list).
WITH retried AS (
    UPDATE jobs
       SET status = CASE WHEN plan IS NULL THEN 'queued' ELSE 'running' END,
           max_attempts = attempts + :extra, lease_expires_at = NULL, result_json = NULL,
           started_at = CASE WHEN plan IS NULL THEN NULL ELSE started_at END, run_after = NULL,
           waited_seconds = 0, completed_at = NULL, dispatched_at = now(), updated_at = now()
     WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ('error', 'canceled') AND parent_id IS NULL
    RETURNING {columns}
), sections AS (
    UPDATE jobs
       SET status = 'queued', max_attempts = jobs.attempts + :extra, lease_expires_at = NULL,
           result_json = NULL, run_after = NULL, waited_seconds = 0, completed_at = NULL,
           dispatched_at = now(), updated_at = now()
      FROM retried
     WHERE jobs.parent_id = retried.id AND jobs.status <> 'done'
    RETURNING {jobs_columns}
)
SELECT * FROM retried UNION ALL SELECT * FROM sections

-- name: rescue
-- A bounded batch: rows another rescuer or a claim holds are skipped (SKIP LOCKED), and
-- `dispatched_at` moves forward in the same UPDATE, so a concurrent rescuer never dispatches them.
-- A queued job's dispatched_at is when its task is due (a retry's: its run_after), so nothing is
-- delivered before its time. An attempt whose lease ran out goes on record.
WITH picked AS (
    SELECT id, dispatched_at AS previous_dispatched_at, status AS previous_status, attempts,
           attempt_started_at
      FROM jobs
     WHERE (status = 'queued'
            AND (dispatched_at IS NULL OR dispatched_at < now() - make_interval(secs => :stale))
            AND (run_after IS NULL OR run_after <= now()))
        OR (status = 'running' AND lease_expires_at < now())
     ORDER BY dispatched_at NULLS FIRST
     LIMIT :limit
     FOR UPDATE SKIP LOCKED
), lost AS (
    INSERT INTO job_attempts (job_id, attempt, started_at, outcome, error_code, error_message)
    SELECT id, attempts, attempt_started_at, 'lease_expired', 'lease_expired',
           'The attempt did not finish within its lease.'
      FROM picked WHERE previous_status = 'running'
    ON CONFLICT (job_id, attempt) DO NOTHING
)
UPDATE jobs
   SET status = CASE WHEN jobs.attempts >= jobs.max_attempts THEN 'error' ELSE 'queued' END,
       error_json = CASE
           WHEN jobs.attempts >= jobs.max_attempts THEN jsonb_build_object(
               'code', 'attempts_exhausted',
               'message', 'No attempts left after the last lease expired.', 'attempt', jobs.attempts)
           WHEN jobs.status = 'running' THEN jsonb_build_object(
               'code', 'lease_expired',
               'message', 'The attempt did not finish within its lease; retrying.',
               'attempt', jobs.attempts)
           ELSE jobs.error_json END,
       completed_at = CASE WHEN jobs.attempts >= jobs.max_attempts THEN now() END,
       lease_expires_at = NULL, dispatched_at = now(), updated_at = now()
  FROM picked
 WHERE jobs.id = picked.id
   AND (jobs.status = 'queued' OR (jobs.status = 'running' AND jobs.lease_expires_at < now()))
RETURNING picked.previous_dispatched_at, {jobs_columns}

-- name: restore_dispatch_stamp
UPDATE jobs SET dispatched_at = :previous
 WHERE id = :id AND status = 'queued' AND dispatched_at IS NOT DISTINCT FROM :ours

-- name: prune
-- Retention: up to :batch top-level jobs finished before the cut-off, with their sections, go (their
-- attempts go with them; a lesson keeps its content, its job_id nulled). Done jobs only once the
-- stored done total counts them (completed before :done_mark), so all-time totals stay right; what
-- else went is added to job_pruned_totals in the same statement.
WITH doomed AS (
    SELECT id FROM jobs
     WHERE parent_id IS NULL AND status IN ('done', 'error', 'canceled')
       AND completed_at < now() - make_interval(days => :days)
       AND (status <> 'done' OR completed_at < CAST(:done_mark AS timestamptz))
     ORDER BY completed_at
     LIMIT :batch
     FOR UPDATE SKIP LOCKED
), doomed_rows AS (  -- the jobs and their sections: each an index probe (no OR across columns)
    SELECT id FROM doomed
    UNION ALL
    SELECT s.id FROM jobs s JOIN doomed ON s.parent_id = doomed.id
), gone AS (
    DELETE FROM jobs USING doomed_rows WHERE jobs.id = doomed_rows.id
    RETURNING jobs.job_kind, jobs.status, jobs.parent_id
), counted AS (
    INSERT INTO job_pruned_totals (job_kind, status, n)
    SELECT job_kind, status, count(*) FROM gone GROUP BY job_kind, status
    ON CONFLICT (job_kind, status) DO UPDATE SET n = job_pruned_totals.n + EXCLUDED.n
)
SELECT count(*) FILTER (WHERE parent_id IS NULL) AS jobs, count(*) AS rows FROM gone

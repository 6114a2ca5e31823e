"""A realistic volume for the plan test (tests/test_plans.py) and the growth benchmark
(bench/growth_bench.py): users, `days` days of jobs with sections, lessons, built by generate_series.

Shape, per `lesson_jobs` L: users L/8 with a heavy head (user `u0000001`, a pro, owns a few percent
of every job); lesson jobs spread evenly over the last `days` days in created_at order (the heap is
append-only, as in production); 40% planned into 3-5 sections; ~93% done, 3% error, 2% canceled,
and the last 40 live (queued, stale queued, leased, lease expired, waiting parents with sections);
one maintenance job per day (no user); a lesson per done lesson job, plus `old_lessons` older
lessons whose jobs retention deleted (job_id NULL), about half of all lessons archived.

The migration's secondary indexes are dropped for the load and rebuilt from their own definitions
(`pg_indexes`), foreign-key triggers are off during the load (`session_replication_role`), then
VACUUM ANALYZE: statistics and visibility map as autovacuum would leave them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

HEAVY_USER = "u0000001"
LIVE = 40  # the newest lesson jobs are live


@dataclass(frozen=True)
class Volume:
    users: int
    jobs: int
    lessons: int
    seconds: dict[str, float]  # "load", each index rebuilt ("index <name>"), "vacuum analyze"


def _user(expr: str, users: int) -> str:
    """A user id from a random draw: power 3 gives a heavy head (user 1: ~(1/users)^(1/3))."""
    return f"'u' || lpad((1 + floor({users} * power({expr}, 3)))::int::text, 7, '0')"


def _content(title: str) -> str:
    return (
        f"jsonb_build_object('title', {title}, 'summary', repeat('A short summary. ', 6), "
        "'sections', jsonb_build_array(jsonb_build_object('heading', 'What it is', 'body', "
        "repeat('Body text of a section. ', 8))))"
    )


def load_sql(lesson_jobs: int, old_lessons: int, days: int) -> list[str]:
    L = lesson_jobs
    U = max(100, L // 8)
    return [
        "SELECT setseed(0.28)",
        f"""
        INSERT INTO users (id, tier, created_at)
        SELECT 'u' || lpad(u::text, 7, '0'),
               CASE WHEN u = 1 OR u % 50 = 0 THEN 'pro' WHEN u % 10 = 0 THEN 'plus'
                    WHEN u % 4 = 0 THEN 'starter' ELSE 'free' END,
               now() - interval '{days + 90} days' + (u::float8 / {U}) * interval '{days + 89} days'
          FROM generate_series(1, {U}) u
        """,
        # Lesson jobs. `s` is the final state; planned ones (40%) carry a plan of n sections.
        f"""
        CREATE TEMPORARY TABLE spec AS
        SELECT g, {_user("random()", U)} AS user_id,
               now() - interval '{days} days' + (g::float8 / {L}) * (interval '{days} days' - interval '2 minutes') AS t,
               CASE WHEN g > {L - LIVE} THEN (ARRAY['queued', 'stale', 'leased', 'expired', 'waiting'])[1 + g % 5]
                    WHEN r < 0.03 THEN 'error' WHEN r < 0.05 THEN 'canceled' ELSE 'done' END AS s,
               g % 5 < 2 OR (g > {L - LIVE} AND g % 5 = 4) AS planned, 3 + g % 3 AS n
          FROM (SELECT g, random() AS r FROM generate_series(1, {L}) g) x
        """,
        """
        INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json, result_json,
                          error_json, attempts, max_attempts, lease_expires_at, dispatched_at,
                          created_at, updated_at, started_at, attempt_started_at, completed_at, plan)
        SELECT gen_random_uuid(), user_id, 'lesson',
               CASE s WHEN 'stale' THEN 'queued' WHEN 'leased' THEN 'running' WHEN 'expired' THEN 'running'
                      WHEN 'waiting' THEN 'running' ELSE s END,
               md5(g::text),
               jsonb_build_object('job_kind', 'lesson', 'payload', jsonb_build_object(
                   'topic', 'Topic ' || (g % 5000), 'details', NULL,
                   'depth', CASE WHEN planned THEN 'detailed' ELSE 'highlights' END, 'language', 'en')),
               CASE WHEN s = 'done' THEN jsonb_build_object('lesson_id', md5(g::text)::uuid) END,
               CASE WHEN s = 'error' THEN jsonb_build_object('code', CASE WHEN g % 3 = 0 THEN 'generator_failed'
                    ELSE 'section_failed' END, 'message', 'The generator failed.', 'attempt', 5) END,
               CASE WHEN s IN ('queued', 'stale') THEN 0 ELSE 1 END, 5,
               CASE s WHEN 'leased' THEN now() + interval '5 minutes' WHEN 'expired' THEN now() - interval '1 minute' END,
               CASE WHEN s = 'stale' THEN now() - interval '10 minutes' ELSE t END,
               t, t + interval '20 seconds',
               CASE WHEN s NOT IN ('queued', 'stale') THEN t + interval '1 second' END,
               CASE WHEN s NOT IN ('queued', 'stale') THEN t + interval '1 second' END,
               CASE WHEN s IN ('done', 'error', 'canceled') THEN t + interval '20 seconds' END,
               CASE WHEN planned AND s IN ('done', 'error', 'canceled', 'waiting') THEN jsonb_build_object(
                   'title', 'Topic ' || (g % 5000), 'summary', 'A lesson in parts.', 'sections',
                   (SELECT jsonb_agg(jsonb_build_object('heading', 'Part ' || i, 'body', 'What part ' || i || ' covers.'))
                      FROM generate_series(1, n) i)) END
          FROM spec
        """,
        # Sections of every planned parent: done under a done parent; one failed under a failed
        # one; under a canceled parent the first done and the rest canceled; a waiting parent has
        # one done, one leased, the rest queued.
        """
        INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json, result_json,
                          error_json, attempts, max_attempts, lease_expires_at, dispatched_at,
                          created_at, updated_at, started_at, attempt_started_at, completed_at,
                          parent_id, section_index)
        SELECT gen_random_uuid(), p.user_id, 'lesson.section', st, p.id || ':' || i,
               jsonb_build_object('job_kind', 'lesson.section', 'section_index', i, 'heading', 'Part ' || i),
               CASE WHEN st = 'done' THEN jsonb_build_object('heading', 'Part ' || i,
                    'body', repeat('The section as written. ', 12)) END,
               CASE WHEN st = 'error' THEN jsonb_build_object('code', 'generator_failed',
                    'message', 'The generator failed.', 'attempt', 5) END,
               CASE WHEN st = 'queued' THEN 0 ELSE 1 END, 5,
               CASE WHEN st = 'running' THEN now() + interval '5 minutes' END,
               p.created_at + interval '2 seconds', p.created_at + interval '2 seconds', p.updated_at,
               CASE WHEN st <> 'queued' THEN p.created_at + interval '3 seconds' END,
               CASE WHEN st <> 'queued' THEN p.created_at + interval '3 seconds' END,
               CASE WHEN st IN ('done', 'error', 'canceled') THEN p.created_at + interval '15 seconds' END,
               p.id, i
          FROM jobs p
         CROSS JOIN LATERAL generate_series(0, jsonb_array_length(p.plan -> 'sections') - 1) i
         CROSS JOIN LATERAL (SELECT CASE
               WHEN p.status = 'done' THEN 'done'
               WHEN p.status = 'error' THEN CASE WHEN i = 0 THEN 'error' ELSE 'canceled' END
               WHEN p.status = 'canceled' THEN CASE WHEN i = 0 THEN 'done' ELSE 'canceled' END
               ELSE CASE WHEN i = 0 THEN 'done' WHEN i = 1 THEN 'running' ELSE 'queued' END END AS st) x
         WHERE p.plan IS NOT NULL
        """,
        f"""
        INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json, result_json,
                          attempts, max_attempts, dispatched_at, created_at, updated_at, started_at,
                          attempt_started_at, completed_at)
        SELECT gen_random_uuid(), NULL, 'maintenance.archive_lessons', 'done',
               'archive-' || to_char(d, 'YYYY-MM-DD'), '{{"job_kind": "maintenance.archive_lessons", "payload": {{}}}}',
               '{{"archived": 0}}', 1, 5, d, d, d, d, d, d + interval '10 seconds'
          FROM generate_series(date_trunc('day', now(), 'UTC') - interval '{days - 1} days',
                               date_trunc('day', now(), 'UTC'), interval '1 day') d
        """,
        f"""
        INSERT INTO lessons (id, user_id, job_id, topic, title, content, created_at, archived_at)
        SELECT (j.result_json ->> 'lesson_id')::uuid, j.user_id, j.id, j.request_json #>> '{{payload,topic}}',
               'Lesson ' || j.idempotency_key, {_content("'Lesson ' || j.idempotency_key")}, j.completed_at,
               CASE WHEN j.completed_at < now() - interval '2 days' AND random() < 0.4
                    THEN j.completed_at + interval '1 day' END
          FROM jobs j
         WHERE j.job_kind = 'lesson' AND j.status = 'done'
        """,
        f"""
        INSERT INTO lessons (id, user_id, job_id, topic, title, content, created_at, archived_at)
        SELECT gen_random_uuid(), {_user("random()", U)}, NULL, 'Topic ' || (g % 5000), 'Lesson ' || g,
               {_content("'Lesson ' || g")}, t, CASE WHEN random() < 0.6 THEN t + interval '1 day' END
          FROM (SELECT g, now() - interval '{days + 60} days' + (g::float8 / {max(old_lessons, 1)}) * interval '60 days' AS t
                  FROM generate_series(1, {old_lessons}) g) x
        """,
        # The dashboard's done total, as its overview leaves it: everything done an hour ago counted.
        """
        UPDATE job_done_mark SET through = now() - interval '1 hour'
        """,
        """
        INSERT INTO job_done_totals (job_kind, n)
        SELECT job_kind, count(*) FROM jobs WHERE status = 'done' AND completed_at < now() - interval '1 hour'
         GROUP BY job_kind
        ON CONFLICT (job_kind) DO UPDATE SET n = EXCLUDED.n
        """,
    ]


TABLES = ("users", "jobs", "lessons")


def build(engine: sa.Engine, *, lesson_jobs: int, old_lessons: int, days: int = 30) -> Volume:
    """Fill an empty migrated database (see the module docstring); returns what it holds and how
    long each part took (an index's build time is what a migration creating it would lock for)."""
    seconds: dict[str, float] = {}
    with engine.begin() as conn:
        # Secondary indexes only: primary keys and unique constraints stay (foreign keys need them).
        indexes = conn.execute(
            sa.text(
                "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.schemaname = 'public' "
                "AND i.tablename = ANY(:tables) AND NOT EXISTS (SELECT 1 FROM pg_constraint c "
                "WHERE c.conname = i.indexname)"
            ),
            {"tables": list(TABLES)},
        ).all()
        for name, _ in indexes:
            conn.execute(sa.text(f'DROP INDEX "{name}"'))
        # The rows are consistent by construction; checking each foreign key would double the load.
        conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
        conn.execute(sa.text("SET LOCAL maintenance_work_mem = '512MB'"))
        started = time.perf_counter()
        for statement in load_sql(lesson_jobs, old_lessons, days):
            conn.execute(sa.text(statement))
        seconds["load"] = time.perf_counter() - started
        for name, definition in indexes:
            started = time.perf_counter()
            conn.execute(sa.text(definition))
            seconds[f"index {name}"] = time.perf_counter() - started
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        started = time.perf_counter()
        for table in TABLES:
            conn.execute(sa.text(f"VACUUM (ANALYZE) {table}"))
            # PostgreSQL 18 (the embedded test server) sets no page all-visible in the first
            # VACUUM after the load, only the hint bits; a second one sets the visibility map.
            pages, visible = conn.execute(
                sa.text("SELECT relpages, relallvisible FROM pg_class WHERE relname = :t"), {"t": table}
            ).one()
            if visible < pages // 2:
                conn.execute(sa.text(f"VACUUM {table}"))
        seconds["vacuum analyze"] = time.perf_counter() - started
        counts: dict[str, Any] = {
            t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() for t in TABLES
        }
    return Volume(users=counts["users"], jobs=counts["jobs"], lessons=counts["lessons"], seconds=seconds)

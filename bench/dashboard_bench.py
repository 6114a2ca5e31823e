"""The dashboard over 1,000,000 jobs: how long each view takes, end to end over HTTP.

Builds a scratch database with the migrations and seeds 1,000,200 jobs over 30 days (~33,300 a
day): 880,000 top-level ones from one generate_series (~93% done, 2.7% error, 1.9% canceled; 2%
maintenance jobs; each started 2 s after its creation), 115,200 sections (six under every 44th
lesson: planned lessons, spread over the 30 days) and a backlog of 5,000 queued lessons (a fifth
scheduled for later); VACUUM ANALYZE. Then a real `dashboard` process answers every view over HTTP,
timed, and the exact all-time GROUP BY the overview avoids, for comparison.

    PYTHONPATH=. .venv/bin/python -m bench.dashboard_bench [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from tests.support import FunctionServer, base_env, migrated_database, session

SEED = """
INSERT INTO users (id) SELECT 'u' || k FROM generate_series(0, 9999) k;
INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json, result_json, error_json,
                  attempts, max_attempts, dispatched_at, created_at, updated_at, started_at, completed_at)
SELECT gen_random_uuid(), 'u' || (g % 10000),
       CASE WHEN g % 50 = 0 THEN 'maintenance.archive_lessons' ELSE 'lesson' END, s, 'k' || g,
       '{"job_kind": "lesson", "payload": {"topic": "Photosynthesis", "depth": "highlights"}}',
       CASE WHEN s = 'done' THEN '{"lesson_id": "00000000-0000-0000-0000-000000000000"}'::jsonb END,
       CASE WHEN s = 'error' THEN jsonb_build_object('code', CASE WHEN g % 3 = 0 THEN 'generator_failed'
            ELSE 'timeout' END, 'message', 'boom', 'attempt', 5) END,
       1, 5, c, c, c, CASE WHEN s <> 'queued' THEN c + interval '2 seconds' END,
       CASE WHEN s IN ('done', 'error', 'canceled') THEN c + interval '20 seconds' END
  FROM (SELECT g, now() - (880000 - g) * interval '2.945 seconds' AS c,
               CASE WHEN g > 879990 THEN 'queued' WHEN g > 879985 THEN 'running' WHEN g % 37 = 0 THEN 'error'
                    WHEN g % 53 = 0 THEN 'canceled' ELSE 'done' END AS s
          FROM generate_series(1, 880000) g) x;
INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json, attempts, max_attempts,
                  dispatched_at, created_at, updated_at, started_at, completed_at, parent_id, section_index)
SELECT gen_random_uuid(), p.user_id, 'lesson.section', p.status, p.id || ':' || i,
       jsonb_build_object('job_kind', 'lesson.section', 'section_index', i, 'heading', 'Part ' || i),
       1, 5, p.created_at, p.created_at, p.created_at, p.created_at + interval '3 seconds',
       CASE WHEN p.status IN ('done', 'error', 'canceled') THEN p.created_at + interval '15 seconds' END, p.id, i
  FROM (SELECT id, user_id, created_at, status FROM jobs
         WHERE job_kind = 'lesson' AND status <> 'queued' AND CAST(substr(idempotency_key, 2) AS integer) % 44 = 0
       ) p, generate_series(0, 5) i;
INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json, attempts, max_attempts,
                  dispatched_at, created_at, updated_at, run_after)
SELECT gen_random_uuid(), 'u' || (g % 10000), 'lesson', 'queued', 'backlog' || g,
       '{"job_kind": "lesson", "payload": {"topic": "Tides"}}', 0, 5, now() - g * interval '50 ms',
       now() - g * interval '50 ms', now(), CASE WHEN g % 5 = 0 THEN now() + interval '10 minutes' END
  FROM generate_series(1, 5000) g
"""
EXACT = "SELECT job_kind, status, count(*) FROM jobs GROUP BY 1, 2"
# A lesson with its six sections, for the job page.
PLANNED = "SELECT parent_id FROM jobs WHERE job_kind = 'lesson.section' ORDER BY created_at DESC LIMIT 1"


def _timed(run: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        run()
        out.append((time.perf_counter() - start) * 1000)
    return out


def _summary(times: list[float]) -> str:
    times = sorted(times)
    p95 = times[int(0.95 * (len(times) - 1))]
    return f"median {statistics.median(times):6.1f} ms   p95 {p95:6.1f} ms   max {times[-1]:6.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    with migrated_database(args.admin_url) as url:
        engine = sa.create_engine(sa.engine.make_url(url).set(drivername="postgresql+pg8000"))
        started = time.perf_counter()
        with engine.begin() as conn:
            for statement in SEED.split(";"):
                if statement.strip():
                    conn.execute(sa.text(statement))
            # The migration's done total was taken on an empty table: start it over the seed.
            conn.execute(sa.text("UPDATE job_done_mark SET through = '-infinity'"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE jobs"))
            total = conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()
            planned = conn.execute(sa.text(PLANNED)).scalar_one()
        print(f"seeded {total:,} jobs in {time.perf_counter() - started:.0f}s")
        with engine.connect() as conn:
            exact = _timed(lambda: conn.execute(sa.text(EXACT)).all(), 5)
        logs = Path(tempfile.mkdtemp(prefix="dylen-dash-bench-"))
        server = FunctionServer("dashboard", base_env(url, DYLEN_JOBS_AUTO_PROCESS="false"), logs).start()
        views = {
            "overview  /": "/",
            "overview  /overview.json (live)": "/overview.json",
            "queue     /queue (1h)": "/queue",
            "queue     /queue?window=6h": "/queue?window=6h",
            "queue     /queue?window=24h": "/queue?window=24h",
            "queue     /queue.json (live, 1h)": "/queue.json?window=1h",
            "jobs      /jobs (newest 50)": "/jobs",
            "jobs      /jobs.json (live)": "/jobs.json",
            "jobs      /jobs?status=error": "/jobs?status=error",
            "jobs      /jobs?kind=lesson.section": "/jobs?kind=lesson.section",
            "jobs      /jobs?user=u42": "/jobs?user=u42",
            "job       /job (a lesson, 6 sections)": f"/job?id={planned}",
            "job       /job.json (live)": f"/job.json?id={planned}",
            "failures  /failures": "/failures",
            "usage     /usage (last 24 h)": "/usage",
            "usage     /usage.json (live)": "/usage.json",
        }
        results: dict[str, list[float]] = {}
        try:
            http = session()
            get = http.get
            first = _timed(lambda: get(server.url + "/", timeout=60).raise_for_status(), 1)[0]
            for name, path in views.items():
                get(server.url + path, timeout=60).raise_for_status()  # warm: prepared, cached
                results[name] = _timed(
                    lambda p=path: get(server.url + p, timeout=60).raise_for_status(), args.requests
                )
        finally:
            server.stop()
        engine.dispose()
    print(f"first overview (moves the done total over the seed: one full count, once): {first:.0f} ms")
    print(f"over HTTP, {args.requests} requests each:")
    for name, times in results.items():
        print(f"  {name:<40} {_summary(times)}")
    print(f"for comparison, an exact all-time GROUP BY: median {statistics.median(exact):.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

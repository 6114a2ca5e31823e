"""The dashboard's overview over 1,000,000 jobs: how long a refresh takes, end to end.

Builds a scratch database with the migrations, seeds 1M jobs with one generate_series over 30 days
(~93% done, 2.7% error, 1.9% canceled, a few live; 2% maintenance jobs), VACUUM ANALYZE, then runs
a real `dashboard` process and times GET / (the overview) over HTTP, plus the exact all-time GROUP BY
it avoids, for comparison.

    PYTHONPATH=. .venv/bin/python -m bench.dashboard_bench [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from tests.support import FunctionServer, base_env, migrated_database, session

SEED = """
INSERT INTO users (id) SELECT 'u' || k FROM generate_series(0, 9999) k;
INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json, result_json, error_json,
                  attempts, max_attempts, dispatched_at, created_at, updated_at, completed_at)
SELECT gen_random_uuid(), 'u' || (g % 10000),
       CASE WHEN g % 50 = 0 THEN 'maintenance.archive_lessons' ELSE 'lesson' END, s, 'k' || g,
       '{"job_kind": "lesson", "payload": {"topic": "Photosynthesis", "depth": "highlights"}}',
       CASE WHEN s = 'done' THEN '{"lesson_id": "00000000-0000-0000-0000-000000000000"}'::jsonb END,
       CASE WHEN s = 'error' THEN jsonb_build_object('code', CASE WHEN g % 3 = 0 THEN 'generator_failed'
            ELSE 'timeout' END, 'message', 'boom', 'attempt', 5) END,
       1, 5, c, c, c, CASE WHEN s IN ('done', 'error', 'canceled') THEN c + interval '20 seconds' END
  FROM (SELECT g, now() - (1000000 - g) * interval '2.592 seconds' AS c,
               CASE WHEN g > 999990 THEN 'queued' WHEN g > 999985 THEN 'running' WHEN g % 37 = 0 THEN 'error'
                    WHEN g % 53 = 0 THEN 'canceled' ELSE 'done' END AS s
          FROM generate_series(1, 1000000) g) x
"""
EXACT = "SELECT job_kind, status, count(*) FROM jobs GROUP BY 1, 2"


def _timed(run: object, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        out.append((time.perf_counter() - start) * 1000)
    return out


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
        print(f"seeded 1,000,000 jobs in {time.perf_counter() - started:.0f}s")
        with engine.connect() as conn:
            exact = _timed(lambda: conn.execute(sa.text(EXACT)).all(), 5)
        logs = Path(tempfile.mkdtemp(prefix="dylen-dash-bench-"))
        server = FunctionServer("dashboard", base_env(url, DYLEN_JOBS_AUTO_PROCESS="false"), logs).start()
        try:
            http = session()
            first = _timed(lambda: http.get(server.url + "/", timeout=60).raise_for_status(), 1)[0]
            times = _timed(lambda: http.get(server.url + "/", timeout=60).raise_for_status(), args.requests)
        finally:
            server.stop()
        engine.dispose()
    times.sort()
    p95 = times[int(0.95 * (len(times) - 1))]
    print(f"first overview (moves the done total over the seed: one full count, once): {first:.0f} ms")
    print(
        f"overview over HTTP, {len(times)} refreshes: median {statistics.median(times):.1f} ms, "
        f"p95 {p95:.1f} ms, max {times[-1]:.1f} ms"
    )
    print(f"for comparison, an exact all-time GROUP BY: median {statistics.median(exact):.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

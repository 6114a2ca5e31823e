"""Load benchmark (not a test): N concurrent clients create lesson jobs for D seconds, with local
dispatch on, against real function processes and PostgreSQL.

Reports: status codes (no 5xx expected), lost jobs (accepted but not `done` after the drain),
p50/p99 create latency, and the peak number of database connections (sampled from
pg_stat_activity for the benchmark's own database) against the configured pool ceiling
(processes x (DYLEN_DB_POOL_SIZE + DYLEN_DB_MAX_OVERFLOW)).

    make bench-load                       # 64 clients, 30 s, embedded PostgreSQL
    .venv/bin/python bench/load_bench.py --clients 64 --seconds 30 --admin-url postgresql://...
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from tests.support import TASK_SECRET, FunctionServer, base_env  # noqa: E402

DB_FUNCTIONS = ("process_job", "create_job")  # the processes that hold pools during the run


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--pool-size", type=int, default=5)
    parser.add_argument("--max-overflow", type=int, default=2)
    parser.add_argument("--drain-seconds", type=float, default=300)
    parser.add_argument("--admin-url", default=os.environ.get("DYLEN_BENCH_ADMIN_URL"))
    args = parser.parse_args()

    from devtools.embedded_pg import EmbeddedPostgres, create_database

    workdir = Path(tempfile.mkdtemp(prefix="dylen-bench-"))
    pg = None
    admin_url = args.admin_url
    if not admin_url:
        pg = EmbeddedPostgres(workdir / "pg", durable=False)
        admin_url = pg.start()
    dbname = f"dylen_bench_{uuid.uuid4().hex[:8]}"
    create_database(admin_url, dbname)
    url = sa.engine.make_url(admin_url).set(database=dbname).render_as_string(hide_password=False)
    env = {**os.environ, "DYLEN_DATABASE_URL": url, "DYLEN_AUTH_MODE": "dev", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "common.cli", "migrate"], env=env, cwd=ROOT, check=True)

    fenv = base_env(
        url,
        DYLEN_DB_POOL_SIZE=str(args.pool_size),
        DYLEN_DB_MAX_OVERFLOW=str(args.max_overflow),
        DYLEN_LOCAL_DISPATCH_MIN_BACKOFF_SECONDS="0.1",
        DYLEN_LOCAL_DISPATCH_MAX_BACKOFF_SECONDS="10",
        DYLEN_RESCUE_AFTER_SECONDS="30",
        # One task per job, as measured before fan-out (bench.fanout_bench measures sections).
        DYLEN_LESSON_GENERATOR="common.lessons.template:generate_lesson",
    )
    servers: dict[str, FunctionServer] = {}
    servers["process_job"] = FunctionServer("process_job", fenv, workdir).start()
    fenv["DYLEN_PROCESS_JOB_URL"] = servers["process_job"].url + "/"
    for name in ("create_job", "rescue_jobs"):
        servers[name] = FunctionServer(name, fenv, workdir).start()
    ceiling = len(DB_FUNCTIONS) * (args.pool_size + args.max_overflow)

    engine = sa.create_engine(sa.engine.make_url(url).set(drivername="postgresql+pg8000"), pool_size=1)
    peak = {"connections": 0}
    sampling = threading.Event()

    def sample() -> None:
        with engine.connect() as conn:
            while not sampling.is_set():
                n = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": dbname},
                ).scalar_one()
                conn.commit()
                peak["connections"] = max(peak["connections"], int(n))
                time.sleep(0.05)

    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    accepted: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + args.seconds

    def client(index: int) -> None:
        http = requests.Session()
        http.trust_env = False
        user = f"bench-{index}"
        while time.monotonic() < stop_at:
            body = {
                "job_kind": "lesson",
                "idempotency_key": uuid.uuid4().hex,
                "payload": {"topic": f"Load {index}"},
            }
            started = time.perf_counter()
            try:
                response = http.post(
                    servers["create_job"].url + "/", json=body, headers={"X-Dylen-User": user}, timeout=60
                )
            except requests.RequestException as error:
                with lock:
                    errors.append(repr(error))
                continue
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                statuses[response.status_code] += 1
                if response.status_code == 202:
                    accepted.append(response.json()["job_id"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    began = time.monotonic()
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    load_seconds = time.monotonic() - began

    # Drain: local dispatch delivers the backlog; rescue_jobs picks up anything it gave up on.
    drain_started = time.monotonic()
    remaining = len(accepted)
    rescues = 0
    rescued = 0
    last_remaining, last_progress = len(accepted) + 1, time.monotonic()
    with engine.connect() as conn:
        while time.monotonic() - drain_started < args.drain_seconds:
            remaining = conn.execute(sa.text("SELECT count(*) FROM jobs WHERE status <> 'done'")).scalar_one()
            conn.commit()
            if remaining == 0:
                break
            time.sleep(1)
            if remaining < last_remaining:
                last_remaining, last_progress = remaining, time.monotonic()
            elif time.monotonic() - last_progress > 15:
                # Stuck, not merely backlogged: what the 5-minute scheduler would do, sooner.
                answer = requests.post(
                    servers["rescue_jobs"].url + "/", headers={"X-Dylen-Task-Secret": TASK_SECRET}, timeout=60
                )
                rescues += 1
                rescued += int(answer.json().get("redispatched", 0)) if answer.ok else 0
                last_progress = time.monotonic()
        drain_seconds = time.monotonic() - drain_started
        done = conn.execute(sa.text("SELECT count(*) FROM jobs WHERE status = 'done'")).scalar_one()
        lessons = conn.execute(sa.text("SELECT count(*) FROM lessons")).scalar_one()
        total_jobs = conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()
    sampling.set()
    sampler.join(5)
    for server in servers.values():
        server.kill()
    engine.dispose()
    if pg is not None:
        pg.destroy()

    fivexx = sum(n for code, n in statuses.items() if code >= 500)
    print(f"clients={args.clients} seconds={args.seconds:g} pool={args.pool_size}+{args.max_overflow}")
    print(
        f"requests={sum(statuses.values())} in {load_seconds:.1f}s ({sum(statuses.values()) / load_seconds:.0f}/s)"
    )
    print(f"statuses={dict(sorted(statuses.items()))} 5xx={fivexx} client_errors={len(errors)}")
    if latencies:
        print(
            f"latency_ms p50={_percentile(latencies, 0.5) * 1000:.1f} p99={_percentile(latencies, 0.99) * 1000:.1f} "
            f"max={max(latencies) * 1000:.1f} mean={statistics.mean(latencies) * 1000:.1f}"
        )
    print(
        f"accepted={len(accepted)} jobs_in_db={total_jobs} done={done} lessons={lessons} "
        f"not_done_after_drain={remaining} drain_seconds={drain_seconds:.1f} "
        f"rescue_calls={rescues} rescued_jobs={rescued}"
    )
    print(f"db_connections_peak={peak['connections']} ceiling={ceiling}")
    ok = fivexx == 0 and not errors and remaining == 0 and total_jobs == len(accepted) == lessons
    ok = ok and peak["connections"] <= ceiling
    print("RESULT", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

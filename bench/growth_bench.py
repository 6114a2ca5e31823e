"""Growth: every endpoint and task on a near-empty database and on millions of jobs, in one run.

Two databases on one server, both built by the migrations and filled by tests/volume.py (the plan
test's shape: ~2.6 jobs per lesson job, sections included, a heavy head of users, VACUUM ANALYZE)
at the same daily traffic: the big one holds `--days` of it (10M jobs over a year by default), the
baseline one day. So both have the same last 24 hours (what the dashboard's windows count) and full
pages to show, and differ only in history: what a statement reads because the table is large. The
baseline's ~27,000 jobs are, for any plan, an empty table (a page of 0 rows would render nothing,
which is why it is not literally empty).

Each side gets its own set of real function processes (functions-framework, the same code and
settings), and both get the same requests, alternating in rounds (the baseline first in one round,
the big side first in the next), so a drift of the shared machine hits both alike. The requests come
from the benchmark's own users (`bench-*`), whose jobs and lessons the run makes itself, so a
request does the same work on both sides except what grows with the table.

Per endpoint: the median and p95 latency of sequential requests (one client, keep-alive), and the
ratio of the medians (big / baseline). Targets: every ratio <= 1.5; a replay <= 2x a create.
Afterwards: which index each statement used (pg_stat_user_indexes of the big database, reset after
the build), and how long each index took to build (what a migration creating it locks for).

    make bench-growth                      # ~10M jobs
    PYTHONPATH=. .venv/bin/python -m bench.growth_bench [--admin-url URL] [--lesson-jobs N] [--days D]
        [--revision 0005]     # both sides at the schema before migration 0006
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from bench.perf import machine, write_results
from tests import volume
from tests.support import TASK_SECRET, FunctionServer, base_env, migrated_database, stop_all

START, END = "<!-- growth:start -->", "<!-- growth:end -->"
FUNCTIONS = (
    "create_job",
    "get_job",
    "cancel_job",
    "process_job",
    "list_lessons",
    "get_lesson",
    "rescue_jobs",
    "dashboard",
)
USERS = 20
DASHBOARD_PAGES = {
    "dashboard overview": "/",
    "dashboard jobs": "/jobs",
    "dashboard jobs, status error": "/jobs?status=error",
    "dashboard jobs, one user": "/jobs?user={user}",
    "dashboard job": "/job?id={job}",
    "dashboard failures": "/failures",
    "dashboard users": "/users",
}


class Client:
    """One keep-alive connection per function, reopened when the server closed it while idle."""

    def __init__(self, server: FunctionServer) -> None:
        self.port = server.port
        self.conn: http.client.HTTPConnection | None = None

    def send(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, float]:
        payload = None if body is None else json.dumps(body)
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            started = time.perf_counter()
            try:
                self.conn.request(method, path, body=payload, headers=all_headers)
                response = self.conn.getresponse()
                data = response.read()
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
                continue
            elapsed = (time.perf_counter() - started) * 1000
            type_ = response.getheader("Content-Type") or ""
            return response.status, json.loads(data) if "json" in type_ else data, elapsed
        raise AssertionError("unreachable")


@dataclass
class Side:
    """One database with its function processes and what the run made there."""

    name: str
    url: str
    servers: dict[str, FunctionServer]
    clients: dict[str, Client] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    created: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)  # (user, body, job id)
    processed: list[tuple[str, str]] = field(default_factory=list)  # (user, job id)
    lessons: list[tuple[str, str]] = field(default_factory=list)  # (user, lesson id)
    n: int = 0

    def __post_init__(self) -> None:
        self.clients = {name: Client(server) for name, server in self.servers.items()}

    def user(self) -> str:
        self.n += 1
        return f"bench-{self.n % USERS}"

    def call(
        self,
        label: str | None,
        function: str,
        method: str,
        path: str,
        *,
        expect: int,
        body: Any = None,
        user: str | None = None,
    ) -> Any:
        headers = {"X-Dylen-User": user} if user else {"X-Dylen-Task-Secret": TASK_SECRET}
        status, answer, ms = self.clients[function].send(method, path, body, headers)
        if status != expect:
            raise RuntimeError(f"{self.name} {function} {method} {path}: {status} {str(answer)[:300]}")
        if label is not None:
            self.samples.setdefault(label, []).append(ms)
        return answer


def _body(topic: str) -> dict[str, Any]:
    return {"job_kind": "lesson", "idempotency_key": uuid.uuid4().hex, "payload": {"topic": topic}}


def round_steps(per_round: int) -> list[tuple[str, Callable[[Side], None]]]:
    """The steps of one round, in order, each run on one side."""

    def create(side: Side) -> None:
        for _ in range(per_round):
            user, body = side.user(), _body("Growth")
            job = side.call("create", "create_job", "POST", "/", expect=202, body=body, user=user)
            side.created.append((user, body, job["job_id"]))

    def replay(side: Side) -> None:
        for user, body, _ in side.created[-per_round:]:
            side.call("replay", "create_job", "POST", "/", expect=200, body=body, user=user)

    def conflict(side: Side) -> None:
        for user, body, _ in side.created[-per_round:]:
            other = {**body, "payload": {"topic": "Another topic"}}
            side.call("409 (key reused)", "create_job", "POST", "/", expect=409, body=other, user=user)

    def process(side: Side) -> None:
        for user, _, job_id in side.created[-per_round:]:
            side.call(
                "process_job (claim + finish)",
                "process_job",
                "POST",
                "/",
                expect=200,
                body={"job_id": job_id},
            )
            side.processed.append((user, job_id))

    def get_job(side: Side) -> None:
        for user, job_id in side.processed[-per_round:]:
            job = side.call("get_job (with progress)", "get_job", "GET", f"/{job_id}", expect=200, user=user)
            assert job["status"] == "done", job
            side.lessons.append((user, job["result"]["lesson_id"]))

    def list_lessons(side: Side) -> None:
        for _ in range(per_round):
            side.call("list_lessons", "list_lessons", "GET", "/?limit=20", expect=200, user=side.user())

    def heaviest(side: Side) -> None:
        # The volume's heaviest user has the same day on both sides (same traffic): its quota count
        # and lesson list read as many rows; its years of history are on the big side only.
        for _ in range(per_round // 5):
            user, body = volume.HEAVY_USER, _body("Heavy")
            side.call("create (heaviest user)", "create_job", "POST", "/", expect=202, body=body, user=user)
            side.call(
                "list_lessons (heaviest user)", "list_lessons", "GET", "/?limit=20", expect=200, user=user
            )

    def get_lesson(side: Side) -> None:
        for user, lesson_id in side.lessons[-per_round:]:
            side.call("get_lesson", "get_lesson", "GET", f"/{lesson_id}", expect=200, user=user)

    def cancel(side: Side) -> None:
        queued = []
        for _ in range(per_round):  # not measured: what there is to cancel
            user, body = side.user(), _body("To cancel")
            queued.append(
                (user, side.call(None, "create_job", "POST", "/", expect=202, body=body, user=user))
            )
        for user, job in queued:
            side.call("cancel_job", "cancel_job", "POST", f"/{job['job_id']}", expect=200, user=user)

    def rescue(side: Side) -> None:
        for _ in range(3):
            side.call("rescue_jobs", "rescue_jobs", "POST", "/", expect=200, body={})

    def dashboard(side: Side) -> None:
        user, job_id = side.processed[-1]
        for label, page in DASHBOARD_PAGES.items():
            for _ in range(3):
                side.call(label, "dashboard", "GET", page.format(user=user, job=job_id), expect=200)

    return [
        ("create", create),
        ("replay", replay),
        ("409", conflict),
        ("process", process),
        ("get_job", get_job),
        ("list_lessons", list_lessons),
        ("heaviest", heaviest),
        ("get_lesson", get_lesson),
        ("cancel", cancel),
        ("rescue", rescue),
        ("dashboard", dashboard),
    ]


@contextlib.contextmanager
def functions(url: str, logs: Path) -> Iterator[dict[str, FunctionServer]]:
    env = base_env(
        url,
        DYLEN_JOBS_AUTO_PROCESS="false",
        DYLEN_LOG_LEVEL="WARNING",
        DYLEN_DB_POOL_SIZE="2",
        DYLEN_DB_MAX_OVERFLOW="1",
        THREADS="2",
        # One step per lesson: the claim, the generator and the finish with its lesson.
        DYLEN_LESSON_GENERATOR="common.lessons.template:generate_lesson",
    )
    process = FunctionServer("process_job", env, logs).start(wait=False)
    env["DYLEN_PROCESS_JOB_URL"] = process.url + "/"
    servers = {"process_job": process}
    servers.update(
        {n: FunctionServer(n, env, logs).start(wait=False) for n in FUNCTIONS if n != "process_job"}
    )
    try:
        for server in servers.values():
            server.wait_ready(60)
        yield servers
    finally:
        stop_all(servers.values())


@contextlib.contextmanager
def server(admin_url: str | None) -> Iterator[str]:
    """The given server, else an embedded one for the run (removed afterwards)."""
    if admin_url is not None:
        yield admin_url
        return
    from devtools.embedded_pg import EmbeddedPostgres

    scratch = Path(tempfile.mkdtemp(prefix="dylen-growth-pg-"))
    pg = EmbeddedPostgres(scratch / "data", durable=False)
    try:
        yield pg.start()
    finally:
        pg.destroy()
        shutil.rmtree(scratch, ignore_errors=True)


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(sa.engine.make_url(url).set(drivername="postgresql+pg8000"), poolclass=NullPool)


def index_usage(url: str) -> list[tuple[str, str, int, str]]:
    """(table, index, scans since the reset, size) of the watched tables' indexes."""
    engine = _engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT relname, indexrelname, idx_scan, pg_size_pretty(pg_relation_size(indexrelid)) "
                "FROM pg_stat_user_indexes WHERE relname IN ('jobs', 'lessons', 'users') "
                "ORDER BY relname, indexrelname"
            )
        ).all()
    engine.dispose()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def quota_count(url: str) -> str:
    """The heavy user's daily and active counts, as executed (EXPLAIN ANALYZE), on the big side."""
    engine = _engine(url)
    with engine.connect() as conn:
        plan = conn.execute(
            sa.text("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT * FROM job_usage(:u, 'lesson', now())"),
            {"u": volume.HEAVY_USER},
        ).all()
        today = conn.execute(
            sa.text(
                "SELECT count(*) FROM jobs WHERE user_id = :u AND job_kind = 'lesson' "
                "AND created_at >= date_trunc('day', now(), 'UTC')"
            ),
            {"u": volume.HEAVY_USER},
        ).scalar()
    engine.dispose()
    return f"{today} lesson jobs today\n" + "\n".join(r[0] for r in plan)


def measure(sides: list[Side], *, rounds: int, per_round: int) -> None:
    steps = round_steps(per_round)
    for number in range(rounds + 1):  # round 0 warms both sides up and is not kept
        order = sides if number % 2 == 0 else sides[::-1]
        for _, step in steps:
            for side in order:
                step(side)
        if number == 0:
            for side in sides:
                side.samples.clear()
        print(f"round {number} done", flush=True)


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.95 * (len(ordered) - 1))]


def render(results: dict[str, Any], command: str) -> str:
    big, base = results["volume"], results["baseline"]
    lines = [
        START,
        "## Growth (`make bench-growth`)",
        "",
        f"Measured {results['date']} on {results['machine']}; PostgreSQL {results['server']} "
        f"(shared_buffers {results['shared_buffers']}), schema at revision {results['revision']}.",
        f"Command: `{command}`.",
        "",
        f"Big side: **{big['jobs']:,} jobs** over {results['days']} days ({big['users']:,} users, "
        f"{big['lessons']:,} lessons), built in {results['build_seconds']:.0f} s. Baseline: one day of "
        f"the same traffic ({base['jobs']:,} jobs, {base['users']:,} users, {base['lessons']:,} lessons). "
        "Sequential requests through real function processes, "
        f"{results['rounds']} alternating rounds; latency in ms (median / p95); ratio of the medians.",
        "",
        "| endpoint or task | baseline: median / p95 | big: median / p95 | ratio (target <= 1.5) | samples |",
        "|---|---|---|---|---|",
    ]
    for label, row in results["figures"].items():
        mark = "" if row["ratio"] <= 1.5 else " (over)"
        lines.append(
            f"| {label} | {row['baseline'][0]:.1f} / {row['baseline'][1]:.1f} | {row['big'][0]:.1f} / "
            f"{row['big'][1]:.1f} | **{row['ratio']:.2f}x**{mark} | {row['n']} |"
        )
    lines += [
        "",
        f"A replay costs **{results['replay_vs_create']:.2f}x** a create on the big side (target <= 2x).",
        "",
        "The heavy user's quota count on the big side, as executed:",
        "",
        "```",
        results["quota_count"],
        "```",
        "",
        "Index use during the measured rounds (big side; `pg_stat_user_indexes`, reset after the build):",
        "",
        "| table | index | scans | size |",
        "|---|---|---|---|",
    ]
    for table, index, scans, size in results["index_usage"]:
        lines.append(f"| {table} | {index} | {scans:,} | {size} |")
    builds = [(k.removeprefix("index "), v) for k, v in results["build"].items() if k.startswith("index ")]
    lines += [
        "",
        "Build of each secondary index on the big side, in seconds (a migration creating one holds a "
        "write lock on its table that long): " + ", ".join(f"{k} {v:.0f}" for k, v in builds) + ".",
        "",
        END,
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("DYLEN_BENCH_ADMIN_URL"),
        help="the server to build both databases on (default: an embedded one, fsync off)",
    )
    parser.add_argument("--lesson-jobs", type=int, default=3_850_000, help="~2.6 jobs each (sections)")
    parser.add_argument("--days", type=int, default=365, help="history of the big side, in days of traffic")
    parser.add_argument("--old-lessons", type=int, help="lessons whose jobs are gone (default: half)")
    parser.add_argument(
        "--revision", default="head", help="schema revision of both sides (0005: before 0006)"
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=25)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    # A kill must still drop the two databases (several GB): SIGTERM unwinds like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    old_lessons = args.old_lessons if args.old_lessons is not None else args.lesson_jobs // 2
    logs = Path(tempfile.mkdtemp(prefix="dylen-growth-"))
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "revision": args.revision,
        "rounds": args.rounds,
    }
    with (
        server(args.admin_url) as admin_url,
        migrated_database(admin_url, args.revision) as base_url,
        migrated_database(admin_url, args.revision) as big_url,
    ):
        day = max(1000, args.lesson_jobs // args.days)  # the same traffic, one day of it
        built = volume.build(_engine(base_url), lesson_jobs=day, old_lessons=day // 2, days=1)
        results["baseline"] = {"jobs": built.jobs, "users": built.users, "lessons": built.lessons}
        engine = _engine(big_url)
        started = time.perf_counter()
        print(f"building {args.lesson_jobs:,} lesson jobs over {args.days} days ...", flush=True)
        built = volume.build(engine, lesson_jobs=args.lesson_jobs, old_lessons=old_lessons, days=args.days)
        results["build_seconds"] = time.perf_counter() - started
        results["build"] = built.seconds
        results["volume"] = {"jobs": built.jobs, "users": built.users, "lessons": built.lessons}
        results["days"] = args.days
        print(f"built {built} in {results['build_seconds']:.0f} s", flush=True)
        for url in (base_url, big_url):
            reset = _engine(url)
            with reset.connect() as conn:
                results["server"] = conn.execute(sa.text("SHOW server_version")).scalar()
                results["shared_buffers"] = conn.execute(sa.text("SHOW shared_buffers")).scalar()
                conn.execute(sa.text("SELECT pg_stat_reset()"))
            reset.dispose()
        engine.dispose()
        with functions(base_url, logs) as base_servers, functions(big_url, logs) as big_servers:
            sides = [Side("baseline", base_url, base_servers), Side("big", big_url, big_servers)]
            measure(sides, rounds=args.rounds, per_round=args.per_round)
        results["index_usage"] = index_usage(big_url)
        results["quota_count"] = quota_count(big_url)
    figures = {}
    for label in sides[0].samples:
        e, b = sides[0].samples[label], sides[1].samples[label]
        figures[label] = {
            "baseline": (statistics.median(e), _p95(e)),
            "big": (statistics.median(b), _p95(b)),
            "ratio": statistics.median(b) / statistics.median(e),
            "n": len(b),
        }
    results["figures"] = figures
    results["replay_vs_create"] = figures["replay"]["big"][0] / figures["create"]["big"][0]
    flags = [a for a in sys.argv[1:] if a != "--no-write"]
    command = "make bench-growth" + (f' BENCH_ARGS="{" ".join(flags)}"' if flags else "")
    section = render(results, command)
    print(section)
    if not args.no_write:
        write_results(section, START, END)
        print("wrote bench/RESULTS.md")
    over = [k for k, v in figures.items() if v["ratio"] > 1.5]
    if over or results["replay_vs_create"] > 2:
        print(f"targets missed: {over or ''} replay/create {results['replay_vs_create']:.2f}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

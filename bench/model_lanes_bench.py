"""Model lanes benchmark (not a test), on real PostgreSQL and, for lessons, real function processes
and the Gemini stand-in (tests/gemini_standin.py) through the real google-genai SDK.

1. What the lane costs a call: `model_call` with no provider behind it, one caller and 8 at once
   (each its own database session): statements per call, and ms to take the slot and to settle.
2. A 10-section lesson against the stand-in answering in 1 s, on a 20 rpm lane (the real 60 s
   window), one process_job at THREADS=10: expected from the limit (11 calls fit one window: two
   call times) against measured. Then two such lessons at once: 22 calls, so 2 of them wait in
   their process for the first call to leave the window (60 s + the 1 s margin).

    PYTHONPATH=. .venv/bin/python -m bench.model_lanes_bench [--admin-url postgresql://...] [--calls 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

LATENCY = 1.0
RPM = 20
THREADS = 10
MODEL = "gemini-2.5-flash"


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered):.2f} ms, p99 {p99:.2f} ms"


def lane_cost(url: str, calls: int) -> dict[str, Any]:
    """In this process: the lane's two statements per call, timed."""
    os.environ.update(
        DYLEN_DATABASE_URL=url,
        DYLEN_AUTH_MODE="dev",
        DYLEN_ENV_FILE=os.devnull,
        DYLEN_DB_POOL_SIZE="8",
        DYLEN_MODEL_LIMITS="bench-model=rpm:1000000,tpm:1000000000,concurrency:64",
    )
    from common.models import lanes
    from common.models.lanes import CallContext, model_call
    from common.platform.db import Connection

    statements = threading.local()
    execute = Connection.execute

    def counting(self: Connection, statement: Any, params: Any = None) -> Any:
        statements.n = getattr(statements, "n", 0) + 1
        return execute(self, statement, params)

    Connection.execute = counting  # type: ignore[method-assign]
    take_ms: list[float] = []
    settle_ms: list[float] = []
    per_call: list[int] = []
    take, settle = lanes.take_slot, lanes.settle

    def timed_take(*args: Any, **kwargs: Any) -> int:
        started = time.perf_counter()
        try:
            return take(*args, **kwargs)
        finally:
            take_ms.append((time.perf_counter() - started) * 1000)

    def timed_settle(*args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        try:
            settle(*args, **kwargs)
        finally:
            settle_ms.append((time.perf_counter() - started) * 1000)

    lanes.take_slot, lanes.settle = timed_take, timed_settle  # type: ignore[assignment]

    def one(_: int) -> None:
        statements.n = 0
        with model_call(CallContext(user_id="bench"), "bench-model", purpose="bench") as call:
            call.usage(100, 10)
        per_call.append(statements.n)

    results: dict[str, Any] = {}
    for label, workers in (("1 caller", 1), ("8 callers", 8)):
        one(0)  # warm: pool, prepared statements
        take_ms.clear(), settle_ms.clear(), per_call.clear()
        started = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(calls)))
        seconds = time.perf_counter() - started
        results[label] = {
            "statements per call": sorted(set(per_call)),
            "take": _percentiles(take_ms),
            "settle": _percentiles(settle_ms),
            "calls/s": round(calls / seconds),
        }
    Connection.execute = execute  # type: ignore[method-assign]
    lanes.take_slot, lanes.settle = take, settle  # type: ignore[assignment]
    return results


def lessons(url: str) -> dict[str, Any]:
    """Real processes: a 10-section lesson on a 20 rpm lane, then two at once."""
    # Lazily: the test support (and SQLAlchemy) only when the benchmark runs.
    import sqlalchemy as sa

    from tests.gemini_standin import StandIn, most_in_any_window
    from tests.support import FunctionServer, Stack, base_env, free_port, lesson_body

    logs = Path(tempfile.mkdtemp(prefix="dylen-lanes-bench-"))
    standin = StandIn(free_port(), "bench-key", latency=LATENCY)
    port = free_port()
    env = base_env(
        url,
        DYLEN_LESSON_GENERATOR="gemini",
        GEMINI_API_KEY="bench-key",
        DYLEN_GEMINI_BASE_URL=standin.url,
        DYLEN_GEMINI_MODEL=MODEL,
        DYLEN_GEMINI_TIMEOUT_SECONDS="10",
        DYLEN_MODEL_LIMITS=f"{MODEL}=rpm:{RPM}",
        # Room to wait in-process for the window (otherwise RetryLater reschedules the section).
        DYLEN_MODEL_SLOT_WAIT_SECONDS="70",
        DYLEN_PROCESS_JOB_URL=f"http://127.0.0.1:{port}/",
        DYLEN_LOCAL_DISPATCH_WORKERS=str(THREADS),
        DYLEN_DB_POOL_SIZE=str(THREADS),
        DYLEN_LOG_LEVEL="WARNING",
        THREADS=str(THREADS),
    )
    servers = {"process_job": FunctionServer("process_job", env, logs, port=port).start()}
    servers["create_job"] = FunctionServer("create_job", env, logs).start()
    stack = Stack(servers)
    engine = sa.create_engine(sa.engine.make_url(url).set(drivername="postgresql+pg8000"))

    def create() -> str:
        response = stack.create(
            f"bench-{uuid.uuid4().hex[:8]}", lesson_body("Lanes benchmark", depth="training")
        )
        assert response.status_code == 202, response.text
        return str(response.json()["job_id"])

    def took(job_id: str, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        with engine.connect() as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    sa.text(
                        "SELECT status, EXTRACT(EPOCH FROM completed_at - created_at) AS took FROM jobs WHERE id = :id"
                    ),
                    {"id": job_id},
                ).one()
                conn.rollback()
                if row.status in ("done", "error"):
                    assert row.status == "done", row
                    return float(row.took)
                time.sleep(0.05)
        raise AssertionError(f"lesson {job_id} not done within {timeout} s")

    try:
        one = took(create())
        time.sleep(62)  # an empty window for the next run
        pair = [create(), create()]
        two = sorted(took(job_id) for job_id in pair)
        seen = standin.calls(model=MODEL)
    finally:
        stack.stop()
        standin.stop()
        engine.dispose()
    return {
        "one lesson (11 calls), expected": f"{2 * LATENCY:.1f} s + overhead (11 calls fit {RPM} rpm)",
        "one lesson, measured": f"{one:.2f} s",
        "two lessons at once (22 calls), expected": f"first ~{2 * LATENCY:.0f} s; second ~{61 + LATENCY:.0f} s "
        f"(its last 2 calls wait for the window: 60 s + 1 s margin after the first call)",
        "two lessons at once, measured": f"{two[0]:.2f} s and {two[1]:.2f} s",
        "stand-in calls": len(seen),
        "most in any 60 s at the stand-in": most_in_any_window([c["arrived"] for c in seen], 60),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--admin-url", default=os.environ.get("DYLEN_TEST_DATABASE_URL"))
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--skip-lessons", action="store_true")
    args = parser.parse_args()
    from tests.support import migrated_database

    pg = None
    admin_url = args.admin_url
    if not admin_url:
        from devtools.embedded_pg import EmbeddedPostgres

        pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="dylen-lanes-pg-")) / "data", durable=False)
        admin_url = pg.start()
    try:
        with migrated_database(admin_url) as url:
            for label, figures in lane_cost(url, args.calls).items():
                print(f"lane cost, {label}: {figures}")
            if not args.skip_lessons:
                for label, value in lessons(url).items():
                    print(f"{label}: {value}")
    finally:
        if pg is not None:
            pg.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fan-out benchmark (not a test): a 10-section lesson whose sections run as child jobs, against the
same work done in one step, in the same run, on real function processes and PostgreSQL.

The generator stands in for a language model: `plan` sleeps 0.2 s and each `write_section` 1 s;
the one-step generator does the same work in one call (0.2 + 10 x 1 = 10.2 s). One process_job
instance at THREADS=10 and the local dispatcher with 10 workers. Create-to-done is read from the
database (`completed_at - created_at` of the lesson job), so polling adds nothing to it.

    PYTHONPATH=. .venv/bin/python -m bench.fanout_bench [--admin-url postgresql://...] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common.lessons import template
from common.lessons.generation import SECTIONS_BY_DEPTH, LessonRequest

PLAN_SECONDS = 0.2
SECTION_SECONDS = 1.0
THREADS = 10


class Sleepy:
    """A planner that sleeps like a model call (DYLEN_LESSON_GENERATOR=bench.fanout_bench:sleepy)."""

    def plan(self, request: LessonRequest) -> dict[str, Any]:
        time.sleep(PLAN_SECONDS)
        return template.plan(request)

    def write_section(self, request: LessonRequest, plan: dict[str, Any], index: int) -> dict[str, Any]:
        time.sleep(SECTION_SECONDS)
        return template.write_section(request, plan, index)


sleepy = Sleepy()


def one_step(request: LessonRequest) -> dict[str, Any]:
    """The same work in one call (DYLEN_LESSON_GENERATOR=bench.fanout_bench:one_step)."""
    time.sleep(PLAN_SECONDS + SECTION_SECONDS * SECTIONS_BY_DEPTH[request.depth])
    return template.generate_lesson(request)


def _run(admin_url: str, *, repeats: int) -> dict[str, Any]:
    # Lazily: the test support (and SQLAlchemy) only when the benchmark runs, not when a function
    # process imports this module for its generator.
    import sqlalchemy as sa

    from tests.support import FunctionServer, Stack, base_env, free_port, lesson_body, migrated_database

    logs = Path(tempfile.mkdtemp(prefix="dylen-fanout-bench-"))
    results: dict[str, Any] = {}
    with migrated_database(admin_url) as url:
        engine = sa.create_engine(sa.engine.make_url(url).set(drivername="postgresql+pg8000"))

        def stack_for(generator: str) -> Stack:
            port = free_port()
            env = base_env(
                url,
                DYLEN_LESSON_GENERATOR=generator,
                DYLEN_PROCESS_JOB_URL=f"http://127.0.0.1:{port}/",
                DYLEN_LOCAL_DISPATCH_WORKERS=str(THREADS),
                DYLEN_LOG_LEVEL="WARNING",
                DYLEN_DB_POOL_SIZE=str(THREADS),
                THREADS=str(THREADS),
            )
            servers = {"process_job": FunctionServer("process_job", env, logs, port=port).start()}
            servers["create_job"] = FunctionServer("create_job", env, logs).start()
            return Stack(servers)

        def lesson_seconds(stack: Stack, depth: str) -> float:
            user = f"bench-{uuid.uuid4().hex[:8]}"
            response = stack.create(user, lesson_body("Fan-out benchmark", depth=depth))
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            deadline = time.monotonic() + 60
            with engine.connect() as conn:
                while time.monotonic() < deadline:
                    row = conn.execute(
                        sa.text(
                            "SELECT status, EXTRACT(EPOCH FROM completed_at - created_at) AS took "
                            "FROM jobs WHERE id = :id"
                        ),
                        {"id": job_id},
                    ).one()
                    conn.rollback()  # a fresh snapshot for the next poll
                    if row.status in ("done", "error"):
                        assert row.status == "done", row
                        return float(row.took)
                    time.sleep(0.01)
            raise AssertionError(f"lesson {job_id} not done within 60 s")

        stacks = {
            "fanout": stack_for("bench.fanout_bench:sleepy"),
            "one_step": stack_for("bench.fanout_bench:one_step"),
        }
        try:
            for stack in stacks.values():
                lesson_seconds(stack, "highlights")  # warm: pools, prepared statements, dispatcher
            fanout = [lesson_seconds(stacks["fanout"], "training") for _ in range(repeats)]
            single = lesson_seconds(stacks["one_step"], "training")
        finally:
            for stack in stacks.values():
                stack.stop()
            engine.dispose()
    sections = SECTIONS_BY_DEPTH["training"]
    median = statistics.median(fanout)
    critical_path = PLAN_SECONDS + SECTION_SECONDS  # what the generator alone needs with enough threads
    results = {
        "sections": sections,
        "fanout_create_to_done_s": [round(t, 3) for t in fanout],
        "fanout_median_s": round(median, 3),
        "one_step_create_to_done_s": round(single, 3),
        "speedup": round(single / median, 2),
        "fanout_overhead_s": round(median - critical_path, 3),
        "fanout_overhead_per_section_ms": round((median - critical_path) / sections * 1000, 1),
        "one_step_overhead_s": round(single - (PLAN_SECONDS + SECTION_SECONDS * sections), 3),
        "target_met": median <= 2.5 and single >= 10.2 and single / median >= 4,
    }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--admin-url", default=os.environ.get("DYLEN_TEST_DATABASE_URL"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pg = None
    admin_url = args.admin_url
    if not admin_url:
        from devtools.embedded_pg import EmbeddedPostgres

        pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="dylen-fanout-pg-")) / "data", durable=False)
        admin_url = pg.start()
    try:
        results = _run(admin_url, repeats=args.repeats)
    finally:
        if pg is not None:
            pg.destroy()
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    return 0 if results["target_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

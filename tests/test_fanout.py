"""Lessons in parallel: a planning generator's sections run as child jobs (real processes, real
PostgreSQL). The lesson job plans; each section is a job of its own; the last one to finish stores
the lesson and finishes the lesson job, exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from common.lessons import template
from common.lessons.generation import LessonRequest
from tests.factories import job_row, lesson_count, section_rows
from tests.faults import kill_all, rescue, start_stack, wait_until
from tests.support import (
    ROOT,
    Stack,
    StackFactory,
    base_env,
    generator_calls,
    lesson_body,
    section_calls,
)

FANOUT = "tests.generators:fanout"


@pytest.fixture(scope="module")
def fanout_stack(make_stack: StackFactory) -> Stack:
    """Local dispatch on: process_job dispatches the sections to itself, 10 at a time."""
    return make_stack(DYLEN_LESSON_GENERATOR=FANOUT, THREADS="10", DYLEN_LOCAL_DISPATCH_WORKERS="10")


@pytest.fixture(scope="module")
def fanout_manual(make_stack: StackFactory) -> Stack:
    """Auto-process off: the test delivers the lesson job and each section itself."""
    return make_stack(
        DYLEN_JOBS_AUTO_PROCESS="false", DYLEN_LESSON_GENERATOR=FANOUT, DYLEN_JOB_MAX_ATTEMPTS="3"
    )


def _create(stack: Stack, user: str, topic: str, depth: str = "training") -> str:
    response = stack.create(user, lesson_body(topic, depth=depth))
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def _progress(stack: Stack, user: str, job_id: str) -> tuple[int, int]:
    response = stack.get_job(user, job_id)
    assert response.status_code == 200, response.text
    progress = response.json()["progress"]
    return progress["completed"], progress["total"]


def _sections(db: sa.Engine, job_id: str) -> list[Any]:
    with db.connect() as conn:
        return section_rows(conn, job_id)


def _plan_and_sections(stack: Stack, db: sa.Engine, job_id: str) -> list[str]:
    response = stack.deliver(job_id)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "running"
    return [row.id for row in _sections(db, job_id)]


def _expected_content(topic: str, depth: str, user: str, job_id: str) -> dict[str, Any]:
    request = LessonRequest(
        topic=topic, details=None, depth=depth, language="en", job_id=job_id, user_id=user, attempt=1
    )
    return template.generate_lesson(request)


def _lesson_content(db: sa.Engine, job_id: str) -> dict[str, Any]:
    with db.connect() as conn:
        content = conn.execute(
            sa.text("SELECT content FROM lessons WHERE job_id = :id"), {"id": job_id}
        ).scalar_one()
    return dict(content)


def test_a_ten_section_lesson_runs_as_ten_sections_and_progress_only_rises(
    fanout_stack: Stack, db: sa.Engine, user: str, calls_dir: Path
) -> None:
    # Given the test planner, whose sections take a moment each
    topic = "slow:0.2 Photosynthesis"
    # When a training lesson (10 sections) is created through create_job
    job_id = _create(fanout_stack, user, topic)
    seen: list[tuple[int, int]] = []

    def done() -> bool:
        response = fanout_stack.get_job(user, job_id)
        body = response.json()
        seen.append((body["progress"]["completed"], body["progress"]["total"]))
        return bool(body["status"] in ("done", "error"))

    wait_until(done, timeout=30, interval=0.02, what="lesson done")
    # Then it is done with one lesson whose sections are the plan's, in plan order
    with db.connect() as conn:
        assert job_row(conn, job_id)["status"] == "done"
        assert lesson_count(conn, job_id) == 1
    assert _lesson_content(db, job_id) == _expected_content(topic, "training", user, job_id)
    # And plan ran once and write_section exactly 10 times, once per section
    calls = generator_calls(calls_dir, job_id)
    assert calls.count("plan 1") == 1
    assert sorted(section_calls(calls_dir, job_id)) == list(range(10))
    # And the sections are internal jobs of the same owner, all done
    sections = _sections(db, job_id)
    assert [(s.job_kind, s.user_id, s.status) for s in sections] == [("lesson.section", user, "done")] * 10
    # And progress, polled during the run, rose monotonically to 10/10
    completed = [c for c, _ in seen]
    assert completed == sorted(completed), seen
    assert seen[-1] == (10, 10)
    assert all(total in (1, 10) for _, total in seen)
    # And a section is not a job its owner can see or cancel
    assert fanout_stack.get_job(user, sections[0].id).status_code == 404
    assert fanout_stack.cancel(user, sections[0].id).status_code == 404


def test_progress_counts_each_section_as_it_finishes(fanout_manual: Stack, db: sa.Engine, user: str) -> None:
    job_id = _create(fanout_manual, user, "Progress", depth="highlights")
    assert _progress(fanout_manual, user, job_id) == (0, 1)  # not planned yet: one step
    sections = _plan_and_sections(fanout_manual, db, job_id)
    assert _progress(fanout_manual, user, job_id) == (0, 2)
    for k, section in enumerate(sections, start=1):
        assert fanout_manual.deliver(section).status_code == 200
        assert _progress(fanout_manual, user, job_id) == (k, 2)
    assert fanout_manual.get_job(user, job_id).json()["status"] == "done"


def test_a_one_step_lesson_reports_zero_then_one_of_one(manual_stack: Stack, user: str) -> None:
    response = manual_stack.create(user, lesson_body("One step"))
    job_id = response.json()["job_id"]
    assert _progress(manual_stack, user, job_id) == (0, 1)
    assert manual_stack.deliver(job_id).status_code == 200
    assert _progress(manual_stack, user, job_id) == (1, 1)


def test_ten_concurrent_deliveries_of_every_task_still_make_one_lesson(
    fanout_manual: Stack, db: sa.Engine, user: str, calls_dir: Path
) -> None:
    job_id = _create(fanout_manual, user, "Concurrency")
    with ThreadPoolExecutor(max_workers=20) as pool:
        # When the lesson job's task is delivered 10 times at once
        answers = list(pool.map(lambda _: fanout_manual.deliver(job_id), range(10)))
        sections = [row.id for row in _sections(db, job_id)]
        # And then every section's task 10 times at once
        answers += list(pool.map(fanout_manual.deliver, [s for s in sections for _ in range(10)]))
    # Then every answer was 2xx (duplicates never slow the queue), the plan ran once, each section
    # was written once
    assert {a.status_code for a in answers} == {200}, [a.text for a in answers if a.status_code != 200]
    assert len(sections) == 10
    assert generator_calls(calls_dir, job_id).count("plan 1") == 1
    assert sorted(section_calls(calls_dir, job_id)) == list(range(10))
    # And there is one lesson and the job is done
    with db.connect() as conn:
        assert lesson_count(conn, job_id) == 1
        assert job_row(conn, job_id)["status"] == "done"


def test_a_section_that_fails_twice_is_retried_alone_then_the_lesson_is_stored(
    fanout_manual: Stack, db: sa.Engine, user: str, calls_dir: Path
) -> None:
    job_id = _create(fanout_manual, user, "flaky-section:1 Tides", depth="highlights")
    first, flaky = _plan_and_sections(fanout_manual, db, job_id)
    assert fanout_manual.deliver(first).status_code == 200
    # When section 1 fails on attempts 1 and 2 (500: Cloud Tasks retries it) and succeeds on 3
    assert [fanout_manual.deliver(flaky).status_code for _ in range(3)] == [200, 200, 200]
    # Then the lesson is stored once; section 0 was written once, section 1 three times
    with db.connect() as conn:
        assert lesson_count(conn, job_id) == 1
    assert section_calls(calls_dir, job_id) == [0, 1, 1, 1]
    assert fanout_manual.get_job(user, job_id).json()["status"] == "done"


def test_a_section_out_of_attempts_fails_the_lesson_and_retry_reruns_only_unfinished_sections(
    fanout_manual: Stack, db: sa.Engine, database_url: str, user: str, calls_dir: Path
) -> None:
    # Given a lesson whose section 1 fails on all three attempts of its first run
    job_id = _create(fanout_manual, user, "fail3-section:1 Volcanoes", depth="detailed")
    sections = _plan_and_sections(fanout_manual, db, job_id)
    assert fanout_manual.deliver(sections[0]).status_code == 200
    # When section 1 runs out of attempts
    assert [fanout_manual.deliver(sections[1]).status_code for _ in range(3)] == [200, 200, 200]
    # Then the lesson job is `error` with section_failed naming the section, and no lesson
    body = fanout_manual.get_job(user, job_id).json()
    assert body["status"] == "error"
    assert body["error"]["code"] == "section_failed"
    assert "Section 1" in body["error"]["message"]
    assert body["progress"] == {"completed": 1, "total": 6}
    with db.connect() as conn:
        assert lesson_count(conn, job_id) == 0
    # And the remaining sections were canceled: delivering them runs nothing
    assert [s.status for s in _sections(db, job_id)] == ["done", "error"] + ["canceled"] * 4
    assert all(fanout_manual.deliver(s).status_code == 200 for s in sections[2:])
    assert section_calls(calls_dir, job_id) == [0, 1, 1, 1]

    # When an operator looks at it, then retries it
    env = {**base_env(database_url), "PYTHONPATH": str(ROOT), "DYLEN_JOBS_AUTO_PROCESS": "false"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "common.cli", "jobs", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )

    shown = cli("show", job_id, "--json")
    assert shown.returncode == 0, shown.stderr
    listed = json.loads(shown.stdout)["sections"]
    assert [(s["status"], s["attempts"]) for s in listed] == [("done", 1), ("error", 3)] + [
        ("canceled", 0)
    ] * 4
    assert "sections    1 of 6 done" in cli("show", job_id).stdout
    retried = cli("retry", job_id)
    assert retried.returncode == 0, retried.stderr
    assert "5 unfinished section(s) re-run" in retried.stdout
    # Then the lesson job waits on its sections again (it is not planned again), and only the
    # sections that did not finish run: section 1 now succeeds on its 4th attempt
    assert fanout_manual.get_job(user, job_id).json()["status"] == "running"
    assert [s.status for s in _sections(db, job_id)] == ["done"] + ["queued"] * 5
    for section in sections[1:]:
        assert fanout_manual.deliver(section).status_code == 200
    assert fanout_manual.get_job(user, job_id).json()["status"] == "done"
    assert generator_calls(calls_dir, job_id).count("plan 1") == 1
    assert sorted(section_calls(calls_dir, job_id)) == [0, 1, 1, 1, 1, 2, 3, 4, 5]
    with db.connect() as conn:
        assert lesson_count(conn, job_id) == 1


def test_permanent_error_from_plan_ends_the_lesson_job_without_sections(
    fanout_manual: Stack, db: sa.Engine, user: str, calls_dir: Path
) -> None:
    job_id = _create(fanout_manual, user, "permanent-plan Alchemy")
    response = fanout_manual.deliver(job_id)
    assert response.status_code == 200, response.text
    body = fanout_manual.get_job(user, job_id).json()
    assert (body["status"], body["error"]["code"]) == ("error", "unsupported_topic")
    assert _sections(db, job_id) == []
    assert generator_calls(calls_dir, job_id) == ["plan 1"]


def test_cancel_while_sections_run_starts_no_section_and_stores_no_lesson(
    fanout_manual: Stack, db: sa.Engine, user: str, calls_dir: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    job_id = _create(fanout_manual, user, f"block:{gate}", depth="detailed")
    sections = _plan_and_sections(fanout_manual, db, job_id)
    # Given sections 0 and 1 running (blocked inside write_section)
    running: list[requests.Response] = []
    threads = [
        threading.Thread(target=lambda s=s: running.append(fanout_manual.deliver(s))) for s in sections[:2]
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(section_calls(calls_dir, job_id)) == 2, timeout=10, what="two sections started")
    # When the owner cancels the lesson
    assert fanout_manual.cancel(user, job_id).status_code == 200
    # Then no other section starts, whoever delivers it
    assert all(fanout_manual.deliver(s).status_code == 200 for s in sections[2:])
    # And the running sections' results are discarded when they finish
    gate.touch()
    for thread in threads:
        thread.join(30)
    assert [r.json().get("outcome") for r in running] == ["superseded", "superseded"]
    assert sorted(section_calls(calls_dir, job_id)) == [0, 1]
    assert fanout_manual.get_job(user, job_id).json()["status"] == "canceled"
    assert {s.status for s in _sections(db, job_id)} == {"canceled"}
    with db.connect() as conn:
        assert lesson_count(conn, job_id) == 0


@pytest.fixture(scope="module")
def kill_stack(database_url: str, logs_dir: Path, calls_dir: Path) -> Iterator[Stack]:
    stack = start_stack(
        database_url,
        logs_dir,
        names=("create_job", "get_job", "rescue_jobs"),
        DYLEN_JOB_TIMEOUT_SECONDS="2",
        DYLEN_RESCUE_AFTER_SECONDS="1",
        DYLEN_LESSON_GENERATOR=FANOUT,
        DYLEN_TEST_CALLS_DIR=str(calls_dir),
    )
    yield stack
    kill_all(stack)


def test_kill_9_of_process_job_while_sections_run_then_rescue_makes_one_lesson(
    kill_stack: Stack, db: sa.Engine, user: str, calls_dir: Path, tmp_path: Path
) -> None:
    gate = tmp_path / f"gate-{uuid.uuid4().hex}"
    job_id = _create(kill_stack, user, f"block:{gate}", depth="detailed")
    # Given sections running inside process_job
    wait_until(lambda: len(section_calls(calls_dir, job_id)) >= 2, timeout=15, what="sections started")
    # When process_job is killed -9 and comes back
    server = kill_stack.servers["process_job"]
    server.kill()
    gate.touch()
    server.start()

    # Then rescue_jobs (once the sections' leases ran out) gets the lesson done, once
    def done() -> bool:
        with db.connect() as conn:
            if job_row(conn, job_id)["status"] == "done":
                return True
        rescue(kill_stack)
        return False

    wait_until(done, timeout=45, interval=0.5, what="lesson done after rescue")
    with db.connect() as conn:
        assert lesson_count(conn, job_id) == 1
    assert {s.status for s in _sections(db, job_id)} == {"done"}

"""archive_lessons end to end: real function processes and the operator CLI, on a private database.

The archive job archives across every user of its database, so this module never shares one with
other tests (whose free-tier users could lose lessons mid-test).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from tests.support import (
    ROOT,
    TASK_SECRET,
    FunctionServer,
    Stack,
    base_env,
    free_port,
    lesson_body,
    migrated_database,
)

FUNCTIONS = ("process_job", "create_job", "get_job", "get_lesson", "list_lessons", "archive_lessons")


@pytest.fixture(scope="module")
def private_url(pg_admin_url: str) -> Iterator[str]:
    with migrated_database(pg_admin_url) as url:
        yield url


@pytest.fixture(scope="module")
def pdb(private_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sa.engine.make_url(private_url).set(drivername="postgresql+pg8000"))
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def astack(private_url: str, logs_dir: Path) -> Iterator[Stack]:
    env = base_env(private_url)
    port = free_port()
    env["DYLEN_PROCESS_JOB_URL"] = f"http://127.0.0.1:{port}/"
    process = FunctionServer("process_job", env, logs_dir, port=port).start(wait=False)
    servers = {"process_job": process}
    for name in FUNCTIONS[1:]:
        servers[name] = FunctionServer(name, env, logs_dir).start(wait=False)
    for server in servers.values():
        server.wait_ready()
    stack = Stack(servers)
    yield stack
    stack.stop()


def trigger(stack: Stack, **headers: str) -> requests.Response:
    return stack.http.post(stack.url("archive_lessons") + "/", headers=headers, timeout=30)


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**base_env(url), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True
    )


def make_lessons(stack: Stack, user: str, count: int) -> list[str]:
    """Lessons through create_job and local dispatch, one after another (oldest first)."""
    ids = []
    for i in range(count):
        job = stack.create(user, lesson_body(f"Topic {i}")).json()
        ids.append(stack.wait_for(user, job["job_id"])["result"]["lesson_id"])
    return ids


def wait_job_done(db: sa.Engine, job_id: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.connect() as conn:
            row = conn.execute(sa.text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one()
        if row["status"] in ("done", "error"):
            return row
        time.sleep(0.05)
    raise AssertionError(f"archive job {job_id} still {row['status']} after {timeout}s")


def test_daily_archive_job_archives_beyond_the_limit_and_archived_lessons_are_gone(
    astack: Stack, pdb: sa.Engine, private_url: str, user: str
) -> None:
    # Given a free user with 5 lessons and a pro user with 5, made through create_job
    pro_user = user + "-pro"
    free_ids = make_lessons(astack, user, 5)
    pro_ids = make_lessons(astack, pro_user, 5)
    assert cli(private_url, "users", "set-tier", pro_user, "pro").returncode == 0
    # And model calls on the ledger, one older than the retention (30 days by default)
    with pdb.begin() as conn:
        for age in ("31 days", "29 days"):
            conn.execute(
                sa.text(
                    "INSERT INTO model_calls (model, purpose, started_at, lease_expires_at) "
                    "VALUES ('m', 'plan', now() - CAST(:age AS interval), now())"
                ),
                {"age": age},
            )

    # When Cloud Scheduler triggers archive_lessons (twice, as it may)
    first = trigger(astack, **{"X-Dylen-Task-Secret": TASK_SECRET})
    again = trigger(astack, **{"X-Dylen-Task-Secret": TASK_SECRET})

    # Then one maintenance job exists for today, owned by no user, and it completes
    assert first.status_code == 202, first.text
    assert again.status_code == 200 and again.json()["job_id"] == first.json()["job_id"]
    assert first.json()["job_kind"] == "maintenance.archive_lessons"
    job = wait_job_done(pdb, first.json()["job_id"])
    assert job["status"] == "done", job["error_json"]
    assert job["user_id"] is None and job["idempotency_key"].startswith("archive-20")
    assert job["result_json"]["lessons_archived"] == 2
    assert job["result_json"]["users_over_limit"] == 1
    assert job["result_json"]["batches"] == 1 and "seconds" in job["result_json"]
    # And the same daily job pruned the ledger beyond its retention
    assert job["result_json"]["model_calls_pruned"] == 1
    with pdb.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM model_calls")).scalar_one() == 1

    # And the free user's two oldest lessons are 410, the newest three 200 and listed, newest first
    for lesson_id in free_ids[:2]:
        gone = astack.get_lesson(user, lesson_id)
        assert gone.status_code == 410 and gone.json()["type"].endswith("/lesson-archived")
        assert gone.headers["Content-Type"].startswith("application/problem+json")
        assert "Topic" not in gone.text
    for lesson_id in free_ids[2:]:
        assert astack.get_lesson(user, lesson_id).status_code == 200
    listed = [e["lesson_id"] for e in astack.list_lessons(user).json()["lessons"]]
    assert listed == list(reversed(free_ids[2:]))
    # Another user still gets 404 for an archived lesson (no hint it exists)
    assert astack.get_lesson(pro_user, free_ids[0]).status_code == 404
    # And the pro user, under their limit, is untouched
    assert [e["lesson_id"] for e in astack.list_lessons(pro_user).json()["lessons"]] == list(
        reversed(pro_ids)
    )


def test_trigger_needs_task_credentials(astack: Stack) -> None:
    assert trigger(astack).status_code == 401
    assert trigger(astack, **{"X-Dylen-Task-Secret": "wrong"}).status_code == 403
    assert trigger(astack, **{"X-Dylen-User": "someone"}).status_code == 401
    assert astack.http.get(astack.url("archive_lessons") + "/", timeout=30).status_code == 405


def test_users_cannot_create_maintenance_jobs(astack: Stack, user: str) -> None:
    body = {"job_kind": "maintenance.archive_lessons", "idempotency_key": "k", "payload": {}}
    response = astack.create(user, body)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "job_kind"


def test_cli_set_tier_validates_tier_and_user(astack: Stack, private_url: str, user: str) -> None:
    make_lessons(astack, user, 1)
    ok = cli(private_url, "users", "set-tier", user, "plus")
    assert ok.returncode == 0, ok.stderr
    bad_tier = cli(private_url, "users", "set-tier", user, "gold")
    assert bad_tier.returncode != 0 and "unknown tier 'gold'" in bad_tier.stderr.lower()
    no_user = cli(private_url, "users", "set-tier", user + "-nobody", "pro")
    assert no_user.returncode != 0 and "no user" in no_user.stderr.lower()
    # a tier the configured map defines is accepted
    env_gold = subprocess.run(
        [sys.executable, "-m", "common.cli", "users", "set-tier", user, "gold"],
        env={**base_env(private_url), "PYTHONPATH": str(ROOT), "DYLEN_TIER_HISTORY_LIMITS": "free=3,gold=9"},
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert env_gold.returncode == 0, env_gold.stderr
    with sa.create_engine(sa.engine.make_url(private_url).set(drivername="postgresql+pg8000")).connect() as c:
        assert c.execute(sa.text("SELECT tier FROM users WHERE id = :u"), {"u": user}).scalar_one() == "gold"


def test_cli_archive_dry_run_prints_per_tier_and_changes_nothing(
    astack: Stack, pdb: sa.Engine, private_url: str, user: str
) -> None:
    make_lessons(astack, user, 5)
    with pdb.begin() as conn:
        conn.execute(sa.text("UPDATE users SET tier = 'legacy' WHERE id = :u"), {"u": user})
        before = conn.execute(sa.text("SELECT count(*) FROM lessons WHERE archived_at IS NULL")).scalar_one()
    dry = cli(private_url, "archive", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    legacy = next(line for line in dry.stdout.splitlines() if line.startswith("legacy"))
    assert legacy.split()[:4] == ["legacy", "3", "1", "2"] and "free's limit" in legacy
    with pdb.connect() as conn:
        after = conn.execute(sa.text("SELECT count(*) FROM lessons WHERE archived_at IS NULL")).scalar_one()
    assert after == before
    run = cli(private_url, "archive")
    assert run.returncode == 0 and "archived 2 lessons of 1 users" in run.stdout, run.stdout + run.stderr


def test_migrate_still_works(private_url: str) -> None:
    result = cli(private_url, "migrate")
    assert result.returncode == 0 and "migrated to head" in result.stdout

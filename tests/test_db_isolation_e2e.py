"""Isolation through real function processes: hostile list_lessons cursors, interleaved with two users'
normal reads on one instance whose pool holds a single connection (so every request shares it).

No user ever receives a lesson, job or id that is not theirs, and no normal request is a 5xx.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.factories import make_lesson, make_user
from tests.support import FunctionServer, base_env, session

ROUNDS = 200


def cursor_of(value: Any) -> str:
    raw = value if isinstance(value, str) else json.dumps(value)
    return base64.urlsafe_b64encode(raw.encode("utf-8", "surrogatepass")).decode().rstrip("=")


LESSON = "12345678-1234-5678-1234-567812345678"
HOSTILE_CURSORS = [
    cursor_of(["0001-01-01T00:00:00+14:00", LESSON]),  # before year 1 in UTC
    cursor_of(["9999-12-31T23:59:59-14:00", LESSON]),  # after year 9999 in UTC
    cursor_of(["2024-01-01T00:00:00+00:00", 5]),
    cursor_of(["2024-01-01T00:00:00+00:00", {}]),
    cursor_of(["2024-01-01T00:00:00+00:00", 1.5]),
    cursor_of("[" * 2400),
    cursor_of('["2024-01-01T00:00:00+00:00", "\\ud800"]'),
    cursor_of('["2024-01-01T00:00:00\\u0000+00:00", "' + LESSON + '"]'),
]


@pytest.fixture(scope="module")
def one_connection_list_lessons(database_url: str, logs_dir: Path) -> Iterator[FunctionServer]:
    env = base_env(database_url, DYLEN_DB_POOL_SIZE="1", DYLEN_DB_MAX_OVERFLOW="0")
    server = FunctionServer("list_lessons", env, logs_dir).start()
    yield server
    server.stop()


def test_hostile_cursors_never_make_one_user_read_anothers_lessons(
    one_connection_list_lessons: FunctionServer, db: sa.Engine, user: str
) -> None:
    # Given Alice with four lessons and Bob with two, on one instance with one pooled connection
    owned: dict[str, set[str]] = {}
    with db.begin() as conn:
        for name, count in (("alice", 4), ("bob", 2)):
            uid = make_user(conn, f"{user}-{name}")
            owned[uid] = {make_lesson(conn, user_id=uid, topic=f"{name} {i}") for i in range(count)}
    url = one_connection_list_lessons.url
    wrong: list[str] = []
    failures: list[str] = []
    hostile_answers: list[tuple[int, str]] = []
    lock = threading.Lock()

    def reader(uid: str) -> None:
        http = session()
        for _ in range(ROUNDS):
            response = http.get(f"{url}/?limit=5", headers={"X-Dylen-User": uid}, timeout=30)
            with lock:
                if response.status_code != 200:
                    failures.append(f"{uid}: {response.status_code} {response.text[:200]}")
                    continue
                page = response.json()["lessons"]
                ids = {lesson["lesson_id"] for lesson in page}
                if ids != owned[uid]:
                    wrong.append(f"{uid} got {sorted(ids)}, owns {sorted(owned[uid])}")

    def attacker() -> None:
        http = session()
        for round_ in range(ROUNDS):
            cursor = HOSTILE_CURSORS[round_ % len(HOSTILE_CURSORS)]
            response = http.get(
                f"{url}/?cursor={cursor}", headers={"X-Dylen-User": f"{user}-mallory"}, timeout=30
            )
            with lock:
                hostile_answers.append((response.status_code, response.headers.get("Content-Type", "")))

    # When mallory's crafted cursors interleave with their reads, concurrently
    threads = [threading.Thread(target=attacker) for _ in range(2)]
    threads += [threading.Thread(target=reader, args=(uid,)) for uid in owned]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    # Then each user only ever saw their own lessons, and no normal read failed
    assert not any(thread.is_alive() for thread in threads)
    assert wrong == []
    assert failures == []
    # And every crafted cursor was refused as invalid input, never a server error
    assert len(hostile_answers) == 2 * ROUNDS
    assert {status for status, _ in hostile_answers} == {422}, sorted(set(hostile_answers))
    assert all(kind.startswith("application/problem+json") for _, kind in hostile_answers)

"""get_lesson and list_lessons: ownership, archived lessons, keyset pagination."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from common.platform.cursor import decode_cursor, encode_cursor
from tests.factories import make_lesson, make_user
from tests.support import Stack


def test_archived_lesson_is_410_to_its_owner_and_404_to_others(
    stack: Stack, db: sa.Engine, user: str
) -> None:
    with db.begin() as conn:
        make_user(conn, user)
        lesson_id = make_lesson(conn, user_id=user, archived_at=datetime.now(UTC), topic="Old news")
    response = stack.get_lesson(user, lesson_id)
    assert response.status_code == 410
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["type"].endswith("/lesson-archived")
    assert "Old news" not in response.text
    assert stack.get_lesson(user + "-x", lesson_id).status_code == 404
    assert stack.list_lessons(user).json()["lessons"] == []


def test_list_pages_newest_first_with_an_opaque_cursor(stack: Stack, db: sa.Engine, user: str) -> None:
    # Given 7 lessons, two sharing a timestamp, and one archived
    base = datetime(2026, 1, 1, tzinfo=UTC)
    with db.begin() as conn:
        make_user(conn, user)
        ids = [make_lesson(conn, user_id=user, created_at=base + timedelta(minutes=i)) for i in range(6)]
        ids.append(make_lesson(conn, user_id=user, created_at=base + timedelta(minutes=5)))
        make_lesson(conn, user_id=user, created_at=base + timedelta(minutes=9), archived_at=base)
    expected = [
        lid
        for _, lid in sorted(
            ((base + timedelta(minutes=(i if i < 6 else 5)), lid) for i, lid in enumerate(ids)),
            key=lambda pair: (pair[0], pair[1]),
            reverse=True,
        )
    ]
    # When paging three at a time
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = stack.list_lessons(user, **params).json()
        seen += [entry["lesson_id"] for entry in page["lessons"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    # Then every visible lesson appears once, newest first, and the archived one never
    assert seen == expected
    assert pages == 3


def test_default_limit_is_20(stack: Stack, db: sa.Engine, user: str) -> None:
    with db.begin() as conn:
        make_user(conn, user)
        for _ in range(21):
            make_lesson(conn, user_id=user)
    page = stack.list_lessons(user).json()
    assert len(page["lessons"]) == 20
    assert page["next_cursor"]


@pytest.mark.parametrize("limit", ["0", "101", "-1", "abc", "1.5"])
def test_bad_limit_is_422(stack: Stack, user: str, limit: str) -> None:
    response = stack.list_lessons(user, limit=limit)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "limit"


@pytest.mark.parametrize("cursor", ["garbage", "eyJ4IjoxfQ", "W10", "%%%", "a" * 500])
def test_bad_cursor_is_422(stack: Stack, user: str, cursor: str) -> None:
    response = stack.list_lessons(user, cursor=cursor)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "cursor"


def test_cursor_round_trips() -> None:
    import uuid

    moment = datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=UTC)
    lesson_id = uuid.uuid4()
    assert decode_cursor(encode_cursor(moment, lesson_id)) == (moment, lesson_id)

"""get_lesson and list_lessons: a user's own lessons; archived ones are gone (410) and unlisted."""

from __future__ import annotations

from typing import Any

from common.accounts import users
from common.accounts.tiers import usage_view
from common.lessons import queries
from common.lessons.kind import LessonKind
from common.platform.cursor import decode_cursor, encode_cursor
from common.platform.db import connection
from common.platform.errors import Gone, NotFound, ValidationFailed
from common.platform.validation import parse_id

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


class LessonArchived(Gone):
    """The owner's lesson was archived (its tier keeps fewer); its content is never returned."""

    type_slug = "lesson-archived"
    title = "Lesson archived"


def get_lesson(user_id: str, raw_id: str) -> dict[str, Any]:
    lesson_id = parse_id(raw_id, what="lesson", caller="user")
    with connection() as conn:
        row = queries.get_lesson(conn, lesson_id)
    if row is None or row.user_id != user_id:
        raise NotFound("No such lesson.")
    if row.archived_at is not None:
        # Only the owner learns it existed; the content is never returned.
        raise LessonArchived(f"This lesson was archived on {row.archived_at.date().isoformat()}.")
    return {
        "lesson_id": str(row.id),
        "job_id": str(row.job_id) if row.job_id else None,  # None: its job was pruned
        "topic": row.topic,
        "title": row.title,
        "created_at": row.created_at.isoformat(),
        "content": row.content,
    }


def parse_limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise ValidationFailed(
            "Invalid limit.",
            errors=[{"field": "limit", "message": f"must be an integer from 1 to {MAX_LIMIT}"}],
        )
    return limit


def list_lessons(user_id: str, *, limit: int, cursor: str | None) -> dict[str, Any]:
    after = decode_cursor(cursor) if cursor else None
    with connection() as conn:
        rows = queries.list_visible_lessons(conn, user_id=user_id, limit=limit + 1, after=after)
        usage = users.usage(conn, user_id=user_id, job_kind=LessonKind.kind)
    page, more = rows[:limit], len(rows) > limit
    return {
        "usage": usage_view(usage),
        "lessons": [
            {
                "lesson_id": str(r.id),
                "job_id": str(r.job_id) if r.job_id else None,
                "topic": r.topic,
                "title": r.title,
                "created_at": r.created_at.isoformat(),
            }
            for r in page
        ],
        "next_cursor": encode_cursor(page[-1].created_at, page[-1].id) if more else None,
    }

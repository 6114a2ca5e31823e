"""get_lesson and list_lessons: a user's own lessons; archived ones are gone (410) and unlisted."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Any

from common.lessons import queries
from common.platform.db import connection
from common.platform.errors import Gone, NotFound, ValidationFailed
from common.platform.validation import parse_uuid

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


def _parse_lesson_id(raw: str) -> uuid.UUID:
    lesson_id = parse_uuid(raw)
    if lesson_id is None:
        raise NotFound("No such lesson.")
    return lesson_id


def get_lesson(user_id: str, raw_id: str) -> dict[str, Any]:
    lesson_id = _parse_lesson_id(raw_id)
    with connection() as conn:
        row = queries.get_lesson(conn, lesson_id)
    if row is None or row.user_id != user_id:
        raise NotFound("No such lesson.")
    if row.archived_at is not None:
        # Only the owner learns it existed; the content is never returned.
        raise Gone(f"This lesson was archived on {row.archived_at.date().isoformat()}.")
    return {
        "lesson_id": str(row.id),
        "job_id": str(row.job_id),
        "topic": row.topic,
        "title": row.title,
        "created_at": row.created_at.isoformat(),
        "content": row.content,
    }


def encode_cursor(created_at: datetime, lesson_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(lesson_id)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, lesson_id = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        parsed = datetime.fromisoformat(created)
        if parsed.tzinfo is None:
            raise ValueError("naive timestamp")
        return parsed, uuid.UUID(lesson_id)
    except (ValueError, TypeError, UnicodeError, binascii.Error, json.JSONDecodeError):
        raise ValidationFailed(
            "Invalid cursor.", errors=[{"field": "cursor", "message": "is not a cursor from this API"}]
        ) from None


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
    page, more = rows[:limit], len(rows) > limit
    return {
        "lessons": [
            {
                "lesson_id": str(r.id),
                "job_id": str(r.job_id),
                "topic": r.topic,
                "title": r.title,
                "created_at": r.created_at.isoformat(),
            }
            for r in page
        ],
        "next_cursor": encode_cursor(page[-1].created_at, page[-1].id) if more else None,
    }

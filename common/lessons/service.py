"""get_lesson and list_lessons: a user's own lessons; archived ones are gone (410) and unlisted."""

from __future__ import annotations

import base64
import binascii
import json
import string
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from common.jobs import queries as job_queries
from common.jobs.service import usage_view
from common.lessons import queries
from common.lessons.kind import LessonKind
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


# A real cursor is ~100 characters (an ISO timestamp with microseconds and offset, and a UUID).
MAX_CURSOR_LENGTH = 200
_CURSOR_ALPHABET = frozenset(string.ascii_letters + string.digits + "-_=")
# What PostgreSQL's timestamptz and Python's datetime can both hold, a day inside Python's range
# so no conversion on the way (UTC, a session time zone) can overflow.
_EARLIEST = datetime.min.replace(tzinfo=UTC) + timedelta(days=1)
_LATEST = datetime.max.replace(tzinfo=UTC) - timedelta(days=1)


def _bad_cursor() -> ValidationFailed:
    return ValidationFailed(
        "Invalid cursor.", errors=[{"field": "cursor", "message": "is not a cursor from this API"}]
    )


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """Strictly `base64url(json([ISO timestamptz, UUID string]))`, else 422. The length is checked
    before anything is decoded, so no cursor can nest deeply or cost much to parse."""
    if len(cursor) > MAX_CURSOR_LENGTH or not _CURSOR_ALPHABET.issuperset(cursor):
        raise _bad_cursor()
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        decoded = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        if not (isinstance(decoded, list) and len(decoded) == 2):
            raise ValueError("not a pair")
        created, lesson_id = decoded
        if not (isinstance(created, str) and isinstance(lesson_id, str)):
            raise ValueError("not two strings")
        parsed = datetime.fromisoformat(created)
        if parsed.tzinfo is None:
            raise ValueError("naive timestamp")
        in_utc = parsed.astimezone(UTC)  # OverflowError past year 1 / 9999
        if not _EARLIEST <= in_utc <= _LATEST:
            raise ValueError("out of range")
        keyset = in_utc, uuid.UUID(lesson_id)
        # Only the canonical form encode_cursor writes: fromisoformat also takes odd spellings
        # (a NUL where the separator goes, say) that no cursor of ours contains.
        if created != parsed.isoformat() or lesson_id != str(keyset[1]):
            raise ValueError("not a cursor of ours")
        return keyset
    except (ValueError, TypeError, OverflowError, RecursionError, UnicodeError, binascii.Error):
        raise _bad_cursor() from None


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
        usage = job_queries.job_usage(conn, user_id=user_id, job_kind=LessonKind.kind)
    page, more = rows[:limit], len(rows) > limit
    return {
        "usage": usage_view(usage),
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

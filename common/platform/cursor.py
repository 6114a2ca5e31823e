"""Keyset cursors: the opaque `cursor` of a page that is ordered by (created_at, id), newest first
(list_lessons, the dashboard's lists). Strict: only the form encode_cursor writes decodes."""

from __future__ import annotations

import base64
import binascii
import json
import string
import uuid
from datetime import UTC, datetime, timedelta

from common.platform.errors import ValidationFailed


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

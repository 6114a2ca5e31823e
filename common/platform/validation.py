"""Field validation that reports every problem at once, as problem+json `errors` entries."""

from __future__ import annotations

import uuid
from typing import Any

from common.platform.errors import ValidationFailed


class FieldErrors:
    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, field: str, message: str) -> None:
        self.items.append({"field": field, "message": message})

    def raise_if_any(self, detail: str = "Some fields are invalid.") -> None:
        if self.items:
            raise ValidationFailed(detail, errors=self.items)


def check_text(
    errors: FieldErrors,
    data: dict[str, Any],
    field: str,
    *,
    prefix: str = "",
    required: bool = False,
    min_len: int = 0,
    max_len: int,
    default: str | None = None,
) -> str | None:
    name = prefix + field
    if field not in data or data[field] is None:
        if required:
            errors.add(name, "is required")
        return default
    value = data[field]
    if not isinstance(value, str):
        errors.add(name, "must be a string")
        return default
    if "\x00" in value:
        errors.add(name, "must not contain NUL characters")
        return default
    stripped = value.strip()
    if len(stripped) < min_len:
        errors.add(name, f"must be at least {min_len} non-blank character(s)")
        return default
    if len(value) > max_len:
        errors.add(name, f"must be at most {max_len} characters")
        return default
    return stripped


def reject_unknown(errors: FieldErrors, data: dict[str, Any], allowed: set[str], prefix: str = "") -> None:
    for key in sorted(set(data) - allowed):
        errors.add(prefix + key, "unknown field")


def parse_uuid(raw: object) -> uuid.UUID | None:
    """An id from its canonical text, or None: callers answer a malformed id like an unknown one
    (404) or name it (operators), never with a 500."""
    if not isinstance(raw, str):
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None

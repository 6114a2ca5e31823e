"""Field validation that reports every problem at once, as problem+json `errors` entries.

`check_json_text` is the one pass every parsed body goes through at the edge (common.platform.http.read_json):
PostgreSQL's text and jsonb refuse NUL and anything that is not UTF-8 (a lone surrogate, which
JSON's \\ud800 escapes can produce), and jsonb refuses Infinity, so such input is a 422 naming the
field here instead of an error deep in the driver.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Literal

from common.platform.errors import NotFound, ValidationFailed

MAX_REPORTED = 20  # a body full of bad strings gets a bounded error list


def escape_text(text: str) -> str:
    """`text` with what UTF-8 cannot encode (lone surrogates) written as `\\udXXX`: safe to echo."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as PostgreSQL text, or None."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (no lone surrogates)"
    return None


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check_json_text(value: Any) -> None:
    """ValidationFailed naming every string (value or field name) PostgreSQL would refuse, and every
    non-finite number. Iterative: a deeply nested body cannot exhaust the stack."""
    errors = FieldErrors()
    pending: list[tuple[str, Any]] = [("", value)]
    while pending and len(errors.items) < MAX_REPORTED:
        path, item = pending.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                errors.add(path, problem)
        elif isinstance(item, float):
            if not math.isfinite(item):
                errors.add(path, "must be a finite number")
        elif isinstance(item, dict):
            for key, child in item.items():
                problem = text_problem(key)
                if problem:
                    errors.add(_child(path, key), "field name " + problem)
                else:
                    pending.append((_child(path, key), child))
        elif isinstance(item, list):
            pending.extend((f"{path}[{index}]", child) for index, child in enumerate(item))
    errors.raise_if_any("Some fields hold text or numbers that cannot be stored.")


class FieldErrors:
    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, field: str, message: str) -> None:
        # Field names come from the request: escaped, so the problem body can always be encoded.
        self.items.append({"field": escape_text(field), "message": message})

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


def parse_id(raw: object, *, what: str, caller: Literal["user", "operator"]) -> uuid.UUID:
    """The one parser of the ids in paths, forms and commands, with one answer per kind of caller:
    a user gets 404, exactly as for an id that exists but is not theirs (no hint of what exists);
    an operator is told what was wrong (422). A task's id is `parse_uuid`'s: None, an unknown job."""
    parsed = parse_uuid(raw)
    if parsed is not None:
        return parsed
    if caller == "user":
        raise NotFound(f"No such {what}.")
    raise ValidationFailed(f"Malformed {what} id {raw!r}: expected a UUID.")


def parse_uuid(raw: object) -> uuid.UUID | None:
    """An id from its canonical text, or None (never a 500)."""
    if not isinstance(raw, str):
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None

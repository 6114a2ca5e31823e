"""Job kinds: how each validates its payload and what it does when process_job runs it.

A handler's `run` does the slow work without holding a database transaction and returns a
Completion; the processor then applies `write` and the `done` transition in one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from common.db import Connection
from common.errors import ValidationFailed
from common.store import Job


@dataclass(frozen=True)
class Completion:
    """What a successful run leaves behind.

    `write` adds statements to the finishing transaction. `finish` instead is ONE statement that
    stores the outputs and makes the guarded `done` transition itself (see
    store.complete_job_with_lesson) and returns whether this attempt still held the claim; being
    a single statement it needs no BEGIN/COMMIT, which matters on the hot path.
    """

    result: dict[str, Any]
    write: Callable[[Connection], None] | None = None
    finish: Callable[[Connection, uuid.UUID, int], bool] | None = None


class Handler(Protocol):
    kind: str
    user_creatable: bool

    def validate(self, payload: Any) -> dict[str, Any]:
        """Normalised payload, or ValidationFailed listing every bad field."""

    def run(self, job: Job) -> Completion:
        """Do the work. PermanentJobError ends the job; any other exception is retried."""


def _registry() -> dict[str, Handler]:
    from common.handlers.archive import ArchiveLessonsHandler
    from common.handlers.lesson import LessonHandler

    handlers: list[Handler] = [LessonHandler(), ArchiveLessonsHandler()]
    return {h.kind: h for h in handlers}


_handlers: dict[str, Handler] | None = None


def get_handler(kind: str) -> Handler | None:
    global _handlers
    if _handlers is None:
        _handlers = _registry()
    return _handlers.get(kind)


def user_handler(kind: Any) -> Handler:
    """The handler for a kind users may create, or a 422 naming the allowed kinds."""
    handler = get_handler(kind) if isinstance(kind, str) else None
    if handler is None or not handler.user_creatable:
        allowed = sorted(k for k, h in (_handlers or {}).items() if h.user_creatable)
        raise ValidationFailed(
            "Unknown job kind.",
            errors=[{"field": "job_kind", "message": f"must be one of: {', '.join(allowed)}"}],
        )
    return handler


def known_kinds() -> list[str]:
    get_handler("")  # builds the registry on first use
    return sorted(_handlers or {})

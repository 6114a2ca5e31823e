"""The registry of job kinds: the one place that names them. Each entry is an import path (as
procrastinate's `import_paths` are), loaded on first use, so the job system never imports the
products that plug kinds into it.

A kind's `run` does the slow work without holding a database transaction and returns a Completion;
the processor then makes the guarded `done` transition, or the kind's `finish`, which calls a
transition of common.jobs.transitions with the kind's declared `Output`, so the output is stored in
the same statement. A kind may fan out: its finish plans child jobs (sections, `parent_id` set),
which the processor dispatches after the commit. The job system asks a kind what only the product
knows: the limits its creates are held to (`admission`), and why a job may not be retried.
"""

from __future__ import annotations

import importlib
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from common.jobs.model import Job, JobStatus
from common.jobs.transitions import Limits, Refused
from common.platform.db import Connection
from common.platform.errors import DylenError, ValidationFailed

KINDS: dict[str, str] = {
    "lesson": "common.lessons.kind:LessonKind",
    "lesson.section": "common.lessons.kind:SectionKind",  # internal: one section of a lesson
    "maintenance.archive_lessons": "common.lessons.archive.kind:ArchiveLessonsKind",
}


@dataclass(frozen=True)
class Completion:
    """What a successful run leaves behind.

    `finish`, when given, stores the outputs and makes the guarded transition itself, ideally in
    ONE statement (transitions.complete with the kind's Output), which needs no BEGIN/COMMIT; it
    opens a transaction itself when it needs several. It returns None when this attempt no longer
    held the claim, else the jobs it created (dispatched after the commit; usually none). `status`
    is what it leaves the job as: `running` for a parent now waiting on its sections.
    """

    result: dict[str, Any]
    finish: Callable[[Connection, uuid.UUID, int], list[Job] | None] | None = None
    status: JobStatus = JobStatus.DONE


class Admission(Protocol):
    """The limits a kind's creates are held to, exactly, in the create statement (tiers give one)."""

    def limits(self) -> Limits: ...

    def refusal(self, refused: Refused) -> DylenError:
        """The error (a 429) a refused create answers."""


class Kind(Protocol):
    kind: str
    user_creatable: bool
    admission: Admission | None  # None: a user's creates of this kind are not limited

    def validate(self, payload: Any) -> dict[str, Any]:
        """Normalised payload, or ValidationFailed listing every bad field."""

    def run(self, job: Job) -> Completion:
        """Do the work. PermanentJobError ends the job; any other exception is retried."""


_loaded: dict[str, Kind] | None = None
_lock = threading.Lock()


def _load() -> dict[str, Kind]:
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                kinds: dict[str, Kind] = {}
                for name, path in KINDS.items():
                    module, _, attr = path.partition(":")
                    kinds[name] = getattr(importlib.import_module(module), attr)()
                _loaded = kinds
    return _loaded


def get_kind(name: str) -> Kind | None:
    return _load().get(name)


def user_kind(name: Any) -> Kind:
    """The kind for a name users may create, or a 422 naming the allowed kinds."""
    kind = get_kind(name) if isinstance(name, str) else None
    if kind is None or not kind.user_creatable:
        allowed = sorted(k for k, v in _load().items() if v.user_creatable)
        raise ValidationFailed(
            "Unknown job kind.",
            errors=[{"field": "job_kind", "message": f"must be one of: {', '.join(allowed)}"}],
        )
    return kind


def known_kinds() -> list[str]:
    return sorted(KINDS)


def section_kinds() -> dict[str, str]:
    """Kinds whose jobs are sections of another job (a kind's optional `parent_kind`) -> that
    parent kind. Internal: counts of what users asked for leave them out, rolled up under their
    parent; an operator sees them by filtering on their kind or opening the parent."""
    return {name: parent for name, kind in _load().items() if (parent := getattr(kind, "parent_kind", None))}


def load() -> None:
    """Import every kind now (a function's cold start): their products' settings are checked at
    start-up, and the first request does not pay the imports."""
    _load()


def retry_refusals(conn: Connection, jobs: Sequence[Job]) -> dict[uuid.UUID, str]:
    """Why some of these jobs may not be retried, as their kinds say (`retry_refusals(conn, ids)`,
    optional on a kind: "already has a lesson", say); job id -> reason."""
    by_kind: dict[str, list[uuid.UUID]] = {}
    for job in jobs:
        by_kind.setdefault(job.job_kind, []).append(job.id)
    refusals: dict[uuid.UUID, str] = {}
    for name, ids in by_kind.items():
        check = getattr(get_kind(name), "retry_refusals", None)
        if check is not None:
            refusals.update(check(conn, ids))
    return refusals

"""The `lesson` job kind (validate the request, generate a lesson, store it with its job) and the
internal `lesson.section` kind: one section of a planned lesson, a job of its own.

A one-step generator writes the lesson inside the lesson job. A planner's `plan` runs in the lesson
job, whose finish stores the plan and inserts one section job per brief (transitions.plan); each
section job writes its section, and the one that finishes last fans in: the lesson job's `done` and
the lesson (queries.PLANNED_LESSON) in one statement, in the section's transaction.
"""

from __future__ import annotations

import uuid
from typing import Any, cast

from common.accounts.tiers import TIER_ADMISSION
from common.jobs import queries as job_queries
from common.jobs import transitions
from common.jobs.kinds import Completion
from common.jobs.model import Job, JobStatus
from common.jobs.settings import job_settings
from common.lessons import gemini, template
from common.lessons.generation import (
    DEPTHS,
    Generator,
    LessonRequest,
    Planner,
    check_generated,
    check_plan,
    check_section,
    load_generator,
    plans,
)
from common.lessons.queries import ONE_STEP_LESSON, PLANNED_LESSON, jobs_with_lessons
from common.lessons.settings import GEMINI, lesson_settings
from common.platform import telemetry
from common.platform.db import Connection, connection, jsonb
from common.platform.errors import PermanentJobError, ValidationFailed
from common.platform.log import instance_id
from common.platform.validation import FieldErrors, check_text, reject_unknown

LANGUAGE_MAX = 35  # BCP 47 tags are short; this bounds them without a registry lookup


def validate_lesson_payload(payload: Any) -> dict[str, Any]:
    errors = FieldErrors()
    if not isinstance(payload, dict):
        raise ValidationFailed(
            "payload must be an object.", errors=[{"field": "payload", "message": "must be an object"}]
        )
    reject_unknown(errors, payload, {"topic", "details", "depth", "language"}, prefix="payload.")
    topic = check_text(errors, payload, "topic", prefix="payload.", required=True, min_len=1, max_len=200)
    details = check_text(errors, payload, "details", prefix="payload.", max_len=300)
    depth = check_text(errors, payload, "depth", prefix="payload.", max_len=20, default="highlights")
    if depth is not None and depth not in DEPTHS:
        errors.add("payload.depth", f"must be one of: {', '.join(DEPTHS)}")
    language = check_text(
        errors, payload, "language", prefix="payload.", min_len=1, max_len=LANGUAGE_MAX, default="en"
    )
    if language is not None and not all(c.isalnum() or c == "-" for c in language):
        errors.add("payload.language", "must be a language tag such as en or pt-BR")
    errors.raise_if_any()
    return {"topic": topic, "details": details or None, "depth": depth, "language": language}


SECTION_KIND = "lesson.section"

_generator: Generator | Planner | None = None
BUILT_IN: dict[str | None, Any] = {None: template, GEMINI: gemini}  # modules that are planners


def get_generator() -> Generator | Planner:
    global _generator
    if _generator is None:
        spec = lesson_settings().generator
        _generator = BUILT_IN[spec] if spec in BUILT_IN else load_generator(spec or "")
    return _generator


def _generator_span(name: str, request: LessonRequest, section: int | None = None) -> telemetry.Scope:
    """Every generator call is a span (a model call inside it is a span of its own, under it)."""
    if not telemetry.enabled():
        return telemetry.NOTHING
    attributes: dict[str, Any] = {
        "dylen.generator": lesson_settings().generator or "template",
        "dylen.job.id": request.job_id,
    }
    if section is not None:
        attributes["dylen.section.index"] = section
    return telemetry.span(name, attributes)


def _stored_payload(request_json: Any) -> dict[str, Any]:
    try:
        return validate_lesson_payload((request_json or {}).get("payload"))
    except ValidationFailed as invalid:
        raise PermanentJobError(
            "invalid_payload", f"Stored payload is invalid: {invalid.errors}"
        ) from invalid


def _request(
    payload: dict[str, Any],
    *,
    job_id: uuid.UUID,
    user_id: str,
    attempt: int,
    section_index: int | None = None,
) -> LessonRequest:
    return LessonRequest(
        topic=payload["topic"],
        details=payload["details"],
        depth=payload["depth"],
        language=payload["language"],
        job_id=str(job_id),
        user_id=user_id,
        attempt=attempt,
        section_index=section_index,
    )


class LessonKind:
    kind = "lesson"
    user_creatable = True
    admission = TIER_ADMISSION  # every lesson costs model calls: held to the tier's limits

    def validate(self, payload: Any) -> dict[str, Any]:
        return validate_lesson_payload(payload)

    def run(self, job: Job) -> Completion:
        if job.user_id is None:
            raise PermanentJobError("invalid_payload", "A lesson job needs an owner.")
        payload = _stored_payload(job.request_json)
        request = _request(payload, job_id=job.id, user_id=job.user_id, attempt=job.attempts)
        generator = get_generator()
        if plans(generator):
            return self._plan(generator, request)
        with _generator_span("lesson.generate", request):
            title, content = check_generated(cast(Generator, generator)(request))
        lesson_id = uuid.uuid4()
        result = {"lesson_id": str(lesson_id)}

        def finish(conn: Connection, job_id: uuid.UUID, attempt: int) -> list[Job] | None:
            params = {
                "lesson_id": lesson_id,
                "topic": payload["topic"],
                "title": title,
                "content": jsonb(content),
            }
            won = transitions.complete(
                conn, job_id, attempt=attempt, result=result, output=ONE_STEP_LESSON, params=params
            )
            return [] if won else None

        return Completion(result=result, finish=finish)

    def _plan(self, generator: Planner, request: LessonRequest) -> Completion:
        with _generator_span("lesson.plan", request):
            plan = check_plan(generator.plan(request))
        max_attempts = job_settings().policy(SECTION_KIND).max_attempts

        def finish(conn: Connection, job_id: uuid.UUID, attempt: int) -> list[Job] | None:
            return transitions.plan(
                conn,
                job_id,
                attempt=attempt,
                plan=plan,
                section_kind=SECTION_KIND,
                max_attempts=max_attempts,
                instance=instance_id(),
                traceparent=telemetry.traceparent(),  # a section rescued later continues this trace
            )

        return Completion(result={"sections": len(plan["sections"])}, finish=finish, status=JobStatus.RUNNING)

    def retry_refusals(self, conn: Connection, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        """A lesson job that has its lesson is finished for good (it cannot arise with error or
        canceled: the lesson commits with `done`; a last guard for operators' retries)."""
        return dict.fromkeys(jobs_with_lessons(conn, job_ids), "already has a lesson")


class SectionKind:
    """One section of a planned lesson; created by the lesson job, never by users."""

    kind = SECTION_KIND
    parent_kind = LessonKind.kind  # its jobs are sections of a lesson job (kinds.section_kinds)
    user_creatable = False
    admission = None

    def validate(self, payload: Any) -> dict[str, Any]:
        raise ValidationFailed("Sections are created by their lesson job only.")

    def run(self, job: Job) -> Completion:
        if job.parent_id is None or job.section_index is None or job.user_id is None:
            raise PermanentJobError("invalid_section", "A section needs its lesson job.")
        with connection() as conn:
            parent = job_queries.get_plan(conn, job.parent_id)
        if parent is None or parent.plan is None:
            raise PermanentJobError("invalid_section", "The lesson job of this section has no plan.")
        generator = get_generator()
        if not plans(generator):
            raise PermanentJobError("generator_changed", "The configured generator no longer plans.")
        index = job.section_index
        request = _request(
            _stored_payload(parent.request_json),
            job_id=job.parent_id,
            user_id=job.user_id,
            attempt=job.attempts,
            section_index=index,
        )
        with _generator_span("lesson.write_section", request, index):
            section = check_section(generator.write_section(request, parent.plan, index), index)

        def finish(conn: Connection, job_id: uuid.UUID, attempt: int) -> list[Job] | None:
            assert job.parent_id is not None
            with conn.transaction():
                if not transitions.finish_section(conn, job, attempt=attempt, result=section):
                    return None  # canceled, failed elsewhere, or a newer attempt: discarded
                lesson_id = uuid.uuid4()
                lesson_done = transitions.fan_in(
                    conn,
                    job.parent_id,
                    result={"lesson_id": str(lesson_id)},
                    output=PLANNED_LESSON,
                    params={"lesson_id": lesson_id},
                )
            if lesson_done:  # the planned lesson's `done` (the processor counts the section's)
                telemetry.record("dylen.jobs.finished", 1, job_kind=LessonKind.kind, status=JobStatus.DONE)
            return []

        return Completion(result={"section_index": index}, finish=finish)

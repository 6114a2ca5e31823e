"""The `lesson` job kind: validate the request, generate a lesson, store it with its job."""

from __future__ import annotations

import uuid
from typing import Any

from common.jobs.kinds import Completion
from common.jobs.model import Job
from common.lessons.generation import DEPTHS, Generator, LessonRequest, check_generated, load_generator
from common.lessons.queries import complete_job_with_lesson
from common.lessons.template import generate_lesson
from common.platform.config import get_settings
from common.platform.db import Connection
from common.platform.errors import PermanentJobError, ValidationFailed
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


_generator: Generator | None = None


def get_generator() -> Generator:
    global _generator
    if _generator is None:
        spec = get_settings().lesson_generator
        _generator = load_generator(spec) if spec else generate_lesson
    return _generator


class LessonKind:
    kind = "lesson"
    user_creatable = True
    quota_limited = True  # every lesson costs model calls

    def validate(self, payload: Any) -> dict[str, Any]:
        return validate_lesson_payload(payload)

    def run(self, job: Job) -> Completion:
        if job.user_id is None:
            raise PermanentJobError("invalid_payload", "A lesson job needs an owner.")
        try:
            payload = validate_lesson_payload(job.request_json.get("payload"))
        except ValidationFailed as invalid:
            raise PermanentJobError(
                "invalid_payload", f"Stored payload is invalid: {invalid.errors}"
            ) from invalid
        request = LessonRequest(
            topic=payload["topic"],
            details=payload["details"],
            depth=payload["depth"],
            language=payload["language"],
            job_id=str(job.id),
            user_id=job.user_id,
            attempt=job.attempts,
        )
        title, content = check_generated(get_generator()(request))
        lesson_id = uuid.uuid4()
        result = {"lesson_id": str(lesson_id)}

        def finish(conn: Connection, job_id: uuid.UUID, attempt: int) -> bool:
            return complete_job_with_lesson(
                conn,
                job_id=job_id,
                attempt=attempt,
                result=result,
                lesson_id=lesson_id,
                topic=payload["topic"],
                title=title,
                content=content,
            )

        return Completion(result=result, finish=finish)

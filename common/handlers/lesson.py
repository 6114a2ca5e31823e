"""The `lesson` job kind: validate the request, generate a lesson, store it with its job."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.config import get_settings
from common.db import Connection
from common.errors import ConfigError, PermanentJobError, ValidationFailed
from common.handlers import Completion
from common.store import Job, complete_job_with_lesson
from common.validation import FieldErrors, check_text, reject_unknown

DEPTHS = ("highlights", "detailed", "training")
SECTIONS_BY_DEPTH = {"highlights": 2, "detailed": 6, "training": 10}
LANGUAGE_MAX = 35  # BCP 47 tags are short; this bounds them without a registry lookup


@dataclass(frozen=True)
class LessonRequest:
    """What a generator receives. `attempt` lets a generator vary (or a test fail) per attempt."""

    topic: str
    details: str | None
    depth: str
    language: str
    job_id: str
    user_id: str
    attempt: int


Generator = Callable[[LessonRequest], dict[str, Any]]


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


def _load_generator(spec: str) -> Generator:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        generator = getattr(module, attr)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"DYLEN_LESSON_GENERATOR={spec!r} cannot be loaded: {error}") from error
    if not callable(generator):
        raise ConfigError(f"DYLEN_LESSON_GENERATOR={spec!r} is not callable")
    return generator


_generator: Generator | None = None


def get_generator() -> Generator:
    global _generator
    if _generator is None:
        spec = get_settings().lesson_generator
        if spec:
            _generator = _load_generator(spec)
        else:
            from common.lessongen import generate_lesson

            _generator = generate_lesson
    return _generator


def _check_generated(content: Any) -> tuple[str, dict[str, Any]]:
    # A generator that returns the wrong shape is a bug or a flaky model: retrying may help.
    if not isinstance(content, dict):
        raise TypeError(f"lesson generator returned {type(content).__name__}, expected dict")
    title = content.get("title")
    if not isinstance(title, str) or not title.strip():
        raise ValueError("lesson generator returned no title")
    if not isinstance(content.get("sections"), list):
        raise ValueError("lesson generator returned no sections list")
    return title.strip()[:300], content


class LessonHandler:
    kind = "lesson"
    user_creatable = True

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
        title, content = _check_generated(get_generator()(request))
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

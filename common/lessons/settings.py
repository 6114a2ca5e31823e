"""The lesson product's settings: which generator writes lessons, and the built-in Gemini
generator's model, credentials, endpoint and per-call timeout."""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.jobs.settings import job_settings
from common.models.settings import model_settings
from common.platform.env import Reader, Section
from common.platform.errors import ConfigError

GEMINI = "gemini"  # DYLEN_LESSON_GENERATOR's name of the built-in Gemini planner
DEFAULT_GEMINI_MODEL = "gemini-2.5-flash"
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class GeminiSettings:
    model: str
    api_key: str | None  # the Gemini Developer API; else Vertex AI with the runtime's credentials
    vertex_project: str | None
    vertex_location: str
    base_url: str | None  # a gateway or a local stand-in instead of Google's endpoint
    timeout_seconds: float  # one call's bound; the SDK retries nothing (the job system does)


@dataclass(frozen=True)
class LessonSettings:
    generator: str | None  # `module:attr`, or `gemini`; None is the built-in template generator
    gemini: GeminiSettings | None  # set when the generator is `gemini`


def _gemini(r: Reader) -> GeminiSettings:
    model = r.text("DYLEN_GEMINI_MODEL", DEFAULT_GEMINI_MODEL)
    assert model is not None
    if not _MODEL.match(model):
        raise ConfigError(
            f"DYLEN_GEMINI_MODEL must be a model name such as {DEFAULT_GEMINI_MODEL}, got {model!r}"
        )
    api_key = r.text("GEMINI_API_KEY")
    project = r.text("DYLEN_GEMINI_VERTEX_PROJECT")
    if (api_key is None) == (project is None):
        raise ConfigError(
            "DYLEN_LESSON_GENERATOR=gemini needs exactly one of GEMINI_API_KEY (the Gemini Developer "
            "API) and DYLEN_GEMINI_VERTEX_PROJECT (Vertex AI with the runtime's credentials)"
        )
    timeout = r.number("DYLEN_GEMINI_TIMEOUT_SECONDS", 120.0, minimum=1.0)
    # A step makes up to two calls (a reply, one repair), each possibly after a wait for a slot:
    # all of it must end inside the job's lease, or a second attempt would start beside it.
    lease = job_settings.load(r.env).timeout_seconds
    slot_wait = model_settings.load(r.env).slot_wait_seconds
    if 2 * (timeout + slot_wait) >= lease:
        raise ConfigError(
            f"DYLEN_GEMINI_TIMEOUT_SECONDS ({timeout:g}) must leave two calls and their slot waits "
            f"(DYLEN_MODEL_SLOT_WAIT_SECONDS, {slot_wait:g}) inside the job's lease "
            f"(DYLEN_JOB_TIMEOUT_SECONDS, {lease}): 2 x ({timeout:g} + {slot_wait:g}) >= {lease}"
        )
    return GeminiSettings(
        model=model,
        api_key=api_key,
        vertex_project=project,
        vertex_location=r.text("DYLEN_GEMINI_VERTEX_LOCATION", "us-central1") or "us-central1",
        base_url=r.url("DYLEN_GEMINI_BASE_URL"),
        timeout_seconds=timeout,
    )


def _load(r: Reader) -> LessonSettings:
    generator = r.text("DYLEN_LESSON_GENERATOR")
    if generator is not None and generator != GEMINI and ":" not in generator:
        raise ConfigError(f"DYLEN_LESSON_GENERATOR must be module:attr or gemini, got {generator!r}")
    return LessonSettings(generator=generator, gemini=_gemini(r) if generator == GEMINI else None)


lesson_settings = Section(_load)

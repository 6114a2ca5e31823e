"""The lesson product's settings: which generator writes lessons."""

from __future__ import annotations

from dataclasses import dataclass

from common.platform.env import Reader, Section
from common.platform.errors import ConfigError


@dataclass(frozen=True)
class LessonSettings:
    generator: str | None  # `module:attr`; None is the built-in template generator


def _load(r: Reader) -> LessonSettings:
    generator = r.text("DYLEN_LESSON_GENERATOR")
    if generator is not None and ":" not in generator:
        raise ConfigError(f"DYLEN_LESSON_GENERATOR must be module:attr, got {generator!r}")
    return LessonSettings(generator=generator)


lesson_settings = Section(_load)

"""The lesson generator contract: what a generator receives and returns, and how one is loaded.

`DYLEN_LESSON_GENERATOR=module:callable` names a callable `(LessonRequest) -> {"title", "sections":
[...], ...}`; without it the built-in template generator (common.lessons.template) writes lessons.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.platform.errors import ConfigError

DEPTHS = ("highlights", "detailed", "training")
SECTIONS_BY_DEPTH = {"highlights": 2, "detailed": 6, "training": 10}


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


def load_generator(spec: str) -> Generator:
    """The callable `module:attr` names (ConfigError if it cannot be loaded)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        generator = getattr(module, attr)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"DYLEN_LESSON_GENERATOR={spec!r} cannot be loaded: {error}") from error
    if not callable(generator):
        raise ConfigError(f"DYLEN_LESSON_GENERATOR={spec!r} is not callable")
    return generator


def check_generated(content: Any) -> tuple[str, dict[str, Any]]:
    """(title, content) of what a generator returned. A wrong shape is a bug or a flaky model:
    TypeError / ValueError, which the processor retries."""
    if not isinstance(content, dict):
        raise TypeError(f"lesson generator returned {type(content).__name__}, expected dict")
    title = content.get("title")
    if not isinstance(title, str) or not title.strip():
        raise ValueError("lesson generator returned no title")
    if not isinstance(content.get("sections"), list):
        raise ValueError("lesson generator returned no sections list")
    return title.strip()[:300], content

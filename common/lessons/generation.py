"""The lesson generator contract: what a generator receives and returns, and how one is loaded.

`DYLEN_LESSON_GENERATOR=module:attr` names either

- a callable `(LessonRequest) -> {"title", "sections": [...], ...}` that writes the whole lesson in
  one step, or
- an object (or module) with `plan(request) -> {"title", "summary"?, "sections": [{"heading", ...},
  ...], ...}` and `write_section(request, plan, index) -> dict`: the lesson job plans, and each
  section is then written by a job of its own, side by side. The lesson is the plan (its `sections`
  briefs replaced by the written sections, in plan order).

Without it the built-in template generator (common.lessons.template, which plans) writes lessons.
PermanentJobError from any of these means retrying cannot help; any other exception is retried. For
`write_section`, `request.attempt` is the section's own attempt.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

from common.platform.errors import ConfigError

DEPTHS = ("highlights", "detailed", "training")
SECTIONS_BY_DEPTH = {"highlights": 2, "detailed": 6, "training": 10}
MAX_SECTIONS = 50  # one job each: a plan beyond this is a runaway model, not a lesson
TITLE_MAX = 300


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


class Planner(Protocol):
    def plan(self, request: LessonRequest) -> dict[str, Any]: ...

    def write_section(self, request: LessonRequest, plan: dict[str, Any], index: int) -> dict[str, Any]: ...


def plans(generator: Any) -> TypeGuard[Planner]:
    """Whether a generator fans out (has both `plan` and `write_section`)."""
    return callable(getattr(generator, "plan", None)) and callable(getattr(generator, "write_section", None))


def load_generator(spec: str) -> Generator | Planner:
    """What `module:attr` names: a planner, or a one-step callable (ConfigError otherwise)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        generator = getattr(module, attr)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"DYLEN_LESSON_GENERATOR={spec!r} cannot be loaded: {error}") from error
    if plans(generator):
        return generator
    if not callable(generator):
        raise ConfigError(
            f"DYLEN_LESSON_GENERATOR={spec!r} is neither callable nor has plan and write_section"
        )
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
    return title.strip()[:TITLE_MAX], content


def check_plan(plan: Any) -> dict[str, Any]:
    """The plan as stored: a title (trimmed), 1..MAX_SECTIONS section briefs each with a heading.
    A wrong shape raises TypeError / ValueError (retried), as for check_generated."""
    title, plan = check_generated(plan)
    sections = plan["sections"]
    if not 1 <= len(sections) <= MAX_SECTIONS:
        raise ValueError(f"lesson plan has {len(sections)} sections, expected 1 to {MAX_SECTIONS}")
    for index, brief in enumerate(sections):
        heading = brief.get("heading") if isinstance(brief, dict) else None
        if not isinstance(heading, str) or not heading.strip():
            raise ValueError(f"lesson plan section {index} has no heading")
    summary = plan.get("summary")
    if summary is not None and not isinstance(summary, str):
        raise ValueError("lesson plan summary must be a string")
    return {**plan, "title": title}


def check_section(section: Any, index: int) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise TypeError(f"write_section({index}) returned {type(section).__name__}, expected dict")
    return section

"""The lesson generator contract: what a generator receives and returns, and how one is loaded.

`DYLEN_LESSON_GENERATOR=module:attr` names either

- a callable `(LessonRequest) -> {"title", "sections": [...], ...}` that writes the whole lesson in
  one step, or
- an object (or module) with `plan(request) -> {"title", "summary"?, "sections": [{"heading", ...},
  ...], ...}` and `write_section(request, plan, index) -> dict`: the lesson job plans, and each
  section is then written by a job of its own, side by side. The lesson is the plan (its `sections`
  briefs replaced by the written sections, in plan order).

or `gemini`: the built-in planner on Google's Gemini (common.lessons.gemini). Without it the built-in
template generator (common.lessons.template, which plans) writes lessons. PermanentJobError from any
of these means retrying cannot help; RetryLater (a provider's "not now") reschedules the job without
using an attempt; any other exception is retried. For `write_section`, `request.attempt` is the
section's own attempt and `request.section_index` the section's index.

Model calls: a generator that calls a model does it inside `request.model_call(...)`, whatever the
provider, so that the call goes through the model's lane (DYLEN_MODEL_LIMITS: rpm, tpm and calls in
flight, shared by every instance) and onto the ledger (job, section, user, model, prompt version,
tokens, latency, outcome):

    with request.model_call("my-model", purpose="plan", prompt_version="plan@3",
                            estimated_tokens=2000, timeout_seconds=60) as call:
        try:
            reply = my_provider(prompt, timeout=60)
        except MyProviderRateLimited as limited:      # its 429
            raise call.rate_limited(limited.retry_after_seconds) from limited
        call.usage(input_tokens=reply.input_tokens, output_tokens=reply.output_tokens)
        if not valid(reply):
            call.mark("invalid", "reply_not_json")    # the call is on the ledger as what it was

Taking the slot may wait briefly, or raise RetryLater when the lane is full or paused or the user
already has their tier's share of calls in flight (DYLEN_TIER_CONCURRENT_CALLS), or
PermanentJobError (`job_ended`) when the lesson was canceled meanwhile; let them propagate. `call.rate_limited(seconds)` pauses the lane for every instance and returns the
RetryLater to raise. An exception leaving the block is recorded (`error`, or `timeout`) and goes on.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

from common.accounts.tiers import call_shares
from common.models.lanes import Call, CallContext, model_call
from common.platform.errors import ConfigError

DEPTHS = ("highlights", "detailed", "training")
SECTIONS_BY_DEPTH = {"highlights": 2, "detailed": 6, "training": 10}
MAX_SECTIONS = 50  # one job each: a plan beyond this is a runaway model, not a lesson
TITLE_MAX = 300


@dataclass(frozen=True)
class LessonRequest:
    """What a generator receives. `attempt` lets a generator vary (or a test fail) per attempt.
    `job_id` is the lesson job's, also for its sections; `section_index` is set for write_section."""

    topic: str
    details: str | None
    depth: str
    language: str
    job_id: str
    user_id: str
    attempt: int
    section_index: int | None = None

    def model_call(
        self,
        model: str,
        *,
        purpose: str,
        prompt_version: str | None = None,
        estimated_tokens: int = 0,
        timeout_seconds: float | None = None,
    ) -> AbstractContextManager[Call]:
        """A slot of `model`'s lane for one call made for this request, within the user's tier's
        share of calls in flight, and the call on the ledger (the module's docstring shows the
        use; common.models.lanes.model_call the details)."""
        context = CallContext(
            job_id=uuid.UUID(self.job_id),
            section_index=self.section_index,
            user_id=self.user_id,
            attempt=self.attempt,
            shares=call_shares(),
        )
        return model_call(
            context,
            model,
            purpose=purpose,
            prompt_version=prompt_version,
            estimated_tokens=estimated_tokens,
            timeout_seconds=timeout_seconds,
        )


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

"""The built-in Gemini generator (DYLEN_LESSON_GENERATOR=gemini): a planner on Google's `google-genai`
SDK. `plan` asks for the outline, `write_section` for one section, each a call with structured
output: a JSON schema per call sent as the SDK's `response_json_schema`.

- The reply is checked against the schema and the lesson contract (common.lessons.replies). An invalid reply gets ONE repair call (the conversation so far plus what was
  wrong); a second invalid reply fails the attempt, which the job system retries.
- A safety block or a refusal is PermanentJobError `model_refused` (no retry; users see a safe
  message, operators the reason). A 429 pauses the model's lane for every instance until the
  provider's RetryInfo delay and reschedules the job (RetryLater). A 400 is PermanentJobError
  `model_request_rejected`; any other error or a timeout is an ordinary failure, retried.
- The SDK's own retries are off and each call has a timeout below the job's lease (settings).
- Every call goes through the lane and onto the ledger (request.model_call), with the version of
  its prompt: prompts are files in prompts/ (first line `version: N`), recorded as
  `name@N+<hash of the text>` so that an edit without a bump is still told apart.

google-genai is imported on the first call only (~0.4 s): no function but process_job running a
Gemini lesson ever loads it.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.lessons.generation import SECTIONS_BY_DEPTH, LessonRequest
from common.lessons.replies import SECTION_SCHEMA, checked_plan, checked_section, plan_schema
from common.lessons.settings import GeminiSettings, lesson_settings
from common.platform.errors import PermanentJobError

PROMPTS = Path(__file__).with_name("prompts")
DEFAULT_RETRY_AFTER_SECONDS = 30.0  # a 429 without RetryInfo: Google's quotas are per minute
REPLY_IN_REPAIR_MAX_CHARS = 20_000
# What the tpm window counts for a call until its real usage is settled: its input (~4 characters
# a token) plus a typical reply.
EXPECTED_OUTPUT_TOKENS = {"plan": 1000, "section": 1500}
REFUSAL_FINISH_REASONS = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "MODEL_ARMOR"}
)
REFUSED_PUBLIC_MESSAGE = "The model declined to write this lesson. Try another topic or wording."


class ModelCallFailed(Exception):
    """The provider answered an error worth retrying (5xx, 401/403/404 while a key is fixed...)."""


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str  # recorded with each call
    template: string.Template

    @classmethod
    def load(cls, name: str) -> Prompt:
        text = (PROMPTS / f"{name}.md").read_text(encoding="utf-8")
        first, _, body = text.partition("\n")
        match = re.fullmatch(r"version: (\w+)", first.strip())
        if match is None:
            raise ValueError(f"prompts/{name}.md must start with a `version: N` line")
        digest = hashlib.sha256(body.encode("utf-8")).hexdigest()[:8]
        return cls(name, f"{name}@{match.group(1)}+{digest}", string.Template(body.strip()))

    def render(self, **values: Any) -> str:
        return self.template.substitute({k: "" if v is None else str(v) for k, v in values.items()})


SYSTEM, PLAN, SECTION, REPAIR = (Prompt.load(n) for n in ("system", "plan", "section", "repair"))


# --- the planner ------------------------------------------------------------------------------------


def plan(request: LessonRequest) -> dict[str, Any]:
    settings = _settings()
    count = SECTIONS_BY_DEPTH[request.depth]
    text = PLAN.render(
        topic=request.topic, details=request.details or "none given", depth=request.depth, sections=count
    )
    outline = _generate(
        request,
        settings,
        purpose="plan",
        prompt=PLAN,
        text=text,
        schema=plan_schema(count),
        check=lambda value: checked_plan(value, count),
    )
    return {
        **outline,
        "language": request.language,
        "depth": request.depth,
        "generator": f"gemini/{settings.model}",
        "prompt_version": PLAN.version,
    }


def write_section(request: LessonRequest, plan: dict[str, Any], index: int) -> dict[str, Any]:
    settings = _settings()
    briefs = plan["sections"]
    text = SECTION.render(
        number=index + 1,
        count=len(briefs),
        title=plan["title"],
        topic=request.topic,
        details=request.details or "none given",
        summary=plan.get("summary") or "",
        outline="\n".join(f"{n}. {b['heading']}" for n, b in enumerate(briefs, start=1)),
        heading=briefs[index]["heading"],
        brief=briefs[index].get("brief") or briefs[index].get("body") or "",
    )
    section = _generate(
        request,
        settings,
        purpose="section",
        prompt=SECTION,
        text=text,
        schema=SECTION_SCHEMA,
        check=lambda value: checked_section(value, index),
    )
    return {**section, "prompt_version": SECTION.version}


def _settings() -> GeminiSettings:
    settings = lesson_settings().gemini
    if settings is None:  # DYLEN_LESSON_GENERATOR names another generator: nothing to call
        raise PermanentJobError("generator_changed", "The Gemini generator is not configured.")
    return settings


@dataclass(frozen=True)
class _Reply:
    value: dict[str, Any] | None  # None: invalid
    text: str
    problem: str | None = None


def _generate(
    request: LessonRequest,
    settings: GeminiSettings,
    *,
    purpose: str,
    prompt: Prompt,
    text: str,
    schema: dict[str, Any],
    check: Callable[[Any], dict[str, Any]],
) -> dict[str, Any]:
    system = SYSTEM.render(language=request.language)
    contents: list[dict[str, Any]] = [{"role": "user", "parts": [{"text": text}]}]
    reply = _call(
        request,
        settings,
        purpose=purpose,
        version=f"{prompt.version} {SYSTEM.version}",
        system=system,
        contents=contents,
        schema=schema,
        check=check,
    )
    if reply.value is not None:
        return reply.value
    # One repair: the conversation so far, and what was wrong with the answer.
    contents += [
        {"role": "model", "parts": [{"text": reply.text[:REPLY_IN_REPAIR_MAX_CHARS]}]},
        {"role": "user", "parts": [{"text": REPAIR.render(problem=reply.problem)}]},
    ]
    again = _call(
        request,
        settings,
        purpose="repair",
        version=f"{REPAIR.version} {prompt.version}",
        system=system,
        contents=contents,
        schema=schema,
        check=check,
    )
    if again.value is not None:
        return again.value
    raise ValueError(f"Gemini's {purpose} reply was invalid twice, the last: {again.problem}")


def _call(
    request: LessonRequest,
    settings: GeminiSettings,
    *,
    purpose: str,
    version: str,
    system: str,
    contents: list[dict[str, Any]],
    schema: dict[str, Any],
    check: Callable[[Any], dict[str, Any]],
) -> _Reply:
    # Lazily: google-genai costs ~0.4 s to import, paid by process_job's first Gemini call only.
    from google.genai import errors, types

    config = types.GenerateContentConfig(
        system_instruction=system,
        response_mime_type="application/json",
        response_json_schema=schema,
    )
    chars = len(system) + sum(len(p["text"]) for c in contents for p in c["parts"])
    estimate = chars // 4 + EXPECTED_OUTPUT_TOKENS.get(purpose, EXPECTED_OUTPUT_TOKENS["section"])
    with request.model_call(
        settings.model,
        purpose=purpose,
        prompt_version=version,
        estimated_tokens=estimate,
        timeout_seconds=settings.timeout_seconds,
    ) as call:
        call.bodies(request={"system": system, "contents": contents, "schema": schema})
        try:
            response = client().models.generate_content(
                model=settings.model, contents=contents, config=config
            )
        except errors.APIError as error:
            if error.code == 429:
                raise call.rate_limited(retry_delay(error.details)) from error
            call.mark("error", f"http_{error.code}")
            detail = f"Gemini answered {error.code} {error.status}: {error.message}"
            if error.code == 400 and not _key_problem(
                error
            ):  # the request itself is wrong: resending cannot help
                raise PermanentJobError(
                    "model_request_rejected", detail, public_message="The lesson could not be generated."
                ) from error
            raise ModelCallFailed(detail) from error
        usage = response.usage_metadata
        if usage is not None:
            call.usage(
                input_tokens=usage.prompt_token_count or 0,
                # thinking is billed as output
                output_tokens=(usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0),
            )
        refusal = refusal_reason(response)
        if refusal is not None:
            call.mark("refused", refusal)
            raise PermanentJobError(
                "model_refused",
                f"Gemini declined the {purpose} ({refusal}).",
                public_message=REFUSED_PUBLIC_MESSAGE,
            )
        text = response.text or ""
        call.bodies(response=text)
        try:
            return _Reply(check(json.loads(text)), text)
        except (ValueError, TypeError) as problem:  # not JSON, or not what the schema says
            call.mark("invalid", "reply_invalid")
            return _Reply(None, text, str(problem)[:500])


def _key_problem(error: Any) -> bool:
    """A 400 about the API key (Google answers an invalid key with 400): the configuration's fault,
    fixed by operators, so the job is retried rather than failed for good."""
    return "API_KEY" in json.dumps(error.details, default=str) or "API key" in str(error.message or "")


def refusal_reason(response: Any) -> str | None:
    """Why Gemini refused (a blocked prompt, or a candidate stopped for safety), or None."""
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason is not None:
        return f"prompt blocked: {_name(feedback.block_reason)}"
    candidates = response.candidates or []
    if candidates and candidates[0].finish_reason is not None:
        reason = _name(candidates[0].finish_reason)
        if reason in REFUSAL_FINISH_REASONS:
            return f"reply stopped: {reason}"
    return None


def _name(enum_value: Any) -> str:
    return str(getattr(enum_value, "value", enum_value))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def retry_delay(details: Any) -> float:
    """Seconds from a 429's google.rpc.RetryInfo (`"retryDelay": "7s"`), else the default."""
    error = details.get("error", details) if isinstance(details, dict) else {}
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return DEFAULT_RETRY_AFTER_SECONDS


_client: Any = None
_client_lock = threading.Lock()


def client() -> Any:
    """One SDK client per process (thread-safe), built on first use."""
    global _client
    with _client_lock:
        if _client is None:
            # Lazily: google-genai costs ~0.4 s to import, paid by process_job's first Gemini call only.
            from google import genai
            from google.genai import types

            settings = _settings()
            options = types.HttpOptions(
                base_url=settings.base_url,
                timeout=round(settings.timeout_seconds * 1000),  # milliseconds
                # One attempt: the job system owns retries (with its backoff, attempts and lanes).
                retry_options=types.HttpRetryOptions(attempts=1),
            )
            if settings.api_key is not None:
                _client = genai.Client(api_key=settings.api_key, http_options=options)
            else:
                _client = genai.Client(
                    vertexai=True,
                    project=settings.vertex_project,
                    location=settings.vertex_location,
                    http_options=options,
                )
        return _client

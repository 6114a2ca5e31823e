"""Every model call goes through its model's lane and onto the ledger: one round trip before the
call (the slot: a `model_calls` row, taken by the database function `take_model_slot` of migration
0009 under the user's share lock and the lane row's lock) and one after it (the settle: tokens,
latency and outcome written to that row, and a provider's 429 pause written to the lane, one
statement).

    with model_call(context, "gemini-2.5-flash", purpose="plan", prompt_version="plan-1") as call:
        reply = provider(...)                    # raise call.rate_limited(delay) on a 429
        call.usage(input_tokens=..., output_tokens=...)

A call that finds no slot waits in-process while the wait is short (DYLEN_MODEL_SLOT_WAIT_SECONDS),
else raises RetryLater for when the lane frees: the job is rescheduled without using an attempt. A
user at their tier's share of calls in flight waits at most SHARE_WAIT_SECONDS, then RetryLater:
the thread goes to other users' work. A call for a job that has ended (canceled) is not made:
JobEnded.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from common.jobs.settings import job_settings
from common.models.settings import LaneLimits, model_settings
from common.platform import telemetry
from common.platform.db import Statement, connection, jsonb
from common.platform.errors import PermanentJobError, RetryLater
from common.platform.log import logger

# A call is counted from the moment its slot is taken, a little before the provider sees it. The
# window is taken this much longer than the limit's, so that calls' differing transit times never
# pack more than the limit into one of the provider's windows.
WINDOW_MARGIN_SECONDS = 1.0
# The lease outlives the call's own timeout by this much: a slot frees itself only once its call
# can no longer be running.
LEASE_MARGIN_SECONDS = 30.0
# A full lane (in flight) says nothing of when a call ends: poll it this often while waiting.
CONCURRENCY_POLL_SECONDS = 0.2
# A user over their share waits this long at most in-process: their other calls last seconds, and
# the thread (a process_job request) is better given back for other users' work.
SHARE_WAIT_SECONDS = 1.0
BODY_MAX_CHARS = 200_000
OUTCOMES = ("ok", "invalid", "refused", "rate_limited", "error", "timeout")

_TAKE = Statement(
    """
    SELECT call_id, wait_seconds, reason
      FROM take_model_slot(CAST(:model AS text), CAST(:rpm AS integer), CAST(:tpm AS integer),
                           CAST(:concurrency AS integer), CAST(:window AS double precision),
                           CAST(:estimated_tokens AS integer), CAST(:lease AS double precision),
                           CAST(:job_id AS uuid), CAST(:section_index AS integer),
                           CAST(:attempt AS integer), CAST(:user_id AS text), CAST(:purpose AS text),
                           CAST(:prompt_version AS text), CAST(:shares AS jsonb))
    """,
    prepare=True,
)

# The ledger row and, after a provider's 429, the lane's pause: one statement. `ended_at IS NULL`:
# a settle never rewrites a finished call.
_SETTLE = Statement(
    """
    WITH settled AS (
        UPDATE model_calls
           SET ended_at = clock_timestamp(), latency_ms = CAST(:latency_ms AS integer),
               input_tokens = CAST(:input_tokens AS integer),
               output_tokens = CAST(:output_tokens AS integer),
               outcome = CAST(:outcome AS text), error_code = CAST(:error_code AS text),
               request_body = CAST(:request_body AS jsonb), response_body = CAST(:response_body AS jsonb)
         WHERE id = CAST(:id AS bigint) AND ended_at IS NULL
        RETURNING id
    ), paused AS (
        UPDATE model_lanes
           SET paused_until = greatest(paused_until, clock_timestamp()
                                       + make_interval(secs => CAST(:pause_seconds AS double precision))),
               pause_reason = CAST(:error_code AS text)
         WHERE model = CAST(:model AS text) AND CAST(:pause_seconds AS double precision) IS NOT NULL
        RETURNING paused_until
    )
    SELECT (SELECT count(*) FROM settled) AS settled, (SELECT paused_until FROM paused) AS paused_until
    """,
    prepare=True,
)


@dataclass(frozen=True)
class CallContext:
    """Whom a call is for, as the ledger records it: the lesson job (a section's calls carry its
    lesson's id and the section's index), the user, and the attempt that made it. `shares`: per
    tier, the calls the user may have in flight at once (a missing tier gets free's; None: not
    held to a share); the user's tier is read by the take."""

    job_id: uuid.UUID | None = None
    section_index: int | None = None
    user_id: str | None = None
    attempt: int | None = None
    shares: Mapping[str, int] | None = None


class JobEnded(PermanentJobError):
    """The call's job has ended (canceled by its user, failed, or finished by another attempt):
    the call is not made, since its result could only be discarded. The attempt ends quietly: its
    job is no longer its to finish or fail."""

    def __init__(self) -> None:
        super().__init__("job_ended", "The job ended before this model call started.")


class Call:
    """One call in flight: the generator reports its usage and, when it is not a plain success,
    what it was. Outcomes: ok (the default), invalid (a reply the contract refuses), refused (a
    safety block), rate_limited (a provider's 429), error / timeout (anything else raised)."""

    def __init__(self, call_id: int, model: str, *, keep_bodies: bool) -> None:
        self.id = call_id
        self.model = model
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.outcome: str | None = None
        self.error_code: str | None = None
        self.pause_seconds: float | None = None
        self._keep_bodies = keep_bodies
        self._request: Any = None
        self._response: Any = None

    def usage(self, input_tokens: int | None, output_tokens: int | None) -> None:
        """Tokens as the provider counted them (None: it did not say)."""
        self.input_tokens = None if input_tokens is None else max(0, int(input_tokens))
        self.output_tokens = None if output_tokens is None else max(0, int(output_tokens))

    def bodies(self, *, request: Any = None, response: Any = None) -> None:
        """What was sent and received; kept only with DYLEN_MODEL_CALL_BODIES=true."""
        if self._keep_bodies:
            if request is not None:
                self._request = request
            if response is not None:
                self._response = response

    def mark(self, outcome: str, code: str | None = None) -> None:
        """Say what the call was (`invalid`, `refused`, `error`, `timeout`), raised or not."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.outcome, self.error_code = outcome, code

    def rate_limited(self, retry_after_seconds: float, code: str = "rate_limited") -> RetryLater:
        """The provider said 429: the lane pauses for every instance until `retry_after_seconds`
        from now (written by the settle). Raise what this returns: the job is rescheduled."""
        self.mark("rate_limited", code)
        self.pause_seconds = max(0.0, float(retry_after_seconds))
        telemetry.rate_limited(self.model, self.pause_seconds)
        return RetryLater(self.pause_seconds, code)

    def recorded_bodies(self) -> tuple[str | None, str | None]:
        """The bodies as the ledger stores them (jsonb text, bounded), None when not kept."""
        return _bounded(self._request), _bounded(self._response)


def _without_nul(value: Any) -> Any:
    # PostgreSQL's jsonb refuses \u0000, and a model's text may hold one.
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nul(v) for v in value]
    return value


def _bounded(body: Any) -> str | None:
    if body is None:
        return None
    text = jsonb(_without_nul(body))
    if text is not None and len(text) > BODY_MAX_CHARS:
        text = json.dumps({"truncated": text[:BODY_MAX_CHARS]})
    return text


def take_slot(
    context: CallContext,
    model: str,
    *,
    purpose: str,
    prompt_version: str | None,
    estimated_tokens: int,
    lease_seconds: float,
) -> int:
    """The new call's id, once the lane has a slot; RetryLater when none frees soon enough."""
    settings = model_settings()
    limits = settings.limits.get(model, LaneLimits())
    params = {
        "model": model,
        "rpm": limits.rpm,
        "tpm": limits.tpm,
        "concurrency": limits.concurrency,
        "window": settings.window_seconds + WINDOW_MARGIN_SECONDS,
        "estimated_tokens": max(0, int(estimated_tokens)),
        "lease": lease_seconds,
        "job_id": context.job_id,
        "section_index": context.section_index,
        "attempt": context.attempt,
        "user_id": context.user_id,
        "purpose": purpose,
        "prompt_version": prompt_version,
        "shares": jsonb(dict(context.shares)) if context.shares is not None else None,
    }
    started = time.monotonic()
    while True:
        with connection() as conn:
            row = conn.execute(_TAKE, params).one()
        if row.call_id is not None:
            return int(row.call_id)
        if row.reason == "job_ended":
            raise JobEnded
        wait = float(row.wait_seconds)
        bound = settings.slot_wait_seconds
        if row.reason in ("concurrency", "user_share"):  # freed when a call ends: unknown, poll
            wait = CONCURRENCY_POLL_SECONDS * (1 + random.random())
            if row.reason == "user_share":
                bound = min(bound, SHARE_WAIT_SECONDS)
        else:
            wait += random.uniform(0.0, 0.05)  # waiters woken by one freed slot do not all collide
        if time.monotonic() - started + wait > bound:
            # Not soon: the job is rescheduled for when the lane frees (a full one: in a moment).
            polled = row.reason in ("concurrency", "user_share")
            after = 1.0 + random.random() if polled else max(wait, 1.0)
            reason = "user_share" if row.reason == "user_share" else f"lane_{row.reason}"
            raise RetryLater(after, reason)
        time.sleep(wait)


def settle(call: Call, *, latency_ms: int) -> None:
    """Write the call's outcome, tokens and latency (and a 429's pause). A settle that cannot be
    written is logged, never raised: the call was made and its work is not lost over the ledger;
    its row stays as taken and reads as `lost` once its lease passes."""
    request_body, response_body = call.recorded_bodies()
    params = {
        "id": call.id,
        "model": call.model,
        "latency_ms": latency_ms,
        "input_tokens": call.input_tokens,
        "output_tokens": call.output_tokens,
        "outcome": call.outcome or "ok",
        "error_code": call.error_code,
        "request_body": request_body,
        "response_body": response_body,
        "pause_seconds": call.pause_seconds,
    }
    try:
        with connection() as conn:
            conn.execute(_SETTLE, params)
    except Exception as error:  # the database away, or a body it refuses: never the call's fault
        logger.warning(
            "Model call not settled on the ledger", extra={"call_id": call.id, "error": repr(error)}
        )


@contextmanager
def model_call(
    context: CallContext,
    model: str,
    *,
    purpose: str,
    prompt_version: str | None = None,
    estimated_tokens: int = 0,
    timeout_seconds: float | None = None,
) -> Iterator[Call]:
    """A slot of `model`'s lane for the block, and the call on the ledger when it ends.

    `estimated_tokens` is what the tpm window counts until the real usage is settled.
    `timeout_seconds` is the call's own bound (default: the job's lease); the slot's lease outlives
    it, so an instance that dies mid-call frees its slot by itself. An exception raised in the block
    settles the call as `error` (`timeout` for a timeout), unless `mark` or `rate_limited` said
    otherwise, and goes on."""
    settings = model_settings()
    timeout = float(timeout_seconds) if timeout_seconds is not None else float(job_settings().timeout_seconds)
    with telemetry.lane_wait(model):
        call_id = take_slot(
            context,
            model,
            purpose=purpose,
            prompt_version=prompt_version,
            estimated_tokens=estimated_tokens,
            lease_seconds=timeout + LEASE_MARGIN_SECONDS,
        )
    call = Call(call_id, model, keep_bodies=settings.keep_bodies)
    started = time.monotonic()
    # The call's span (GenAI conventions) says what the ledger says: tokens and outcome.
    with telemetry.model_call(model, **{"dylen.model.purpose": purpose}) as traced:
        try:
            yield call
        except BaseException as error:
            if call.outcome is None:
                if isinstance(error, PermanentJobError):
                    call.mark("error", error.code)
                else:
                    name = type(error).__name__
                    call.mark("timeout" if "Timeout" in name else "error", name)
            _settle(call, traced, started)
            raise
        _settle(call, traced, started)


def _settle(call: Call, traced: telemetry.ModelCall, started: float) -> None:
    traced.usage(call.input_tokens, call.output_tokens)
    traced.outcome(call.outcome or "ok", call.error_code)
    settle(call, latency_ms=_ms_since(started))


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)

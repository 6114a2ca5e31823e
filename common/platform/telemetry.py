"""Traces and metrics for operators (OpenTelemetry): one trace per job across every function, task
and section, and numbers to alert on (docs/OBSERVABILITY.md).

Off unless DYLEN_TELEMETRY says otherwise (deploy.sh turns it on): then every call here checks one
module global and returns, and nothing of OpenTelemetry is imported, so neither a cold start nor a
request pays for it. On, `start()` (cold start) loads the SDK (common.platform.otel).

    with telemetry.span("lesson.plan", {"dylen.job.id": job_id}) as span:
        span.set_attribute("dylen.sections", 5)
    telemetry.record("dylen.jobs.created", 1, job_kind="lesson")

Model calls (GenAI semantic conventions), lane waits and a provider's 429s:

    with telemetry.lane_wait(model):
        slot = take_slot(...)
    with telemetry.model_call(model, provider="gcp.gemini") as call:
        reply = ...
        call.usage(input_tokens=..., output_tokens=...)
        call.outcome("invalid")  # what the ledger says, when not "ok"
    telemetry.rate_limited(model)

A trace crosses a task as a W3C `traceparent` header (`inject`), and is stored with each job
(`traceparent()`), so a dispatch made outside the job's trace (a rescue, an operator's retry)
continues it (`dispatch_span`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from common.platform.env import Reader, Section
from common.platform.errors import ConfigError

if TYPE_CHECKING:
    from common.platform.otel import Otel

Attributes = Mapping[str, Any]
MODES = ("off", "gcp", "file")


@dataclass(frozen=True)
class TelemetrySettings:
    mode: str  # off | gcp (Cloud Trace + Cloud Monitoring) | file (JSON lines, local inspection)
    directory: str | None  # file mode: where each process writes spans-<pid>.jsonl, metrics-<pid>.jsonl
    sample_ratio: float  # of the traces started here; a caller's traceparent keeps its own decision
    metrics_interval_seconds: float
    project: str | None  # GOOGLE_CLOUD_PROJECT; the exporters ask google-auth when unset


def _load(r: Reader) -> TelemetrySettings:
    mode = r.choice("DYLEN_TELEMETRY", "off", MODES)
    ratio = r.number("DYLEN_TRACE_SAMPLE_RATIO", 1.0, minimum=0.0)
    if ratio > 1:
        raise ConfigError(f"DYLEN_TRACE_SAMPLE_RATIO must be between 0 and 1, got {ratio}")
    directory = r.text("DYLEN_TELEMETRY_DIR")
    if mode == "file" and not directory:
        raise ConfigError("DYLEN_TELEMETRY_DIR is required with DYLEN_TELEMETRY=file")
    # Cloud Monitoring takes one point per series every 5 s at most.
    interval = r.number("DYLEN_METRICS_EXPORT_SECONDS", 60.0, minimum=5.0 if mode == "gcp" else 0.1)
    return TelemetrySettings(mode, directory, ratio, interval, r.text("GOOGLE_CLOUD_PROJECT"))


telemetry_settings = Section(_load)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter | histogram
    unit: str
    description: str
    buckets: tuple[float, ...] = ()


SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
# Every metric, declared once: `record` takes these names only (docs/OBSERVABILITY.md lists them).
METRICS = {
    m.name: m
    for m in (
        Metric("dylen.jobs.created", "counter", "{job}", "Jobs created, by job_kind."),
        Metric(
            "dylen.jobs.finished", "counter", "{job}", "Jobs ended, by job_kind and status (done, error)."
        ),
        Metric(
            "dylen.jobs.retries",
            "counter",
            "{attempt}",
            "Attempts rescheduled, by job_kind, outcome (retry_scheduled, deferred) and code.",
        ),
        Metric(
            "dylen.job.queue_latency", "histogram", "s", "From a job's create to its first claim.", SECONDS
        ),
        Metric(
            "dylen.job.run.duration", "histogram", "s", "One attempt's run, by job_kind and outcome.", SECONDS
        ),
        Metric("dylen.model.lane.wait", "histogram", "s", "Waits for a model's lane slot.", SECONDS),
        Metric("dylen.model.rate_limited", "counter", "{response}", "A provider's 429s, by model."),
        Metric("dylen.model.tokens", "counter", "{token}", "Tokens, by model and type (input, output)."),
        Metric("gen_ai.client.token.usage", "histogram", "{token}", "Tokens per model call.", TOKENS),
        Metric("gen_ai.client.operation.duration", "histogram", "s", "Model calls' duration.", SECONDS),
    )
}


class Span(Protocol):
    """What a span scope yields: OpenTelemetry's span, or a no-op one with the same methods."""

    def set_attribute(self, key: str, value: Any) -> None: ...

    def add_event(self, name: str, attributes: Attributes | None = None) -> None: ...


class ModelCall(Protocol):
    def usage(self, input_tokens: int | None, output_tokens: int | None) -> None: ...

    def outcome(self, outcome: str, error_type: str | None = None) -> None: ...


class Scope(Protocol):
    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: Any) -> Any: ...


class _Nothing:
    """Every span, scope and model call while telemetry is off: one shared object that does nothing."""

    __slots__ = ()

    def __enter__(self) -> _Nothing:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def add_event(self, name: str, attributes: Attributes | None = None) -> None:
        pass

    def usage(self, input_tokens: int | None, output_tokens: int | None) -> None:
        pass

    def outcome(self, outcome: str, error_type: str | None = None) -> None:
        pass


NOTHING = _Nothing()
_otel: Otel | None = None  # set by start() when telemetry is on


def start() -> None:
    """Load the SDK and its exporters if DYLEN_TELEMETRY asks for it (cold start; once)."""
    global _otel
    settings = telemetry_settings()
    if settings.mode == "off" or _otel is not None:
        return
    # Lazily: the SDK loads only when telemetry is on (~100 ms of cold start).
    from common.platform.otel import Otel

    _otel = Otel(settings, METRICS)


def enabled() -> bool:
    return _otel is not None


def _merged(attributes: Attributes | None, more: dict[str, Any]) -> Attributes:
    return {**attributes, **more} if attributes and more else (attributes or more)


def span(name: str, attributes: Attributes | None = None, /, **more: Any) -> Scope:
    """A span under the current one for the block (`with ... as span`); exceptions are recorded."""
    otel = _otel
    if otel is None:
        return NOTHING
    return otel.span(name, _merged(attributes, more))


def annotate(attributes: Attributes) -> None:
    """Set attributes on the current span (the request's, say, once its job is known)."""
    otel = _otel
    if otel is not None:
        otel.annotate(attributes)


def record(metric: str, value: float, attributes: Attributes | None = None, /, **more: Any) -> None:
    """Add to a counter or record in a histogram of METRICS."""
    otel = _otel
    if otel is not None:
        otel.record(metric, value, _merged(attributes, more))


class _Timed:
    __slots__ = ("_attributes", "_metric", "_started")

    def __init__(self, metric: str, attributes: Attributes) -> None:
        self._metric, self._attributes = metric, attributes

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, *rest: Any) -> None:
        outcome = "ok" if kind is None else "error"
        record(self._metric, time.perf_counter() - self._started, self._attributes, outcome=outcome)


def timed(metric: str, attributes: Attributes | None = None, /, **more: Any) -> Scope:
    """Record the block's duration (seconds) in histogram `metric`, with outcome ok or error."""
    if _otel is None:
        return NOTHING
    return _Timed(metric, _merged(attributes, more))


def server_span(function: str | None, request: Any) -> Scope:
    """The span of one request (a flask.Request) to `function` (default: K_SERVICE), continuing
    the caller's trace (`traceparent`, else Google's X-Cloud-Trace-Context)."""
    otel = _otel
    if otel is None:
        return NOTHING
    return otel.server_span(function, request)


def dispatch_span(name: str, stored: str | None, attributes: Attributes) -> Scope:
    """The span of handing a job to its task: under the current span when that is in the job's
    trace (`stored`, the job's traceparent), else under the stored one, linked to the current."""
    otel = _otel
    if otel is None:
        return NOTHING
    return otel.dispatch_span(name, stored, attributes)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context (`traceparent`) to outgoing headers; returns them."""
    otel = _otel
    if otel is not None:
        otel.inject(headers)
    return headers


def traceparent() -> str | None:
    """The current span as a W3C traceparent, to store with a job; None when off or outside a span."""
    otel = _otel
    return otel.traceparent() if otel is not None else None


def current_ids() -> tuple[str, str, bool] | None:
    """(trace id, span id, sampled) of the current span, in hex, for log lines."""
    otel = _otel
    return otel.current_ids() if otel is not None else None


def model_call(
    model: str, *, provider: str | None = None, operation: str = "generate_content", **attributes: Any
) -> Scope:
    """A CLIENT span `{operation} {model}` with the GenAI attributes (gen_ai.request.model,
    gen_ai.provider.name when known, gen_ai.usage.input_tokens / output_tokens) and the outcome,
    and on exit the GenAI duration and token metrics plus dylen.model.tokens. Yields a ModelCall;
    an exception is outcome `error` unless `outcome` said otherwise."""
    otel = _otel
    if otel is None:
        return NOTHING
    return otel.model_call(model, provider=provider, operation=operation, attributes=attributes)


def lane_wait(model: str) -> Scope:
    """The wait for a slot of `model`'s lane: a span, and dylen.model.lane.wait with outcome `slot`,
    `retry_later` (the wait ended in RetryLater) or `error`."""
    otel = _otel
    if otel is None:
        return NOTHING
    return otel.lane_wait(model)


def rate_limited(model: str, retry_after_seconds: float | None = None) -> None:
    """A provider's 429: counted per model and noted on the current span."""
    otel = _otel
    if otel is not None:
        otel.rate_limited(model, retry_after_seconds)

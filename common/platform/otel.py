"""The OpenTelemetry SDK behind common.platform.telemetry, loaded only when telemetry is on.

Export runs on the SDK's own threads (a batch span processor, a periodic metric reader): a request
never waits for Cloud Trace or Cloud Monitoring. The functions are imported, and this module built,
in functions-framework's gunicorn arbiter, which then forks the worker: the SDK restarts its threads
in the child itself, and the Google exporters are imported and made on their first export, in the
worker (a gRPC channel does not survive a fork, and their imports would double a cold start).
"""

from __future__ import annotations

import functools
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from common.platform.errors import RetryLater

# common.platform.telemetry's TelemetrySettings and Metric, passed in (it imports this module).
Attributes = Mapping[str, Any]
_PROPAGATOR = TraceContextTextMapPropagator()
SCOPE = "dylen-jobs"


class _ProcessFile:
    """A JSON-lines file per process (`<kind>-<pid>.jsonl`), opened in the process that writes:
    the arbiter's open file would be shared with the forked worker."""

    def __init__(self, directory: str, kind: str) -> None:
        self._directory, self._kind = directory, kind
        self._pid = -1
        self._file: IO[str] | None = None
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            if self._pid != os.getpid() or self._file is None:
                os.makedirs(self._directory, exist_ok=True)
                path = os.path.join(self._directory, f"{self._kind}-{os.getpid()}.jsonl")
                self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept for the process
                self._pid = os.getpid()
            self._file.write(text)

    def flush(self) -> None:
        with self._lock:
            if self._file is not None and self._pid == os.getpid():
                self._file.flush()


class _LazySpans(SpanExporter):
    """Makes its exporter on the first export (in the worker, on the export thread)."""

    def __init__(self, make: Callable[[], SpanExporter]) -> None:
        self._make = make
        self._exporter: SpanExporter | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._exporter is None:
            self._exporter = self._make()
        return self._exporter.export(spans)

    def shutdown(self) -> None:
        if self._exporter is not None:
            self._exporter.shutdown()


class _LazyMetrics(MetricExporter):
    """Makes its exporter on the first export that has points: the arbiter, which records nothing,
    never makes one."""

    def __init__(self, make: Callable[[], MetricExporter]) -> None:
        super().__init__()
        self._make = make
        self._exporter: MetricExporter | None = None

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        points = any(
            metric.data.data_points
            for resource in metrics_data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        )
        if not points:
            return MetricExportResult.SUCCESS
        if self._exporter is None:
            self._exporter = self._make()
        return self._exporter.export(metrics_data, timeout_millis=timeout_millis)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        if self._exporter is not None:
            self._exporter.shutdown(timeout_millis=timeout_millis)


def _exporters(settings: Any) -> tuple[SpanExporter, MetricExporter]:
    if settings.mode == "file":
        assert settings.directory is not None, "checked at config load"
        spans, metrics = (
            _ProcessFile(settings.directory, "spans"),
            _ProcessFile(settings.directory, "metrics"),
        )
        return (
            ConsoleSpanExporter(out=spans, formatter=lambda s: s.to_json(indent=None) + "\n"),  # type: ignore[arg-type]
            _LazyMetrics(
                lambda: ConsoleMetricExporter(
                    out=metrics,  # type: ignore[arg-type]
                    formatter=lambda m: m.to_json(indent=None) + "\n",
                )
            ),
        )
    project = settings.project

    def cloud_trace() -> SpanExporter:
        # Lazily, on the export thread: the Google exporters (gRPC, api-core; ~350 ms of imports
        # alone) would otherwise more than double a cold start, and belong after the fork anyway.
        from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter

        return CloudTraceSpanExporter(project_id=project)

    def cloud_monitoring() -> MetricExporter:
        # Lazily, on the export thread (as above).
        from opentelemetry.exporter.cloud_monitoring import CloudMonitoringMetricsExporter

        return CloudMonitoringMetricsExporter(project_id=project)

    return _LazySpans(cloud_trace), _LazyMetrics(cloud_monitoring)


def _resource() -> Resource:
    # Cloud Monitoring keeps one series per (metric, labels, resource): the instance id keeps two
    # instances' points apart (generic_task's task_id). OTEL_RESOURCE_ATTRIBUTES adds to these.
    attributes = {
        "service.name": os.environ.get("OTEL_SERVICE_NAME") or os.environ.get("K_SERVICE") or "dylen-jobs",
        "service.namespace": "dylen-jobs",
        "service.instance.id": uuid.uuid4().hex,
    }
    if os.environ.get("K_REVISION"):
        attributes["service.version"] = os.environ["K_REVISION"]
    return Resource.create(attributes)


def _cloud_trace_context(header: str | None) -> SpanContext | None:
    """Google's `TRACE_ID/SPAN_ID;o=1` (span id in decimal), as a remote parent."""
    if not header:
        return None
    trace_part, _, rest = header.partition("/")
    span_part, _, options = rest.partition(";")
    try:
        trace_id, span_id = int(trace_part.strip(), 16), int(span_part.strip() or "0")
    except ValueError:
        return None
    if len(trace_part.strip()) != 32 or not 0 < span_id < 2**64 or trace_id == 0:
        return None
    flags = TraceFlags(TraceFlags.SAMPLED if options.strip() == "o=1" else TraceFlags.DEFAULT)
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)


class _ModelCall:
    """The handle model_call yields; settled on exit."""

    def __init__(self, otel: Otel, span: trace.Span, attributes: dict[str, Any]) -> None:
        self._otel, self._span, self._attributes = otel, span, attributes
        self._tokens: tuple[int | None, int | None] = (None, None)
        self._outcome: tuple[str, str | None] | None = None
        self._started = time.perf_counter()
        self._scope = trace.use_span(
            span, end_on_exit=True, record_exception=True, set_status_on_exception=True
        )

    def usage(self, input_tokens: int | None, output_tokens: int | None) -> None:
        self._tokens = (input_tokens, output_tokens)

    def outcome(self, outcome: str, error_type: str | None = None) -> None:
        self._outcome = (outcome, error_type)

    def __enter__(self) -> _ModelCall:
        self._scope.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> Any:
        if self._outcome is None:
            self._outcome = ("ok", None) if kind is None else ("error", kind.__name__)
        outcome, error_type = self._outcome
        span, base = self._span, self._attributes
        span.set_attribute("dylen.model.outcome", outcome)
        if outcome != "ok":
            error_type = error_type or outcome
            span.set_attribute("error.type", error_type)
        metric_attributes = {**base, "dylen.model.outcome": outcome}
        if error_type:
            metric_attributes["error.type"] = error_type
        self._otel.record(
            "gen_ai.client.operation.duration", time.perf_counter() - self._started, metric_attributes
        )
        model = base["gen_ai.request.model"]
        for token_type, count in zip(("input", "output"), self._tokens, strict=True):
            if count is None:
                continue
            span.set_attribute(f"gen_ai.usage.{token_type}_tokens", count)
            self._otel.record("gen_ai.client.token.usage", count, {**base, "gen_ai.token.type": token_type})
            self._otel.record("dylen.model.tokens", count, {"model": model, "type": token_type})
        return self._scope.__exit__(kind, error, tb)


class _LaneWait:
    def __init__(self, otel: Otel, model: str) -> None:
        self._otel, self._model = otel, model
        self._scope = otel.span(f"lane wait {model}", {"gen_ai.request.model": model})

    def __enter__(self) -> Any:
        self._started = time.perf_counter()
        return self._scope.__enter__()

    def __exit__(self, kind: type[BaseException] | None, *rest: Any) -> Any:
        outcome = "slot" if kind is None else "retry_later" if issubclass(kind, RetryLater) else "error"
        waited = time.perf_counter() - self._started
        self._otel.record("dylen.model.lane.wait", waited, {"model": self._model, "outcome": outcome})
        return self._scope.__exit__(kind, *rest)


class Otel:
    def __init__(self, settings: Any, metrics: Mapping[str, Any]) -> None:
        spans, metric_exporter = _exporters(settings)
        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        resource = _resource()
        self.tracer_provider = TracerProvider(sampler=sampler, resource=resource)
        # Batch delay and queue bounds: the SDK's OTEL_BSP_* variables.
        self.tracer_provider.add_span_processor(BatchSpanProcessor(spans))
        reader = PeriodicExportingMetricReader(
            metric_exporter, export_interval_millis=settings.metrics_interval_seconds * 1000
        )
        self.meter_provider = MeterProvider(metric_readers=[reader], resource=resource)
        self.tracer = self.tracer_provider.get_tracer(SCOPE)
        meter = self.meter_provider.get_meter(SCOPE)
        self._recorders: dict[str, Callable[..., None]] = {}
        # Counters are summed here and observed at export: the SDK's Counter.add costs ~35 us a
        # call (attribute checks, views, exemplars), a third of a traced create_job's overhead.
        self._counts: dict[tuple[str, tuple[tuple[str, Any], ...]], float] = {}
        self._counts_lock = threading.Lock()
        for m in metrics.values():
            if m.kind == "counter":
                meter.create_observable_counter(
                    m.name, [functools.partial(self._observe, m.name)], m.unit, m.description
                )
                self._recorders[m.name] = functools.partial(self._add, m.name)
            else:
                histogram = meter.create_histogram(
                    m.name, m.unit, m.description, explicit_bucket_boundaries_advisory=list(m.buckets)
                )
                self._recorders[m.name] = histogram.record

    def span(
        self,
        name: str,
        attributes: Attributes,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        context: Any = None,
        links: Sequence[Link] | None = None,
    ) -> Any:
        return self.tracer.start_as_current_span(
            name, context=context, kind=kind, attributes=attributes, links=links
        )

    def annotate(self, attributes: Attributes) -> None:
        trace.get_current_span().set_attributes(attributes)

    def record(self, metric: str, value: float, attributes: Attributes) -> None:
        self._recorders[metric](value, attributes)

    def _add(self, metric: str, value: float, attributes: Attributes) -> None:
        key = (metric, tuple(sorted(attributes.items())))
        with self._counts_lock:
            self._counts[key] = self._counts.get(key, 0) + value

    def _observe(self, metric: str, options: CallbackOptions) -> list[Observation]:
        with self._counts_lock:
            totals = [(labels, n) for (name, labels), n in self._counts.items() if name == metric]
        return [Observation(n, dict(labels)) for labels, n in totals]

    def server_span(self, function: str | None, request: Any) -> Any:
        headers = request.headers
        context: Any = _PROPAGATOR.extract(headers)
        if not trace.get_current_span(context).get_span_context().is_valid:
            google = _cloud_trace_context(headers.get("X-Cloud-Trace-Context"))
            context = trace.set_span_in_context(NonRecordingSpan(google)) if google else None
        name = function or os.environ.get("K_SERVICE") or "request"
        attributes = {"http.request.method": request.method, "url.path": request.path, "dylen.function": name}
        return self.span(name, attributes, kind=SpanKind.SERVER, context=context)

    def dispatch_span(self, name: str, stored: str | None, attributes: Attributes) -> Any:
        current = trace.get_current_span().get_span_context()
        if stored:
            context = _PROPAGATOR.extract({"traceparent": stored})
            job = trace.get_current_span(context).get_span_context()
            if job.is_valid and (not current.is_valid or current.trace_id != job.trace_id):
                links = [Link(current)] if current.is_valid else None
                return self.span(name, attributes, kind=SpanKind.PRODUCER, context=context, links=links)
        return self.span(name, attributes, kind=SpanKind.PRODUCER)

    def inject(self, headers: dict[str, str]) -> None:
        _PROPAGATOR.inject(headers)

    def traceparent(self) -> str | None:
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"

    def current_ids(self) -> tuple[str, str, bool] | None:
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return f"{context.trace_id:032x}", f"{context.span_id:016x}", context.trace_flags.sampled

    def model_call(self, model: str, *, provider: str | None, operation: str, attributes: Attributes) -> Any:
        base = {"gen_ai.operation.name": operation, "gen_ai.request.model": model}
        if provider:
            base["gen_ai.provider.name"] = provider
            base["gen_ai.system"] = provider  # the older name, still what some back ends read
        span = self.tracer.start_span(
            f"{operation} {model}", kind=SpanKind.CLIENT, attributes={**base, **attributes}
        )
        return _ModelCall(self, span, base)

    def lane_wait(self, model: str) -> Any:
        return _LaneWait(self, model)

    def rate_limited(self, model: str, retry_after_seconds: float | None) -> None:
        self.record("dylen.model.rate_limited", 1, {"model": model})
        attributes = {"gen_ai.request.model": model}
        if retry_after_seconds is not None:
            attributes["dylen.retry_after_seconds"] = retry_after_seconds  # type: ignore[assignment]
        trace.get_current_span().add_event("rate_limited", attributes)

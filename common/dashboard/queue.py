"""The queue view: what waits and runs now, by kind (ready, scheduled for later, in flight, waiting on
sections, the oldest ready job's wait), and what finished over a window: throughput per kind and
time bucket (every job), and the wait before the first start and the run's length (percentiles of
the newest queries.LATENCY_SAMPLE jobs of each bucket)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import flask

from common.dashboard import charts, queries
from common.dashboard.render import chrome, live, render
from common.jobs.kinds import section_kinds
from common.platform.db import connection
from common.platform.errors import ValidationFailed

# window -> (its length, its bucket, the bucket's name), all in seconds
WINDOWS = {
    "1h": (3600, 60, "minute"),
    "6h": (6 * 3600, 300, "5 minutes"),
    "24h": (24 * 3600, 1800, "30 minutes"),
}
REGIONS = {"queue-live": "_queue.html"}


def _window(raw: str | None) -> str:
    window = raw or "1h"
    if window not in WINDOWS:
        raise ValidationFailed(f"Unknown window {window!r}: use one of {', '.join(WINDOWS)}.")
    return window


def queue_context(request: flask.Request) -> dict[str, Any]:
    window = _window(request.args.get("window"))
    span, step, bucket = WINDOWS[window]
    now = datetime.now(UTC)
    # Buckets aligned to their size, the current (partial) one last.
    first = math.floor((now.timestamp() - span) / step + 1) * step
    since = datetime.fromtimestamp(first, UTC)
    times = [
        since + timedelta(seconds=i * step) for i in range(math.ceil((now - since).total_seconds() / step))
    ]
    with connection() as conn:
        now_rows = queries.queue_now(conn)
        counted = queries.throughput(conn, since=since, step_seconds=step)
        kinds = sorted({row.job_kind for row in counted})
        timed = queries.latency(conn, since=since, step_seconds=step, buckets=len(times), kinds=kinds)
    sections = section_kinds()
    live_by_kind = {row.job_kind: row for row in now_rows}
    counts: dict[str, dict[datetime, Any]] = {}
    for row in counted:
        counts.setdefault(row.job_kind, {})[row.at] = row
    latencies: dict[str, dict[datetime | None, Any]] = {}
    for row in timed:
        latencies.setdefault(row.job_kind, {})[row.at] = row
    kinds = sorted(
        set(live_by_kind) | set(counts),
        key=lambda kind: (sections.get(kind, kind), kind in sections, kind),
    )

    def window_of(kind: str) -> dict[str, Any] | None:
        mine = counts.get(kind)
        if not mine:
            return None
        overall = latencies.get(kind, {}).get(None)
        return {
            "finished": sum(int(r.finished) for r in mine.values()),
            "failed": sum(int(r.failed) for r in mine.values()),
            **{k: getattr(overall, k, None) for k in ("wait_p50", "wait_p95", "run_p50", "run_p95")},
        }

    def finished(kind: str) -> list[float | None]:
        mine = counts.get(kind, {})
        return [float(mine[t].finished) if t in mine else 0.0 for t in times]

    def waited(kind: str) -> list[float | None]:
        mine = latencies.get(kind, {})
        return [
            float(mine[t].wait_p95) if t in mine and mine[t].wait_p95 is not None else None for t in times
        ]

    return {
        "window": window,
        "windows": list(WINDOWS),
        "sample": queries.LATENCY_SAMPLE,
        "kinds": [
            {
                "kind": kind,
                "sub": kind in sections,
                "now": live_by_kind.get(kind),
                "window": window_of(kind),
            }
            for kind in kinds
        ],
        "throughput": charts.line_chart(
            times=times,
            series=[charts.Series(kind, finished(kind)) for kind in kinds],
            unit=f"jobs finished per {bucket}",
            title=f"Throughput by kind, last {window}",
        ),
        "latency": charts.line_chart(
            times=times,
            series=[charts.Series(kind, waited(kind)) for kind in kinds],
            unit="seconds, 95th percentile",
            label=charts.seconds_label,
            legend=lambda present: "peak " + charts.seconds_label(max(present)),
            title=f"Wait before the first start by kind, last {window}",
        ),
    }


def queue_page(request: flask.Request, operator: str) -> flask.Response:
    context = queue_context(request)
    json_url = f"queue.json?window={context['window']}"
    return render("queue.html", **context, **chrome(operator, "queue", live=json_url))


def queue_live(request: flask.Request, operator: str) -> flask.Response:
    return live(REGIONS, {**queue_context(request), **chrome(operator, "queue")})

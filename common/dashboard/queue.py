"""The queue view: what waits and runs now, by kind (ready, scheduled for later, in flight, waiting on
sections, the oldest ready job's wait), and what finished over a window: throughput and the wait
before the first start, per kind and time bucket, with the window's percentiles."""

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
        finished_rows = queries.throughput(conn, since=since, step_seconds=step)
    sections = section_kinds()
    live_by_kind = {row.job_kind: row for row in now_rows}
    window_by_kind = {row.job_kind: row for row in finished_rows if row.at is None}
    buckets: dict[str, dict[datetime, Any]] = {}
    for row in finished_rows:
        if row.at is not None:
            buckets.setdefault(row.job_kind, {})[row.at] = row
    kinds = sorted(
        set(live_by_kind) | set(window_by_kind),
        key=lambda kind: (sections.get(kind, kind), kind in sections, kind),
    )

    def series(kind: str, column: str, empty: float | None) -> list[float | None]:
        mine = buckets.get(kind, {})
        return [
            float(getattr(mine[t], column)) if t in mine and getattr(mine[t], column) is not None else empty
            for t in times
        ]

    return {
        "window": window,
        "windows": list(WINDOWS),
        "kinds": [
            {
                "kind": kind,
                "sub": kind in sections,
                "now": live_by_kind.get(kind),
                "window": window_by_kind.get(kind),
            }
            for kind in kinds
        ],
        "throughput": charts.line_chart(
            times=times,
            series=[charts.Series(kind, series(kind, "finished", 0.0)) for kind in kinds],
            unit=f"jobs finished per {bucket}",
            title=f"Throughput by kind, last {window}",
        ),
        "latency": charts.line_chart(
            times=times,
            series=[charts.Series(kind, series(kind, "wait_p95", None)) for kind in kinds],
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

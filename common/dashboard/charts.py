"""Line charts drawn on the server as SVG: y gridlines at round values labelled with their unit,
time ticks along x, one polyline per series, a legend. No script and no inline style: series
colours are CSS classes (`s0`, `s1`, ...) of dashboard.css, so the CSP stays strict."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 28  # room for the y labels and the time ticks
MAX_SERIES = 6  # colours in dashboard.css


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]  # one per x; None: no data in that bucket (a gap in the line)


def nice_ticks(top: float, *, count: int = 4, whole: bool = False) -> list[float]:
    """0 and round steps (1, 2, 2.5 or 5 times a power of ten) up to at least `top`; `whole`: steps
    of at least 1 (counts)."""
    top = max(top, float(count) if whole else 0.0)
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw and (not whole or m * power >= 1))
    if whole and step != int(step):
        step = math.ceil(step)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


_TIME_STEPS = (60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 21600, 43200, 86400)


def time_ticks(top: float, *, count: int = 4) -> list[float]:
    """Like nice_ticks, but a minute or more steps by whole minutes and hours (1m, 2m, 5m, ... 1d)."""
    if top < 60:
        return nice_ticks(top, count=count)
    step = next(
        (s for s in _TIME_STEPS if top / s <= count), _TIME_STEPS[-1] * math.ceil(top / 86400 / count)
    )
    return [float(i * step) for i in range(math.ceil(top / step - 1e-9) + 1)]


def count_label(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


def seconds_label(value: float) -> str:
    """0, 0.25s, 1.5s, 45s, then 2m30s: a tick's own precision, never rounded to another tick's."""
    if value == 0:
        return "0"
    if value < 60:
        return f"{value:.3g}s"
    parts, rest = [], int(value)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts[:2])


def line_chart(
    *,
    times: Sequence[datetime],
    series: Sequence[Series],
    unit: str,
    label: Callable[[float], str] = count_label,
    legend: Callable[[list[float]], str] = lambda present: count_label(sum(present)),
    title: str,
) -> dict[str, Any]:
    """Everything _chart.html draws, in SVG coordinates. `unit` names the y axis (jobs / min, s)."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    values = [v for s in series for v in s.values if v is not None]
    top_value = max(values, default=0.0)
    ticks = (
        time_ticks(top_value) if label is seconds_label else nice_ticks(top_value, whole=label is count_label)
    )
    top = ticks[-1]
    step = plot_w / max(1, len(times) - 1)

    def y(value: float) -> float:
        return TOP + plot_h - value * plot_h / top

    lines = []
    for index, s in enumerate(series[:MAX_SERIES]):
        # A gap (None) splits the line: no point is drawn for a bucket without data.
        runs: list[list[str]] = [[]]
        for i, value in enumerate(s.values):
            if value is None:
                runs.append([])
            else:
                runs[-1].append(f"{LEFT + i * step:.1f},{y(value):.1f}")
        present = [v for v in s.values if v is not None]
        lines.append(
            {
                "name": s.name,
                "css": f"s{index}",
                "runs": [" ".join(run) for run in runs if run],
                "dots": [
                    {"x": f"{LEFT + i * step:.1f}", "y": f"{y(v):.1f}"}
                    for i, v in enumerate(s.values)
                    if v is not None and len(present) == 1
                ],
                "summary": legend(present) if present else "no data",
            }
        )
    every = max(1, math.ceil(len(times) / 6))  # at most 7 time labels, and "now" at the end
    labelled = [i for i in range(len(times)) if i % every == 0 and len(times) - 1 - i >= every / 2]
    return {
        "w": WIDTH,
        "h": HEIGHT,
        "title": title,
        "unit": unit,
        "left": LEFT,
        "right": WIDTH - RIGHT,
        "top": TOP,
        "bottom": TOP + plot_h,
        "grid": [{"y": f"{y(t):.1f}", "label": label(t)} for t in ticks],
        "xticks": [{"x": f"{LEFT + i * step:.1f}", "label": times[i].strftime("%H:%M")} for i in labelled]
        + ([{"x": f"{LEFT + (len(times) - 1) * step:.1f}", "label": "now"}] if times else []),
        "lines": lines,
        "empty": not values,
    }

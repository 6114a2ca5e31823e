"""The dashboard's charts: round gridlines with their unit's labels, time ticks, gaps for no data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from common.dashboard import charts


def test_counts_step_by_whole_round_numbers_and_durations_by_clock_units() -> None:
    assert charts.nice_ticks(1, whole=True) == [0, 1, 2, 3, 4]
    assert charts.nice_ticks(7300, whole=True) == [0, 2000, 4000, 6000, 8000]
    assert [charts.seconds_label(t) for t in charts.time_ticks(0.9)] == ["0", "0.25s", "0.5s", "0.75s", "1s"]
    assert [charts.seconds_label(t) for t in charts.time_ticks(420)] == ["0", "2m", "4m", "6m", "8m"]
    assert [charts.seconds_label(t) for t in charts.time_ticks(5000)] == ["0", "30m", "1h", "1h30m"]


def test_a_chart_has_labelled_gridlines_time_ticks_ending_now_and_gaps_where_no_data() -> None:
    start = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    times = [start + timedelta(minutes=i) for i in range(60)]
    chart = charts.line_chart(
        times=times,
        series=[
            charts.Series("done", [float(i % 7) for i in range(60)]),
            charts.Series("wait", [None] * 30 + [2.0] * 30),
        ],
        unit="jobs / min",
        title="t",
    )
    assert [g["label"] for g in chart["grid"]] == ["0", "2", "4", "6"]
    labels = [t["label"] for t in chart["xticks"]]
    assert labels[0] == "12:00" and labels[-1] == "now" and len(labels) <= 8
    done, wait = chart["lines"]
    assert len(done["runs"]) == 1 and len(done["runs"][0].split()) == 60
    assert len(wait["runs"]) == 1 and len(wait["runs"][0].split()) == 30  # no line through the gap
    assert done["summary"] == f"{sum(i % 7 for i in range(60)):,}"
    empty = charts.line_chart(times=times, series=[charts.Series("x", [None] * 60)], unit="s", title="t")
    assert empty["empty"] is True

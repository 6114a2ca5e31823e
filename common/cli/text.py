"""How the operator commands print: tables, a job's detail, the stats summary."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from common.jobs import ops
from common.jobs.ops import STATUSES


def ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    return ops.format_duration((datetime.now(UTC) - value).total_seconds())


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def jobs_table(jobs: Sequence[Any]) -> str:
    rows = []
    for job in jobs:
        error = ""
        if job.error_json:
            error = f"{job.error_json.get('code')}: {job.error_json.get('message')}"
            error = error if len(error) <= 50 else error[:47] + "..."
        rows.append(
            [
                str(job.id),
                job.job_kind,
                job.status,
                job.user_id or "-",
                f"{job.attempts}/{job.max_attempts}",
                ago(job.created_at),
                ago(job.updated_at),
                error,
            ]
        )
    return table(["JOB ID", "KIND", "STATUS", "USER", "ATTEMPTS", "AGE", "UPDATED", "ERROR"], rows)


def job_text(detail: dict[str, Any]) -> str:
    def stamp(key: str) -> str:
        value = detail[key]
        return "-" if value is None else f"{value} ({ago(datetime.fromisoformat(value))} ago)"

    lines = [
        ("job", detail["job_id"]),
        ("kind", detail["job_kind"]),
        ("status", detail["status"]),
        ("user", detail["user_id"] or "-"),
        (
            "attempts",
            f"{detail['attempts']} of {detail['max_attempts']}"
            + (
                f" ({detail['deferrals']} deferred, {detail['waited_seconds']:.0f}s waited)"
                if detail["deferrals"]
                else ""
            ),
        ),
        ("next", detail["next_attempt_at"] or "-"),
        ("created", stamp("created_at")),
        ("dispatched", stamp("dispatched_at")),
        ("started", stamp("started_at")),
        ("completed", stamp("completed_at")),
        ("lease until", detail["lease_expires_at"] or "-"),
    ]
    if detail["started_at"] and detail["completed_at"]:
        took = datetime.fromisoformat(detail["completed_at"]) - datetime.fromisoformat(detail["started_at"])
        lines.append(("took", ops.format_duration(took.total_seconds())))
    text = "\n".join(f"{k:<12}{v}" for k, v in lines)
    if "parent_id" in detail:
        text += f"\n{'section':<12}{detail['section_index']} of job {detail['parent_id']}"
    for key in ("request", "error", "result"):
        body = "-" if detail[key] is None else json.dumps(detail[key], indent=2, ensure_ascii=False)
        text += f"\n{key:<12}" + body.replace("\n", "\n" + " " * 12)
    if "attempt_history" in detail:
        rows = [
            [
                str(a["attempt"]),
                a["outcome"],
                a["started_at"] or "-",
                "-" if a["seconds"] is None else ops.format_duration(a["seconds"]),
                a["error_code"] or "",
                a["instance"] or "",
            ]
            for a in detail["attempt_history"]
        ]
        text += "\nhistory\n" + table(["#", "OUTCOME", "STARTED", "TOOK", "ERROR", "INSTANCE"], rows)
        for a in detail["attempt_history"]:
            if a["error_detail"]:
                raw = a["error_detail"].rstrip().replace("\n", "\n" + " " * 12)
                text += f"\n{'attempt ' + str(a['attempt']):<12}{raw}"
    if "usage" in detail:
        text += model_calls_text(detail["usage"], detail["model_calls"])
    if "sections" in detail:
        rows = [
            [
                str(s["section_index"]),
                s["job_id"],
                s["status"],
                f"{s['attempts']}/{s['max_attempts']}",
                (s["heading"] or "")[:40],
                s["error"]["code"] if s["error"] else "",
            ]
            for s in detail["sections"]
        ]
        done = sum(1 for s in detail["sections"] if s["status"] == "done")
        text += f"\nsections    {done} of {len(rows)} done\n"
        text += table(["#", "SECTION JOB", "STATUS", "ATTEMPTS", "HEADING", "ERROR"], rows)
    return text


def stats_text(summary: dict[str, Any]) -> str:

    rows = [
        [kind, *(str(c[s]) for s in STATUSES), str(sum(c.values()))] for kind, c in summary["counts"].items()
    ]
    out = [table(["KIND", *(s.upper() for s in STATUSES), "TOTAL"], rows) if rows else "No jobs."]
    oldest = summary["oldest_queued"]
    out.append(
        "oldest queued: -"
        if oldest is None
        else f"oldest queued: {ops.format_duration(oldest['age_seconds'])} ({oldest['job_kind']} {oldest['job_id']})"
    )
    hour = summary["last_hour"]
    finished = hour["done"] + hour["error"]
    rate = "-" if hour["error_rate"] is None else f"{hour['error_rate']:.1%}"
    out.append(f"error rate, last hour: {rate} ({hour['error']} error of {finished} finished)")
    return "\n".join(out)


def model_calls_text(usage: dict[str, Any], calls: Sequence[dict[str, Any]]) -> str:
    """The job's usage line and, when it made any, its model calls as a table."""
    cost = "" if usage["estimated_cost_usd"] is None else f", ~${usage['estimated_cost_usd']:.4f}"
    text = (
        f"\n{'usage':<12}{usage['calls']} model calls, {usage['input_tokens']} input + "
        f"{usage['output_tokens']} output tokens{cost}"
    )
    if not calls:
        return text
    rows = [
        [
            c["started_at"][11:23],
            c["model"],
            c["purpose"] + ("" if c["section_index"] is None else f" {c['section_index']}"),
            str(c["attempt"] or "-"),
            c["outcome"],
            f"{c['input_tokens'] or 0}+{c['output_tokens'] or 0}",
            "-" if c["latency_ms"] is None else f"{c['latency_ms']} ms",
            c["error_code"] or "",
        ]
        for c in calls
    ]
    return (
        text
        + "\n"
        + table(["STARTED", "MODEL", "CALL", "ATTEMPT", "OUTCOME", "TOKENS", "LATENCY", "ERROR"], rows)
    )

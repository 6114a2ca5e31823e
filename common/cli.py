"""Operator commands: `python -m common.cli migrate`, `jobs list|show|retry|cancel|stats` (logic in
common.jobs.ops), `users show|set-tier` and `archive [--dry-run]` (logic in common.lessons.archive).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from common.accounts import tiers, users
from common.accounts.settings import tier_settings
from common.accounts.tiers import usage_view
from common.jobs import ops
from common.jobs.ops import STATUSES
from common.lessons.archive import algorithm as archive
from common.lessons.kind import LessonKind
from common.models import ledger
from common.platform.config import for_tools
from common.platform.db import connection, named_errors
from common.platform.errors import DylenError, ValidationFailed
from common.platform.log import logger


def migrate(revision: str = "head") -> None:
    # Lazily: the migrations module loads SQLAlchemy and Alembic, which no other command needs.
    from common.platform.db.migrate import migrate as upgrade

    upgrade(revision)


# --- users and archive (lesson history limits) ----------------------------------------------------


def set_tier(args: argparse.Namespace) -> int:
    with named_errors():  # the dashboard's "set tier" runs the same
        limit = tiers.set_tier(args.uid, args.tier)
    print(f"{args.uid}: tier {args.tier} (keeps the newest {limit} lessons)")
    return 0


def show_user(args: argparse.Namespace) -> int:
    with named_errors(), connection() as conn:
        usage = users.usage(conn, user_id=args.uid, job_kind=LessonKind.kind)
    if usage.tier is None:
        print(f"error: no user {args.uid!r} (users appear on their first request)", file=sys.stderr)
        return 1
    with named_errors(), connection() as conn:
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        models = ledger.user_usage(conn, args.uid, since=today)
    view = usage_view(usage)
    daily, active = view["daily"], view["active"]
    print(f"user     {args.uid}")
    print(f"tier     {view['tier']}")
    print(f"history  keeps the newest {tiers.history_limit(view['tier'])} lessons")
    print(f"daily    {daily['used']} of {daily['limit']} lesson jobs (resets {daily['resets_at']})")
    print(f"active   {active['used']} of {active['limit']} lesson jobs queued or running")
    print(f"models   {models.text()} today (UTC)")
    return 0


def archive_lessons(args: argparse.Namespace) -> int:
    limits = tier_settings().history_limits
    if args.dry_run:
        rows = archive.preview(limits)
        print(f"{'tier':<12} {'limit':>6} {'users over':>11} {'lessons to archive':>19}")
        for row in rows:
            limit = limits.get(row.tier, limits["free"])
            note = "" if row.tier in limits else "  (not in the map: free's limit)"
            print(f"{row.tier:<12} {limit:>6} {row.users_over_limit:>11} {row.lessons:>19}{note}")
        total = sum(row.lessons for row in rows)
        print(f"total: {total} lessons of {sum(row.users_over_limit for row in rows)} users (dry run)")
        return 0
    report = archive.archive_over_limit(limits)
    print(
        f"archived {report.lessons_archived} lessons of {report.users_over_limit} users "
        f"in {report.batches} batches, {report.seconds:.1f}s"
    )
    return 0


def add_archive_commands(sub: Any) -> None:
    p_users = sub.add_parser("users", help="manage users")
    users_sub = p_users.add_subparsers(dest="users_command", required=True)
    p_tier = users_sub.add_parser("set-tier", help="set a user's tier (one of DYLEN_TIER_HISTORY_LIMITS)")
    p_tier.add_argument("uid")
    p_tier.add_argument("tier")
    p_tier.set_defaults(run=set_tier)
    p_show = users_sub.add_parser("show", help="a user's tier, lesson quota usage and limits")
    p_show.add_argument("uid")
    p_show.set_defaults(run=show_user)
    p_archive = sub.add_parser("archive", help="archive lessons beyond each user's tier limit now")
    p_archive.add_argument("--dry-run", action="store_true", help="print what would be archived per tier")
    p_archive.set_defaults(run=archive_lessons)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_migrate = sub.add_parser("migrate", help="upgrade the configured database to the latest schema")
    p_migrate.add_argument("revision", nargs="?", default="head")
    add_jobs_parser(sub)
    add_archive_commands(sub)
    args = parser.parse_args(argv)
    for_tools()  # operator commands never authenticate users or tasks: no auth settings needed
    try:
        if args.command == "migrate":
            migrate(args.revision)
            print(f"migrated to {args.revision}")
        elif args.command == "jobs":
            return run_jobs(args)
        elif getattr(args, "run", None) is not None:
            return int(args.run(args))
    except DylenError as error:
        print(f"error: {error.detail}", file=sys.stderr)
        return 2
    return 0


# --- jobs: list | show | retry | cancel | stats ----------------------------------------------------

EXIT_ABORTED = 1
EXIT_DISPATCH_FAILED = 3


def add_jobs_parser(sub: Any) -> None:
    p_jobs = sub.add_parser("jobs", help="inspect, retry and cancel jobs")
    jobs_sub = p_jobs.add_subparsers(dest="jobs_command", required=True)

    def filters(p: argparse.ArgumentParser, *, since: bool) -> None:
        p.add_argument("--status", action="append", help="queued|running|done|error|canceled (repeat or a,b)")
        p.add_argument("--kind", action="append", help="job kind, e.g. lesson (repeat or a,b)")
        p.add_argument("--user", help="only this user's jobs")
        if since:
            p.add_argument("--since", metavar="DURATION", help="finished within, e.g. 1h")
        else:
            p.add_argument("--older-than", metavar="DURATION", help="created longer ago than, e.g. 10m")

    p_list = jobs_sub.add_parser("list", help="jobs, newest first")
    filters(p_list, since=False)
    p_list.add_argument("--limit", type=int, default=50)
    p_list.add_argument("--json", action="store_true", help="one JSON array instead of a table")

    p_show = jobs_sub.add_parser("show", help="one job: attempts, timings, error, result")
    p_show.add_argument("job_id")
    p_show.add_argument("--json", action="store_true")

    p_retry = jobs_sub.add_parser("retry", help="error/canceled job(s) back to queued, and dispatch")
    p_retry.add_argument("job_id", nargs="?")
    filters(p_retry, since=True)
    p_retry.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    p_cancel = jobs_sub.add_parser("cancel", help="a queued or running job -> canceled")
    p_cancel.add_argument("job_id")

    p_stats = jobs_sub.add_parser("stats", help="counts by kind and status, oldest queued, error rate")
    p_stats.add_argument("--json", action="store_true")


class _Stderr:
    """Whatever sys.stderr is at write time (log lines from dispatcher threads come late)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def run_jobs(args: argparse.Namespace) -> int:
    for handler in logger.handlers:  # stdout is the command's output (e.g. --json); logs go to stderr
        if type(handler) is logging.StreamHandler:  # common.platform.log's own, not a test harness's
            handler.stream = _Stderr()  # not setStream: it flushes the old stream, which may be closed
    command = args.jobs_command
    if command == "list":
        filters = ops.Filters(args.status, args.kind, args.user, older_than=args.older_than)
        jobs = ops.list_jobs(filters, limit=args.limit)
        if args.json:
            print(json.dumps([ops.job_detail(j) for j in jobs], indent=2, ensure_ascii=False))
        else:
            print(_jobs_table(jobs) if jobs else "No jobs match.")
    elif command == "show":
        job, sections = ops.show_job(args.job_id)
        detail = {**ops.job_detail(job, sections), **_model_calls(job)}
        print(json.dumps(detail, indent=2, ensure_ascii=False) if args.json else _job_text(detail))
    elif command == "cancel":
        job = ops.cancel_job(args.job_id)
        print(f"canceled {job.id} ({job.job_kind})")
    elif command == "retry":
        return _retry(args)
    elif command == "stats":
        summary = ops.stats()
        print(json.dumps(summary, indent=2) if args.json else _stats_text(summary))
    return 0


def _model_calls(job: Any) -> dict[str, Any]:
    """The job's model calls from the ledger (a section's: its lesson's calls for that section)."""
    with named_errors(), connection() as conn:
        calls = ledger.job_calls(conn, job.parent_id or job.id)
    if job.parent_id is not None:
        calls = [c for c in calls if c.section_index == job.section_index]
    usage = ledger.usage_of(calls)
    return {
        "usage": {**usage.view(), "estimated_cost_usd": usage.cost},
        "model_calls": [c.view() for c in calls],
    }


def _retry(args: argparse.Namespace) -> int:

    has_filters = any((args.status, args.kind, args.user, args.since))
    if args.job_id is not None:
        if has_filters:
            raise ValidationFailed("Give either a job id or filters, not both.")
        outcome = ops.retry_job(args.job_id)
    else:
        candidates = ops.retry_candidates(ops.Filters(args.status, args.kind, args.user, since=args.since))
        if not candidates:
            print("No jobs match; nothing to retry.")
            return 0
        print(f"{len(candidates)} job(s) match:")
        print(_jobs_table(candidates[:20]))
        if len(candidates) > 20:
            print(f"... and {len(candidates) - 20} more")
        if not args.yes and not _confirm(f"Retry {len(candidates)} job(s)? [y/N] "):
            print("Aborted; nothing was retried.", file=sys.stderr)
            return EXIT_ABORTED
        outcome = ops.retry_jobs([j.id for j in candidates])
        if len(outcome.jobs) < len(candidates):  # changed since listed (e.g. retried by someone else)
            print(f"{len(candidates) - len(outcome.jobs)} job(s) were no longer error or canceled; skipped")
    rerun: dict[Any, int] = {}
    for section in outcome.sections:
        rerun[section.parent_id] = rerun.get(section.parent_id, 0) + 1
    for job in outcome.jobs:
        sections = f"; {rerun[job.id]} unfinished section(s) re-run" if job.id in rerun else ""
        print(f"requeued {job.id} (attempts {job.attempts}, now up to {job.max_attempts}{sections})")
    for job, delivery in zip(outcome.to_dispatch, outcome.deliveries, strict=False):
        what = f"section {job.section_index} of {job.parent_id}" if job.parent_id else str(job.id)
        print(f"{'dispatched' if delivery.ok else 'NOT dispatched'} {what}: {delivery.detail}")
    print(f"retried {len(outcome.jobs)} job(s)", end="")
    if not outcome.dispatch_enabled:
        print("; not dispatched (DYLEN_JOBS_AUTO_PROCESS=false): rescue_jobs or a delivery runs them")
        return 0
    failed = len(outcome.to_dispatch) - outcome.dispatched
    print(
        f"; dispatched {outcome.dispatched}" + (f", {failed} left queued for rescue_jobs" if failed else "")
    )
    if failed:
        print(
            "error: some dispatches failed (see above); check DYLEN_PROCESS_JOB_URL and DYLEN_TASK_SECRET "
            "(make run prints both), or let rescue_jobs retry them",
            file=sys.stderr,
        )
        return EXIT_DISPATCH_FAILED
    return 0


def _confirm(prompt: str) -> bool:
    try:
        answer = input(prompt)
    except (EOFError, KeyboardInterrupt):  # no stdin: never assume yes
        print(file=sys.stderr)
        return False
    return answer.strip().lower() in ("y", "yes")


def _ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    return ops.format_duration((datetime.now(UTC) - value).total_seconds())


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _jobs_table(jobs: Sequence[Any]) -> str:
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
                _ago(job.created_at),
                _ago(job.updated_at),
                error,
            ]
        )
    return _table(["JOB ID", "KIND", "STATUS", "USER", "ATTEMPTS", "AGE", "UPDATED", "ERROR"], rows)


def _job_text(detail: dict[str, Any]) -> str:
    def stamp(key: str) -> str:
        value = detail[key]
        return "-" if value is None else f"{value} ({_ago(datetime.fromisoformat(value))} ago)"

    lines = [
        ("job", detail["job_id"]),
        ("kind", detail["job_kind"]),
        ("status", detail["status"]),
        ("user", detail["user_id"] or "-"),
        ("attempts", f"{detail['attempts']} of {detail['max_attempts']}"),
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
    usage = detail["usage"]
    cost = "" if usage["estimated_cost_usd"] is None else f", ~${usage['estimated_cost_usd']:.4f}"
    text += (
        f"\n{'usage':<12}{usage['calls']} model calls, {usage['input_tokens']} input + "
        f"{usage['output_tokens']} output tokens{cost}"
    )
    if detail["model_calls"]:
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
            for c in detail["model_calls"]
        ]
        text += "\n" + _table(
            ["STARTED", "MODEL", "CALL", "ATTEMPT", "OUTCOME", "TOKENS", "LATENCY", "ERROR"], rows
        )
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
        text += _table(["#", "SECTION JOB", "STATUS", "ATTEMPTS", "HEADING", "ERROR"], rows)
    return text


def _stats_text(summary: dict[str, Any]) -> str:

    rows = [
        [kind, *(str(c[s]) for s in STATUSES), str(sum(c.values()))] for kind, c in summary["counts"].items()
    ]
    out = [_table(["KIND", *(s.upper() for s in STATUSES), "TOTAL"], rows) if rows else "No jobs."]
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


if __name__ == "__main__":
    sys.exit(main())

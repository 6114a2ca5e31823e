"""Operator commands: `python -m common.cli migrate`, `jobs list|show|retry|cancel|stats` (logic in
common.jobs.ops), `users show|set-tier|refund` and `archive [--dry-run]` (logic in common.lessons.archive).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from common.accounts import tiers, users
from common.accounts.settings import tier_settings
from common.accounts.tiers import usage_view
from common.cli import text
from common.jobs import ops
from common.lessons.archive import algorithm as archive
from common.lessons.kind import LessonKind
from common.models import ledger
from common.platform.config import for_tools
from common.platform.db import connection, named_errors
from common.platform.errors import DylenError, ValidationFailed
from common.platform.log import logger


def migrate(args: argparse.Namespace) -> int:
    # Lazily: the migrations module loads SQLAlchemy and Alembic, which no other command needs.
    from common.platform.db.migrate import migrate as upgrade

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        granted = upgrade(
            args.revision, grant_to=args.grant_to, wait_seconds=args.wait_for_database, report=report
        )
    except DylenError:
        raise
    except Exception as error:
        # deploy.sh shows the migration job's last log lines: the traceback, then this one line.
        traceback.print_exc()
        print(f"error: migration failed: {type(error).__name__}: {error}", file=sys.stderr)
        if "permission denied for schema public" in str(error):
            print(
                "hint: the migrating user needs CREATE on schema public (PostgreSQL 15+ gives ordinary "
                "users none); deploy.sh gives the migration job's IAM user the cloudsqlsuperuser role",
                file=sys.stderr,
            )
        return 1
    print(f"migrated to {args.revision}")
    for sql in granted:
        print(sql)
    return 0


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
    daily, active, tokens = view["daily"], view["active"], view["tokens"]
    print(f"user     {args.uid}")
    print(f"tier     {view['tier']}")
    print(f"history  keeps the newest {tiers.history_limit(view['tier'])} lessons")
    print(f"daily    {daily['used']} of {daily['limit']} lesson jobs (resets {daily['resets_at']})")
    print(f"active   {active['used']} of {active['limit']} lesson jobs queued, running or mid-call")
    print(f"tokens   {tokens['used']} of {tokens['limit']} model tokens today (UTC)")
    print(f"models   {models.text()} today (UTC)")
    return 0


def refund(args: argparse.Namespace) -> int:
    with named_errors():
        granted = tiers.refund(args.uid, job_kind=LessonKind.kind, jobs=args.jobs, tokens=args.tokens)
    print(
        f"{args.uid}: gave back {granted.jobs} lesson jobs and {granted.tokens} tokens of today (UTC)"
        + ("" if (granted.jobs, granted.tokens) == (args.jobs, args.tokens) else " (all the day counted)")
    )
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
    p_refund = users_sub.add_parser(
        "refund", help="give back today's quota (lesson jobs, tokens) when a failure was ours"
    )
    p_refund.add_argument("uid")
    p_refund.add_argument("--jobs", type=int, required=True, help="lesson jobs to give back")
    p_refund.add_argument("--tokens", type=int, default=0, help="model tokens to give back")
    p_refund.set_defaults(run=refund)
    p_archive = sub.add_parser("archive", help="archive lessons beyond each user's tier limit now")
    p_archive.add_argument("--dry-run", action="store_true", help="print what would be archived per tier")
    p_archive.set_defaults(run=archive_lessons)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_migrate = sub.add_parser("migrate", help="upgrade the configured database to the latest schema")
    p_migrate.add_argument("revision", nargs="?", default="head")
    p_migrate.add_argument(
        "--grant-to",
        action="append",
        default=[],
        metavar="USER",
        help="after migrating, let this database user read and write the tables (repeat)",
    )
    p_migrate.add_argument(
        "--wait-for-database",
        type=float,
        default=0,
        metavar="SECONDS",
        help="retry the first connection this long (a new identity's IAM roles take minutes)",
    )
    p_migrate.set_defaults(run=migrate)
    add_jobs_parser(sub)
    add_archive_commands(sub)
    args = parser.parse_args(argv)
    for_tools()  # operator commands never authenticate users or tasks: no auth settings needed
    try:
        if args.command == "jobs":
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
            print(text.jobs_table(jobs) if jobs else "No jobs match.")
    elif command == "show":
        shown = ops.show_job(args.job_id)
        detail = {**ops.job_detail(shown.job, shown.sections, shown.attempts), **_model_calls(shown.job)}
        print(json.dumps(detail, indent=2, ensure_ascii=False) if args.json else text.job_text(detail))
    elif command == "cancel":
        job = ops.cancel_job(args.job_id)
        print(f"canceled {job.id} ({job.job_kind})")
    elif command == "retry":
        return _retry(args)
    elif command == "stats":
        summary = ops.stats()
        print(json.dumps(summary, indent=2) if args.json else text.stats_text(summary))
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
        print(text.jobs_table(candidates[:20]))
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

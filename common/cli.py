"""Operator commands: `python -m common.cli migrate`, `users set-tier`, `archive [--dry-run]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.errors import DylenError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def migrate(revision: str = "head") -> None:
    from alembic import command
    from alembic.config import Config

    from common.db import get_engine

    if not MIGRATIONS_DIR.is_dir():
        raise DylenError(f"migrations/ not found at {MIGRATIONS_DIR}; run from a repository checkout")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with get_engine().begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


# --- users and archive (lesson history limits) ----------------------------------------------------


def set_tier(args: argparse.Namespace) -> int:
    from common import store
    from common.config import get_settings
    from common.db import transaction

    tiers = get_settings().tier_history_limits
    if args.tier not in tiers:
        print(
            f"error: unknown tier {args.tier!r}; DYLEN_TIER_HISTORY_LIMITS defines: {', '.join(tiers)}",
            file=sys.stderr,
        )
        return 2
    with transaction() as conn:
        found = store.set_user_tier(conn, user_id=args.uid, tier=args.tier)
    if not found:
        print(f"error: no user {args.uid!r} (users appear on their first request)", file=sys.stderr)
        return 1
    print(f"{args.uid}: tier {args.tier} (keeps the newest {tiers[args.tier]} lessons)")
    return 0


def archive_lessons(args: argparse.Namespace) -> int:
    from common import archive
    from common.config import get_settings

    limits = get_settings().tier_history_limits
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
    p_archive = sub.add_parser("archive", help="archive lessons beyond each user's tier limit now")
    p_archive.add_argument("--dry-run", action="store_true", help="print what would be archived per tier")
    p_archive.set_defaults(run=archive_lessons)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_migrate = sub.add_parser("migrate", help="upgrade the configured database to the latest schema")
    p_migrate.add_argument("revision", nargs="?", default="head")
    add_archive_commands(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "migrate":
            migrate(args.revision)
            print(f"migrated to {args.revision}")
        elif getattr(args, "run", None) is not None:
            return int(args.run(args))
    except DylenError as error:
        print(f"error: {error.detail}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

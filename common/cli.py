"""Operator commands: `python -m common.cli migrate` (more subcommands join as they are built)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_migrate = sub.add_parser("migrate", help="upgrade the configured database to the latest schema")
    p_migrate.add_argument("revision", nargs="?", default="head")
    args = parser.parse_args(argv)
    try:
        if args.command == "migrate":
            migrate(args.revision)
            print(f"migrated to {args.revision}")
    except DylenError as error:
        print(f"error: {error.detail}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

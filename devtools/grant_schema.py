"""Give the database users of a deployment the rights migrations need on schema `public`.

    python -m devtools.grant_schema USER [USER ...]

PostgreSQL 15 took CREATE on `public` away from ordinary users, and Cloud SQL IAM users (and a
password user you created) are ordinary users, so `python -m common.cli migrate` as the runtime's
user fails with "permission denied for schema public" on a new database. deploy.sh runs this once
per deployment as the instance's built-in `postgres` user (a member of cloudsqlsuperuser):

    GRANT USAGE, CREATE ON SCHEMA public TO "<user>"

Connection: DYLEN_DATABASE_URL when set (any PostgreSQL; the tests use it), else Cloud SQL through
the Python connector with DYLEN_CLOUD_SQL_INSTANCE and DYLEN_DB_NAME. The admin user is
DYLEN_DB_ADMIN_USER (default postgres) with DYLEN_DB_ADMIN_PASSWORD, read from the environment only
and never printed. Re-running it is harmless: granting a right a user holds changes nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Any
from urllib.parse import unquote, urlsplit

import pg8000.native


def statements(users: list[str]) -> list[str]:
    return [f"GRANT USAGE, CREATE ON SCHEMA public TO {pg8000.native.identifier(user)}" for user in users]


def _connect() -> Any:
    url = os.environ.get("DYLEN_DATABASE_URL")
    if url:
        parts = urlsplit(url)
        return pg8000.native.Connection(
            unquote(parts.username or "postgres"),
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            database=unquote(parts.path.lstrip("/")) or None,
            password=unquote(parts.password) if parts.password else None,
            timeout=30,
        )
    instance = os.environ.get("DYLEN_CLOUD_SQL_INSTANCE")
    password = os.environ.get("DYLEN_DB_ADMIN_PASSWORD")
    if not instance or not password:
        raise SystemExit(
            "grant_schema: set DYLEN_CLOUD_SQL_INSTANCE and DYLEN_DB_ADMIN_PASSWORD "
            "(the built-in postgres user's password), or DYLEN_DATABASE_URL"
        )
    from google.cloud.sql.connector import Connector

    connector = Connector()
    connection = connector.connect(
        instance,
        "pg8000",
        user=os.environ.get("DYLEN_DB_ADMIN_USER") or "postgres",
        password=password,
        db=os.environ.get("DYLEN_DB_NAME") or "dylen",
    )
    connection.autocommit = True
    return _DbApi(connection, connector)


class _DbApi:
    """The connector hands back a DB-API connection; give it `run` and `close` like pg8000.native's."""

    def __init__(self, connection: Any, connector: Any) -> None:
        self.connection = connection
        self.connector = connector

    def run(self, sql: str) -> None:
        cursor = self.connection.cursor()
        cursor.execute(sql)
        cursor.close()

    def close(self) -> None:
        self.connection.close()
        self.connector.close()


def main(argv: list[str]) -> int:
    users = list(dict.fromkeys(argv[1:]))
    if not users:
        raise SystemExit("usage: python -m devtools.grant_schema USER [USER ...]")
    connection = _connect()
    try:
        for sql in statements(users):
            connection.run(sql)
            print(sql, flush=True)
    finally:
        connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Alembic environment: migrates the database the configuration points at (URL or Cloud SQL)."""

from __future__ import annotations

from alembic import context

from common.db import sqlalchemy_engine
from common.models import metadata

target_metadata = metadata


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = sqlalchemy_engine()
    try:
        with engine.connect() as conn:
            context.configure(connection=conn, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("Offline (SQL script) migrations are not supported; run `python -m common.cli migrate`.")
run_migrations_online()

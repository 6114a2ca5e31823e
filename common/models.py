"""Table definitions (SQLAlchemy Core). The schema itself changes only through Alembic migrations."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    Text,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

JOB_STATUSES = ("queued", "running", "done", "error", "canceled")
FINAL_STATUSES = ("done", "error", "canceled")

users = Table(
    "users",
    metadata,
    Column("id", Text, primary_key=True),
    Column("tier", Text, nullable=False, server_default="free"),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Text, ForeignKey("users.id"), nullable=True),
    Column("job_kind", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("idempotency_key", Text, nullable=False),
    Column("request_json", JSONB, nullable=False),
    Column("result_json", JSONB),
    Column("error_json", JSONB),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("dispatched_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True)),
)

lessons = Table(
    "lessons",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Text, ForeignKey("users.id"), nullable=False),
    Column("job_id", Uuid, ForeignKey("jobs.id"), nullable=False, unique=True),
    Column("topic", Text, nullable=False),
    Column("title", Text, nullable=False),
    Column("content", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("archived_at", DateTime(timezone=True)),
)

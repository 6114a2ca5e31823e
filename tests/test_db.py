"""The database layer's own behaviour: the autocommit and transaction helpers."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from common import db as common_db


def test_transaction_rolls_back_everything_on_error(app_env: dict[str, str], db: sa.Engine) -> None:
    user = f"tx-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError), common_db.transaction() as conn:
        conn.execute(sa.text("INSERT INTO users (id) VALUES (:u)"), {"u": user})
        raise RuntimeError("boom")
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users WHERE id = :u"), {"u": user}).scalar() == 0


def test_transaction_commits_on_success_and_connection_autocommits(
    app_env: dict[str, str], db: sa.Engine
) -> None:
    a, b = f"tx-{uuid.uuid4().hex[:8]}", f"ac-{uuid.uuid4().hex[:8]}"
    with common_db.transaction() as conn:
        conn.execute(sa.text("INSERT INTO users (id) VALUES (:u)"), {"u": a})
    with common_db.connection() as conn:
        conn.execute(sa.text("INSERT INTO users (id) VALUES (:u)"), {"u": b})
        # Autocommit: visible to another connection before this one is returned.
        with db.connect() as other:
            assert other.execute(sa.text("SELECT count(*) FROM users WHERE id = :u"), {"u": b}).scalar() == 1
    with db.connect() as conn:
        assert (
            conn.execute(
                sa.text("SELECT count(*) FROM users WHERE id IN (:a, :b)"), {"a": a, "b": b}
            ).scalar()
            == 2
        )


def test_unreachable_database_is_database_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.errors import DatabaseUnavailable
    from tests.support import free_port

    monkeypatch.setenv("DYLEN_AUTH_MODE", "dev")
    monkeypatch.setenv("DYLEN_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    monkeypatch.setenv("DYLEN_DB_CONNECT_TIMEOUT_SECONDS", "1")
    common_db.dispose_engine()
    try:
        with pytest.raises(DatabaseUnavailable), common_db.connection() as conn:
            conn.execute(sa.text("SELECT 1"))
    finally:
        common_db.dispose_engine()

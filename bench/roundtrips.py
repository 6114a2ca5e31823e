"""Count database round trips, statements and transactions per request of create_job and process_job.

Runs the real entry points in-process (Flask request contexts, the real engine on a real database)
and counts at the wire: every pg8000 socket flush is one client->server round trip.

    PYTHONPATH=. .venv/bin/python -m bench.roundtrips --database-url postgresql://...
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Counts:
    round_trips: int = 0
    statements: int = 0
    transactions: int = 0
    sql: list[str] = field(default_factory=list)


def measure(database_url: str, *, repeats: int = 20) -> dict[str, Any]:
    os.environ.update(
        DYLEN_DATABASE_URL=database_url,
        DYLEN_AUTH_MODE="dev",
        DYLEN_TASK_SECRET="bench",
        DYLEN_JOBS_AUTO_PROCESS="false",
        DYLEN_ENV_FILE=os.devnull,
        DYLEN_LOG_LEVEL="WARNING",
    )
    import flask
    import pg8000.core

    from common.db import get_pool

    counts = Counts()
    real_flush = pg8000.core._flush

    def counting_flush(sock: Any) -> None:
        counts.round_trips += 1
        real_flush(sock)

    pg8000.core._flush = counting_flush  # type: ignore[attr-defined]
    get_pool()

    in_transaction = False

    def record(statement: str) -> None:
        # The engine is in autocommit: a statement outside BEGIN..COMMIT is a transaction of its own.
        nonlocal in_transaction
        keyword = statement.strip().upper()
        if keyword == "BEGIN":
            in_transaction = True
            counts.transactions += 1
        elif keyword in ("COMMIT", "ROLLBACK"):
            in_transaction = False
        else:
            counts.statements += 1
            counts.sql.append(" ".join(statement.split())[:60])
            if not in_transaction:
                counts.transactions += 1

    # Counted at the driver: common.db runs statements on pg8000 directly, and prepared ones through
    # its own Bind/Execute/Sync exchange (common.db._execute_prepared).
    import common.db

    core = pg8000.core.CoreConnection
    simple, unnamed, named = core.execute_simple, core.execute_unnamed, common.db._execute_prepared

    def execute_simple(self: Any, statement: str) -> Any:
        record(statement)
        return simple(self, statement)

    def execute_unnamed(self: Any, statement: str, *args: Any, **kwargs: Any) -> Any:
        record(statement)
        return unnamed(self, statement, *args, **kwargs)

    def execute_prepared(con: Any, name: bytes, params: Any, columns: Any, funcs: Any, statement: str) -> Any:
        record(statement)
        return named(con, name, params, columns, funcs, statement)

    core.execute_simple = execute_simple  # type: ignore[method-assign]
    core.execute_unnamed = execute_unnamed  # type: ignore[method-assign]
    common.db._execute_prepared = execute_prepared

    create = runpy.run_path("functions/create_job/main.py")["create_job"]
    process = runpy.run_path("functions/process_job/main.py")["process_job"]
    app = flask.Flask(__name__, root_path=os.getcwd())

    def call(fn: Any, **kwargs: Any) -> flask.Response:
        with app.test_request_context(**kwargs):
            return fn(flask.request)  # type: ignore[no-any-return]

    def create_one() -> str:
        body = {
            "job_kind": "lesson",
            "idempotency_key": uuid.uuid4().hex,
            "payload": {"topic": "Round trips"},
        }
        response = call(create, method="POST", path="/", json=body, headers={"X-Dylen-User": "bench-rt"})
        assert response.status_code == 202, response.get_data()
        return str(json.loads(response.get_data())["job_id"])

    def process_one(job_id: str) -> None:
        response = call(
            process,
            method="POST",
            path="/",
            json={"job_id": job_id},
            headers={"X-Dylen-Task-Secret": "bench"},
        )
        assert response.status_code == 200, response.get_data()

    process_one(create_one())  # warm: engine, pool, statement caches
    results: dict[str, Any] = {}
    for name in ("create_job", "process_job"):
        totals = Counts()
        for _ in range(repeats):
            job_id = create_one() if name == "process_job" else None
            counts.round_trips = counts.statements = counts.transactions = 0
            counts.sql = []
            if name == "create_job":
                create_one()
            else:
                assert job_id is not None
                process_one(job_id)
            totals.round_trips += counts.round_trips
            totals.statements += counts.statements
            totals.transactions += counts.transactions
            last_sql = list(counts.sql)
        results[name] = {
            "round_trips": totals.round_trips / repeats,
            "statements": totals.statements / repeats,
            "transactions": totals.transactions / repeats,
            "statements_seen": last_sql,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    args = parser.parse_args()
    print(json.dumps(measure(args.database_url), indent=2))


if __name__ == "__main__":
    main()

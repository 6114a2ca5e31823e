"""Count database round trips, statements and transactions per request of create_job and process_job.

Runs the real entry points in-process (Flask request contexts, the real pool on a real database)
through a loopback relay to PostgreSQL that counts turns: each time the client speaks again after
the server answered is one round trip. Statements are counted at common.platform.db's Connection methods,
transactions from the server's own statistics (pg_stat_database) of a database nothing else uses.

    PYTHONPATH=. .venv/bin/python -m bench.roundtrips --database-url postgresql://...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import socket
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit


@dataclass
class Counts:
    round_trips: int = 0
    statements: int = 0
    transactions: int = 0
    sql: list[str] = field(default_factory=list)


class TurnCounter:
    """A TCP relay that counts client turns: client bytes that follow bytes from the server."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.turns = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            state = {"server_spoke": True}  # the first bytes of a connection open a turn
            threading.Thread(target=self._pump, args=(client, upstream, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, state, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, state: dict[str, bool], client: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                with self._lock:
                    if client and state["server_spoke"]:
                        self.turns += 1
                    state["server_spoke"] = not client
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.close()


def _via(database_url: str, port: int) -> str:
    parts = urlsplit(database_url)
    netloc = parts.netloc.rpartition("@")
    return urlunsplit((parts.scheme, f"{netloc[0]}{netloc[1]}127.0.0.1:{port}", parts.path, parts.query, ""))


def measure(database_url: str, *, repeats: int = 20) -> dict[str, Any]:
    parts = urlsplit(database_url)
    relay = TurnCounter(parts.hostname or "127.0.0.1", parts.port or 5432)
    os.environ.update(
        DYLEN_DATABASE_URL=_via(database_url, relay.port),
        DYLEN_AUTH_MODE="dev",
        DYLEN_TASK_SECRET="bench",
        DYLEN_JOBS_AUTO_PROCESS="false",
        DYLEN_ENV_FILE=os.devnull,
        DYLEN_LOG_LEVEL="WARNING",
        # Quotas on (the limited insert runs) but out of reach of the repeats by one user.
        DYLEN_TIER_DAILY_JOBS="free=1000000",
        DYLEN_TIER_ACTIVE_JOBS="free=1000000",
        # A plain lesson: the one-step generator (the built-in one plans; bench.fanout_bench measures that).
        DYLEN_LESSON_GENERATOR="common.lessons.template:generate_lesson",
    )
    import flask

    import common.platform.db

    counts = Counts()
    execute, simple = common.platform.db.Connection.execute, common.platform.db.Connection.execute_simple
    in_transaction = False

    def record(sql: str) -> None:
        # The pool is in autocommit: a statement outside BEGIN..COMMIT is a transaction of its own.
        nonlocal in_transaction
        keyword = sql.strip().upper()
        if keyword == "BEGIN":
            in_transaction = True
            counts.transactions += 1
        elif keyword in ("COMMIT", "ROLLBACK"):
            in_transaction = False
        else:
            counts.statements += 1
            counts.sql.append(" ".join(sql.split())[:60])
            if not in_transaction:
                counts.transactions += 1

    def counting_execute(self: Any, statement: Any, params: Any = None) -> Any:
        record(statement if isinstance(statement, str) else statement.sql)
        return execute(self, statement, params)

    def counting_simple(self: Any, sql: str) -> Any:
        record(sql)
        return simple(self, sql)

    common.platform.db.Connection.execute = counting_execute  # type: ignore[method-assign]
    common.platform.db.Connection.execute_simple = counting_simple  # type: ignore[method-assign]

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
            counts.statements = counts.transactions = 0
            counts.sql = []
            turns = relay.turns
            if name == "create_job":
                create_one()
            else:
                assert job_id is not None
                process_one(job_id)
            totals.round_trips += relay.turns - turns
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

"""What a trace costs create_job: the same wrk load (bench/create_job.lua, auto-process off) on
create_job with telemetry off, on (every request traced and exported, DYLEN_TELEMETRY=file, sample
ratio 1) and on with 10% of the traces sampled, each against the bare hello function, in
alternating rounds in one run: hello, off, on, sampled, hello, off, ... The processes live side by
side, so a drift of the shared machine hits each alike; the figures are medians over the rounds,
and `on/off` the median of the rounds' ratios.

    PYTHONPATH=. .venv/bin/python -m bench.telemetry_bench [--rounds 7] [--seconds 5] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from bench.perf import BENCH, HELLO, SERVER, Database, _http, wrk
from tests.support import FunctionServer, base_env


def _warm(server: FunctionServer, create: bool) -> None:
    for _ in range(20):
        if create:
            body = {"job_kind": "lesson", "idempotency_key": uuid.uuid4().hex, "payload": {"topic": "warm"}}
            _http().post(server.url + "/", json=body, headers={"X-Dylen-User": "warm"}, timeout=10)
        else:
            _http().get(server.url + "/", timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    db = Database()
    logs = Path(tempfile.mkdtemp(prefix="dylen-bench-logs-"))
    spans = Path(tempfile.mkdtemp(prefix="dylen-bench-telemetry-"))
    env = base_env(db.url, DYLEN_JOBS_AUTO_PROCESS="false", DYLEN_LOG_LEVEL="WARNING", **SERVER)
    traced = {**env, "DYLEN_TELEMETRY": "file", "DYLEN_TELEMETRY_DIR": str(spans)}
    servers = {
        "hello": FunctionServer("hello", env, logs, source=HELLO),
        "off": FunctionServer("create_job", env, logs),
        "on": FunctionServer("create_job", traced, logs),
        "sampled": FunctionServer("create_job", {**traced, "DYLEN_TRACE_SAMPLE_RATIO": "0.1"}, logs),
    }
    rounds: list[dict[str, dict[str, float]]] = []
    try:
        for name, server in servers.items():
            server.start()
            _warm(server, create=name != "hello")
        for _ in range(args.rounds):
            runs = {}
            for name, server in servers.items():
                script = None if name == "hello" else BENCH / "create_job.lua"
                runs[name] = wrk(
                    server.url + "/", connections=args.connections, seconds=args.seconds, script=script
                )
            rounds.append(runs)
        span_lines = sum(len(p.read_text().splitlines()) for p in spans.glob("spans-*.jsonl"))
    finally:
        for server in servers.values():
            server.stop()
        db.close()
        shutil.rmtree(logs, ignore_errors=True)
        shutil.rmtree(spans, ignore_errors=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    result: dict[str, Any] = {
        "connections": args.connections,
        "rounds": args.rounds,
        "seconds": args.seconds,
        **{
            name: {
                "rps": median(name, "rps"),
                "p50_ms": median(name, "p50_ms"),
                "p99_ms": median(name, "p99_ms"),
            }
            for name in servers
        },
        "off/hello": statistics.median(r["off"]["rps"] / r["hello"]["rps"] for r in rounds),
        "on/hello": statistics.median(r["on"]["rps"] / r["hello"]["rps"] for r in rounds),
        "sampled/hello": statistics.median(r["sampled"]["rps"] / r["hello"]["rps"] for r in rounds),
        "on/off rps": statistics.median(r["on"]["rps"] / r["off"]["rps"] for r in rounds),
        "on/off p99": statistics.median(r["on"]["p99_ms"] / r["off"]["p99_ms"] for r in rounds),
        "sampled/off rps": statistics.median(r["sampled"]["rps"] / r["off"]["rps"] for r in rounds),
        "sampled/off p99": statistics.median(r["sampled"]["p99_ms"] / r["off"]["p99_ms"] for r in rounds),
        "round_on_off_rps": [round(r["on"]["rps"] / r["off"]["rps"], 3) for r in rounds],
        "non_2xx": sum(r[n]["non_2xx"] for r in rounds for n in ("off", "on", "sampled")),
        "spans_written": span_lines,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

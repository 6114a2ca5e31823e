"""`make bench`: each figure next to its baseline, measured in one run on this machine.

1. create_job throughput and p50/p99 at 8, 16 and 64 connections (auto-process off) vs a bare
   functions-framework hello function under the same server settings; load from wrk in its own
   process (Debian's `wrk`).
2. End to end: 2,000 lesson jobs created by 16 concurrent clients and processed through local
   dispatch; jobs/s from the first create to the last `done` (timestamps from the database).
3. Cold start: process launch to first successful database-backed answer, per function, vs the hello
   function launched the same way; median of several launches.
4. Peak RSS (VmHWM) of each function process tree under the load of 1.
5. Database round trips, statements and transactions per create_job and process_job request.

Writes bench/RESULTS.md (its own section) and bench/perf.png. Absolute numbers drift on shared
machines; the ratios, measured minutes apart in one process tree, are what the targets are about.

    make bench                     # or: PYTHONPATH=. .venv/bin/python -m bench.perf [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import TASK_SECRET, FunctionServer, base_env, free_port  # noqa: E402

BENCH = ROOT / "bench"
HELLO = BENCH / "hello" / "main.py"
RESULTS = BENCH / "RESULTS.md"
START, END = "<!-- perf:start -->", "<!-- perf:end -->"
# Every function process, the hello baseline included, runs with the server settings docs/PERFORMANCE.md
# recommends for Cloud Run (gunicorn threads per instance); BENCH_THREADS compares others.
SERVER = {"THREADS": os.environ.get("BENCH_THREADS", "2")}
PROCESS_JOB_SERVER = {
    "THREADS": "4",  # its requests run whole jobs: docs/PERFORMANCE.md gives it 4
    # One task per job, as measured before fan-out (bench.fanout_bench measures sections).
    "DYLEN_LESSON_GENERATOR": "common.lessons.template:generate_lesson",
}


# --- database -------------------------------------------------------------------------------------


class Database:
    """A fresh database built by `python -m common.cli migrate`, on the configured or an embedded server."""

    def __init__(self) -> None:
        self.pg = None
        admin = os.environ.get("DYLEN_BENCH_DATABASE_URL") or os.environ.get("DYLEN_TEST_DATABASE_URL")
        if not admin:
            from devtools.embedded_pg import EmbeddedPostgres

            self._tmp = Path(tempfile.mkdtemp(prefix="dylen-bench-pg-"))
            self.pg = EmbeddedPostgres(self._tmp / "data", durable=False)
            admin = self.pg.start()
        from devtools.embedded_pg import create_database

        self.name = f"dylen_bench_{uuid.uuid4().hex[:8]}"
        create_database(admin, self.name)
        self.url = sa.engine.make_url(admin).set(database=self.name).render_as_string(hide_password=False)
        env = {
            **os.environ,
            "DYLEN_DATABASE_URL": self.url,
            "DYLEN_AUTH_MODE": "dev",
            "PYTHONPATH": str(ROOT),
        }
        subprocess.run(
            [sys.executable, "-m", "common.cli", "migrate"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        self.engine = sa.create_engine(sa.engine.make_url(self.url).set(drivername="postgresql+pg8000"))
        self.admin = admin

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def close(self) -> None:
        self.engine.dispose()
        if self.pg is not None:
            self.pg.destroy()
            shutil.rmtree(self._tmp, ignore_errors=True)


def _http() -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    return s


# --- 1 + 4: throughput, latency and memory under wrk ----------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip()).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def wrk(url: str, *, connections: int, seconds: int, script: Path | None = None) -> dict[str, float]:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    if script:
        command += ["-s", str(script)]
    command += [url]
    if script:
        command += ["--", uuid.uuid4().hex[:8]]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    try:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
        p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    except (AttributeError, KeyError) as error:
        raise RuntimeError(f"cannot read wrk's output:\n{out}") from error
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


ROUNDS = 3


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "rps": statistics.median(r["rps"] for r in runs),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "non_2xx": sum(r["non_2xx"] for r in runs),
        "socket_errors": "; ".join(r["socket_errors"] for r in runs if r["socket_errors"]),
    }


def peak_rss_mb(server: FunctionServer) -> float:
    """Largest VmHWM in the server's process tree (gunicorn arbiter + worker)."""
    import psutil

    assert server.proc is not None
    root = psutil.Process(server.proc.pid)
    peaks = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        if match:
            peaks.append(int(match.group(1)) / 1024)
    return max(peaks)


def throughput(db: Database, logs: Path, *, seconds: int) -> dict[str, Any]:
    env = base_env(db.url, DYLEN_JOBS_AUTO_PROCESS="false", DYLEN_LOG_LEVEL="WARNING", **SERVER)
    hello = FunctionServer("hello", env, logs, source=HELLO).start()
    create = FunctionServer("create_job", env, logs).start()
    out: dict[str, Any] = {"seconds": seconds}
    try:
        for server in (hello, create):  # warm both: imports, engine, pool
            for _ in range(20):
                if server is hello:
                    _http().get(server.url + "/", timeout=10)
                else:
                    _http().post(
                        server.url + "/",
                        json={
                            "job_kind": "lesson",
                            "idempotency_key": uuid.uuid4().hex,
                            "payload": {"topic": "warm"},
                        },
                        headers={"X-Dylen-User": "warm"},
                        timeout=10,
                    )
        for connections in (8, 16, 64):
            # Alternating rounds: a drift of the shared machine hits both sides alike; each figure is
            # the median over the rounds, the ratio the median of the rounds' ratios.
            rounds = []
            for _ in range(ROUNDS):
                base = wrk(hello.url + "/", connections=connections, seconds=seconds)
                ours = wrk(
                    create.url + "/",
                    connections=connections,
                    seconds=seconds,
                    script=BENCH / "create_job.lua",
                )
                rounds.append((base, ours))
            out[str(connections)] = {
                "hello": _median_run([r[0] for r in rounds]),
                "create_job": _median_run([r[1] for r in rounds]),
                "ratio": statistics.median(o["rps"] / h["rps"] for h, o in rounds),
                "round_ratios": [o["rps"] / h["rps"] for h, o in rounds],
            }
        out["peak_rss_mb"] = {"hello": peak_rss_mb(hello), "create_job": peak_rss_mb(create)}
        out["jobs_created"] = db.scalar("SELECT count(*) FROM jobs")
    finally:
        hello.stop()
        create.stop()
    return out


# --- 2: end to end --------------------------------------------------------------------------------


def end_to_end(db: Database, logs: Path, *, jobs: int, clients: int = 16) -> dict[str, Any]:
    env = base_env(
        db.url, DYLEN_LOG_LEVEL="WARNING", DYLEN_DB_POOL_SIZE="8", DYLEN_DB_MAX_OVERFLOW="2", **SERVER
    )
    process = FunctionServer("process_job", {**env, **PROCESS_JOB_SERVER}, logs).start()
    env["DYLEN_PROCESS_JOB_URL"] = process.url + "/"
    create = FunctionServer("create_job", env, logs).start()
    run = uuid.uuid4().hex[:8]
    # The load generator shares the two cores with the functions: one stdlib keep-alive
    # connection per client (a requests.Session costs several times its CPU per call).
    local = threading.local()
    try:

        def submit(i: int) -> int:
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", create.port, timeout=30)
            body = json.dumps(
                {"job_kind": "lesson", "idempotency_key": f"e2e-{run}-{i}", "payload": {"topic": f"E2E {i}"}}
            )
            headers = {"Content-Type": "application/json", "X-Dylen-User": f"e2e-{run}-{i % 200}"}
            conn.request("POST", "/", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status

        with ThreadPoolExecutor(clients) as pool:
            codes = list(pool.map(submit, range(jobs)))
        deadline = time.monotonic() + 300
        pattern = f"e2e-{run}-%"
        while time.monotonic() < deadline:
            left = db.scalar(
                "SELECT count(*) FROM jobs WHERE idempotency_key LIKE :p AND status <> 'done'", p=pattern
            )
            if left == 0:
                break
            time.sleep(0.2)
        seconds = db.scalar(
            "SELECT EXTRACT(EPOCH FROM max(completed_at) - min(created_at)) FROM jobs WHERE idempotency_key LIKE :p",
            p=pattern,
        )
        done = db.scalar(
            "SELECT count(*) FROM jobs WHERE idempotency_key LIKE :p AND status = 'done'", p=pattern
        )
        lessons = db.scalar(
            "SELECT count(*) FROM lessons l JOIN jobs j ON j.id = l.job_id WHERE j.idempotency_key LIKE :p",
            p=pattern,
        )
        return {
            "jobs": jobs,
            "clients": clients,
            "accepted": sum(1 for c in codes if c == 202),
            "done": done,
            "lessons": lessons,
            "seconds": float(seconds),
            "jobs_per_second": done / float(seconds),
            "peak_rss_mb": {"create_job": peak_rss_mb(create), "process_job": peak_rss_mb(process)},
        }
    finally:
        create.stop()
        process.stop()


# --- 3: cold start --------------------------------------------------------------------------------


def _fixture_rows(db: Database, user: str) -> dict[str, str]:
    """A done job with its lesson, for the read functions' first real answer."""
    with db.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id) VALUES (:u) ON CONFLICT DO NOTHING"), {"u": user})
        job_id, lesson_id = str(uuid.uuid4()), str(uuid.uuid4())
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json, attempts, max_attempts) "
                "VALUES (:id, :u, 'lesson', 'done', :k, '{}', 1, 5)"
            ),
            {"id": job_id, "u": user, "k": job_id},
        )
        conn.execute(
            sa.text(
                "INSERT INTO lessons (id, user_id, job_id, topic, title, content) VALUES (:id, :u, :j, 't', 't', '{}')"
            ),
            {"id": lesson_id, "u": user, "j": job_id},
        )
    return {"job_id": job_id, "lesson_id": lesson_id}


def _queued_job(db: Database, user: str) -> str:
    job_id = str(uuid.uuid4())
    with db.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id) VALUES (:u) ON CONFLICT DO NOTHING"), {"u": user})
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json, attempts, max_attempts) "
                "VALUES (:id, :u, 'lesson', 'queued', :k, CAST(:r AS jsonb), 0, 5)"
            ),
            {
                "id": job_id,
                "u": user,
                "k": job_id,
                "r": json.dumps(
                    {
                        "job_kind": "lesson",
                        "payload": {
                            "topic": "Cold starts",
                            "details": None,
                            "depth": "highlights",
                            "language": "en",
                        },
                    }
                ),
            },
        )
    return job_id


def _first_request(
    name: str, url: str, db: Database, rows: dict[str, str], user: str
) -> tuple[str, str, dict]:
    """(method, url, kwargs) of a real, database-backed request for `name`."""
    user_h = {"X-Dylen-User": user}
    task_h = {"X-Dylen-Task-Secret": TASK_SECRET}
    if name == "hello":
        return "GET", url + "/", {}
    if name == "create_job":
        body = {"job_kind": "lesson", "idempotency_key": uuid.uuid4().hex, "payload": {"topic": "Cold"}}
        return "POST", url + "/", {"json": body, "headers": user_h}
    if name in ("get_job", "get_lesson"):
        key = "job_id" if name == "get_job" else "lesson_id"
        return "GET", f"{url}/{rows[key]}", {"headers": user_h}
    if name == "list_lessons":
        return "GET", url + "/", {"headers": user_h}
    if name == "cancel_job":
        return "POST", f"{url}/{_queued_job(db, user)}", {"headers": user_h}
    if name == "process_job":
        return "POST", url + "/", {"json": {"job_id": _queued_job(db, user)}, "headers": task_h}
    if name == "dashboard":
        return "GET", url + "/", {}  # the overview, as the dev operator (dev auth)
    return "POST", url + "/", {"headers": task_h}  # scheduler-called functions


def cold_start(
    db: Database,
    logs: Path,
    *,
    launches: int,
    names: list[str],
    extra_env: dict[str, str] | None = None,
    label_suffix: str = "",
) -> dict[str, Any]:
    env = base_env(db.url, DYLEN_LOG_LEVEL="WARNING", DYLEN_JOBS_AUTO_PROCESS="false", **SERVER)
    env.update(extra_env or {})
    user = f"cold-{uuid.uuid4().hex[:6]}"
    rows = _fixture_rows(db, user)
    http = _http()
    samples: dict[str, list[float]] = {name: [] for name in ["hello", *names]}
    # Round-robin, so every function and the baseline see the same stretch of machine noise.
    for _ in range(launches):
        for name in samples:
            server = FunctionServer(name, env, logs, source=HELLO if name == "hello" else None)
            method, url, kwargs = _first_request(name, server.url, db, rows, user)
            started = time.monotonic()
            server.start(wait=False)
            try:
                while True:
                    try:
                        response = http.request(method, url, timeout=30, **kwargs)
                        if response.status_code < 300:
                            break
                        raise RuntimeError(f"{name}: {response.status_code} {response.text[:200]}")
                    except requests.ConnectionError as error:
                        if time.monotonic() - started > 60:
                            raise RuntimeError(
                                f"{name} did not answer within 60 s:\n{server.log()[-2000:]}"
                            ) from error
                        time.sleep(0.005)
                samples[name].append(time.monotonic() - started)
            finally:
                server.stop()
    results: dict[str, Any] = {
        name + label_suffix: {"median_s": statistics.median(values), "samples_s": values}
        for name, values in samples.items()
    }
    hello = results["hello" + label_suffix]["median_s"]
    for value in results.values():
        value["ratio"] = value["median_s"] / hello
    return results


def make_run_first_job() -> dict[str, Any]:
    """`make run` as a newcomer meets it: the runner from a clean folder, then the printed create
    curl's request; seconds from sending it to seeing the job `done` (the promise is < 2 s)."""
    import signal

    base = Path(tempfile.mkdtemp(prefix="dylen-bench-run-"))
    gateway = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYLEN_")}
    env.update(
        DYLEN_DEV_DIR=str(base),
        DYLEN_DEV_PORT=str(gateway),
        DYLEN_DEV_PG_PORT=str(free_port()),
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    http = _http()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Ctrl-C stops everything" in line:
                break
        samples = []
        for n in range(3):
            body = {
                "job_kind": "lesson",
                "idempotency_key": f"demo-{n}",
                "payload": {"topic": "Photosynthesis", "depth": "detailed"},
            }
            started = time.monotonic()
            job = http.post(
                f"http://127.0.0.1:{gateway}/create_job",
                json=body,
                headers={"X-Dylen-User": "demo"},
                timeout=30,
            ).json()
            while (
                http.get(
                    f"http://127.0.0.1:{gateway}/get_job/{job['job_id']}",
                    headers={"X-Dylen-User": "demo"},
                    timeout=30,
                ).json()["status"]
                != "done"
            ):
                if time.monotonic() - started > 60:
                    raise RuntimeError("make run: job not done within 60 s")
                time.sleep(0.01)
            samples.append(time.monotonic() - started)
        return {"first_s": samples[0], "samples_s": samples}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def cold_start_gcp(db: Database, logs: Path, *, launches: int) -> dict[str, Any]:
    """create_job in gcp mode: its first answer includes loading google-cloud-tasks and enqueueing
    on the Tasks emulator (the real client; `make tasks-emulator` installs the server)."""
    from tests.tasks_emulator import EMULATOR_BIN, QUEUE_PATH, TasksEmulator

    if not EMULATOR_BIN.exists():
        print("skipping gcp cold start: run `make tasks-emulator` first", flush=True)
        return {}
    emulator = TasksEmulator(logs).start()
    try:
        gcp_env = {
            "DYLEN_TASK_SERVICE_PROVIDER": "gcp",
            "DYLEN_CLOUD_TASKS_QUEUE_PATH": QUEUE_PATH,
            "CLOUD_TASKS_EMULATOR_HOST": emulator.host,
            "DYLEN_JOBS_AUTO_PROCESS": "true",
            # Deliveries go nowhere (nothing listens there); only create_job's enqueue is measured.
            "DYLEN_PROCESS_JOB_URL": f"http://127.0.0.1:{free_port()}/",
        }
        return cold_start(
            db, logs, launches=launches, names=["create_job"], extra_env=gcp_env, label_suffix=" (gcp)"
        )
    finally:
        emulator.stop()


# --- report ---------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError, AttributeError):
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)  # type: ignore[union-attr]
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    tp = results["throughput"]
    conns = ["8", "16", "64"]
    x = range(len(conns))
    axes[0].bar([i - 0.2 for i in x], [tp[c]["hello"]["rps"] for c in conns], 0.4, label="bare hello")
    axes[0].bar([i + 0.2 for i in x], [tp[c]["create_job"]["rps"] for c in conns], 0.4, label="create_job")
    axes[0].set_xticks(list(x), [f"{c} connections" for c in conns])
    axes[0].set_ylabel("requests/s")
    axes[0].set_title("Throughput (same run)")
    axes[0].legend()
    cold = results["cold_start"]
    names = list(cold)
    axes[1].barh(
        names, [cold[n]["median_s"] for n in names], color=["grey"] + ["tab:blue"] * (len(names) - 1)
    )
    axes[1].set_xlabel("seconds, launch to first real answer (median)")
    axes[1].set_title("Cold start")
    rss = {
        **{f"{k} (load)": v for k, v in tp["peak_rss_mb"].items()},
        **{f"{k} (e2e)": v for k, v in results["end_to_end"]["peak_rss_mb"].items()},
    }
    axes[2].barh(list(rss), list(rss.values()), color="tab:green")
    axes[2].axvline(120, color="red", linestyle="--", label="target 120 MB")
    axes[2].set_xlabel("peak RSS, MB")
    axes[2].set_title("Memory")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(results: dict[str, Any], command: str) -> str:
    tp, e2e, cold, rt = (
        results["throughput"],
        results["end_to_end"],
        results["cold_start"],
        results["round_trips"],
    )
    lines = [
        START,
        "## Performance (`make bench`)",
        "",
        f"Measured {results['date']} on {results['machine']}.",
        f"Command: `{command}`. Database: {results['database']}. Chart: [perf.png](perf.png).",
        "",
        "### 1. create_job vs a bare functions-framework hello (wrk, 2 threads, same server settings)",
        "",
        f"Both under gunicorn with `THREADS={SERVER['THREADS']}`; {ROUNDS} alternating rounds of "
        f"{tp['seconds']} s per side and connection count; medians (ratio: median of the rounds' ratios, "
        f"at 16: {', '.join(f'{r:.2f}' for r in tp['16']['round_ratios'])}). The targets are at 16 "
        "connections; 8 is the Cloud Run concurrency docs/PERFORMANCE.md recommends for create_job.",
        "",
        "| connections | hello req/s | create_job req/s | ratio (target >= 0.5 at 16) | create_job p50 | create_job p99 (target <= 50 ms) | hello p99 | non-2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in ("8", "16", "64"):
        h, o = tp[c]["hello"], tp[c]["create_job"]
        lines.append(
            f"| {c} | {h['rps']:.0f} | {o['rps']:.0f} | **{tp[c]['ratio']:.2f}x** | {o['p50_ms']:.1f} ms | "
            f"{o['p99_ms']:.1f} ms | {h['p99_ms']:.1f} ms | {o['non_2xx']} |"
        )
    lines += [
        "",
        "### 2. End to end through local dispatch",
        "",
        f"{e2e['jobs']} lesson jobs from {e2e['clients']} concurrent clients: {e2e['accepted']} accepted, "
        f"{e2e['done']} done, {e2e['lessons']} lessons, first create to last `done` {e2e['seconds']:.2f} s = "
        f"**{e2e['jobs_per_second']:.0f} jobs/s** (target >= 200).",
        "",
        "### 3. Cold start: launch to first successful database-backed answer (median)",
        "",
        "| function | median | ratio to hello | samples |",
        "|---|---|---|---|",
    ]
    for name, value in cold.items():
        samples = ", ".join(f"{s:.2f}" for s in value["samples_s"])
        lines.append(f"| {name} | {value['median_s']:.2f} s | **{value['ratio']:.2f}x** | {samples} |")
    lines += [
        "",
        "Targets: <= 2.5x hello for database-backed functions, <= 4x for create_job in gcp mode (its row",
        "`create_job (gcp)` is measured against `hello (gcp)`, launched in the same round-robin; its first",
        "answer includes importing google-cloud-tasks and enqueueing on the Tasks emulator).",
        "",
        "### make run: the printed curl to a `done` job (promise: < 2 s)",
        "",
        f"First job {results['make_run']['first_s']:.2f} s after `make run` printed its URLs; the next two "
        + ", ".join(f"{x:.2f} s" for x in results["make_run"]["samples_s"][1:])
        + " (through the gateway, local dispatch, embedded PostgreSQL).",
        "",
        "### 4. Peak RSS (VmHWM, largest process of the function's tree; target <= 120 MB)",
        "",
        "| process | peak RSS |",
        "|---|---|",
    ]
    for k, v in tp["peak_rss_mb"].items():
        lines.append(f"| {k} under the load of 1 | {v:.0f} MB |")
    for k, v in e2e["peak_rss_mb"].items():
        lines.append(f"| {k} during the end-to-end run | {v:.0f} MB |")
    lines += [
        "",
        "### 5. Database work per request (counted at the wire: client turns through a loopback relay)",
        "",
        "| request | round trips | statements | transactions | target |",
        "|---|---|---|---|---|",
        f"| create_job | {rt['create_job']['round_trips']:.0f} | {rt['create_job']['statements']:.0f} | "
        f"{rt['create_job']['transactions']:.0f} | one transaction, <= 2 statements |",
        f"| process_job | {rt['process_job']['round_trips']:.0f} | {rt['process_job']['statements']:.0f} | "
        f"{rt['process_job']['transactions']:.0f} | <= 3 transactions |",
        "",
        END,
    ]
    return "\n".join(lines)


def write_results(section: str, start: str = START, end: str = END) -> None:
    """Replace the section between the `start` and `end` markers (each benchmark has its own)."""
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nEach section names the command that produced it.\n"
    )
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs, for checking the harness")
    parser.add_argument("--no-write", action="store_true", help="print JSON only")
    parser.add_argument(
        "--only",
        action="append",
        choices=("throughput", "end_to_end", "cold_start"),
        help="measure just this section (repeatable); prints JSON and writes nothing",
    )
    args = parser.parse_args()
    if args.only:
        args.no_write = True
    if shutil.which("wrk") is None:
        print("wrk is required: apt-get install wrk (Debian) / brew install wrk", file=sys.stderr)
        return 2
    seconds, jobs, launches = (3, 300, 2) if args.quick else (5, 2000, 5)
    db = Database()
    logs = Path(tempfile.mkdtemp(prefix="dylen-bench-logs-"))
    try:
        from bench.roundtrips import measure

        names = sorted(p.name for p in (ROOT / "functions").iterdir() if (p / "main.py").is_file())
        results: dict[str, Any] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "database": "embedded PostgreSQL"
            if db.pg
            else "PostgreSQL at " + sa.engine.make_url(db.admin).render_as_string(),
        }
        wanted = set(args.only or ("throughput", "end_to_end", "cold_start", "rest"))
        if "throughput" in wanted:
            print("throughput ...", flush=True)
            results["throughput"] = throughput(db, logs, seconds=seconds)
        if "end_to_end" in wanted:
            print("end to end ...", flush=True)
            results["end_to_end"] = end_to_end(db, logs, jobs=jobs)
        if "cold_start" in wanted:
            print("cold start ...", flush=True)
            results["cold_start"] = cold_start(db, logs, launches=launches, names=names)
            gcp = cold_start_gcp(db, logs, launches=launches)
            if gcp:
                results["cold_start"].update(gcp)
        if "rest" not in wanted:
            print(json.dumps(results, indent=2))
            return 0
        print("make run ...", flush=True)
        results["make_run"] = make_run_first_job()
        print("round trips ...", flush=True)
        rt = subprocess.run(
            [sys.executable, "-m", "bench.roundtrips", "--database-url", db.url],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            check=True,
        )
        results["round_trips"] = json.loads(rt.stdout)
        del measure
    finally:
        db.close()
        shutil.rmtree(logs, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if not args.no_write:
        command = "make bench" + (" BENCH_ARGS=--quick" if args.quick else "")
        write_results(render(results, command))
        chart(results, BENCH / "perf.png")
        print(f"wrote {RESULTS} and {BENCH / 'perf.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

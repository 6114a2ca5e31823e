"""One lesson is one trace: real function processes, each writing its finished spans and metrics as
JSON lines (DYLEN_TELEMETRY=file, the SDK's console exporters into a file per process), through the
local dispatcher and through the Cloud Tasks emulator, after a scheduled retry and after a rescue.

A lesson created with a caller's `traceparent` must yield spans in create_job, in process_job for
the lesson and for every section, all in the caller's trace, each under the span that caused it:
create_job under the caller's, a dispatch under the request that made it, a delivery (process_job)
under its dispatch, claim/run/finish under their delivery, the generator's call under its run.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.faults import kill_all, rescue, start_stack, wait_until
from tests.gemini_standin import StandIn
from tests.support import Stack, free_port, lesson_body
from tests.tasks_emulator import QUEUE_PATH, TasksEmulator

RESCHEDULED = ("retry_scheduled", "deferred")  # an attempt that ended back in the queue
FANOUT = "tests.generators:fanout"  # the template's plan and sections; "fail-once" fails a plan once
INVOKER = "tasks-invoker@dylen-test.iam.gserviceaccount.com"
MODEL = "gemini-trace-test"  # a lane of this module's own


def _traced(tmp: Path, **overrides: str) -> dict[str, str]:
    return {
        "DYLEN_TELEMETRY": "file",
        "DYLEN_TELEMETRY_DIR": str(tmp),
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # the SDK's batch delay (ms): spans reach the file at once
        "DYLEN_METRICS_EXPORT_SECONDS": "0.5",
        "DYLEN_LESSON_GENERATOR": FANOUT,
        **overrides,
    }


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("telemetry-local")


@pytest.fixture(scope="module")
def local(database_url: str, logs_dir: Path, local_dir: Path) -> Iterator[Stack]:
    stack = start_stack(database_url, logs_dir, **_traced(local_dir))
    yield stack
    kill_all(stack)


@pytest.fixture(scope="module")
def emulator(logs_dir: Path) -> Iterator[TasksEmulator]:
    server = TasksEmulator(logs_dir).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gcp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("telemetry-gcp")


@pytest.fixture(scope="module")
def gcp(database_url: str, logs_dir: Path, gcp_dir: Path, emulator: TasksEmulator) -> Iterator[Stack]:
    env = _traced(
        gcp_dir,
        DYLEN_TASK_SERVICE_PROVIDER="gcp",
        CLOUD_TASKS_EMULATOR_HOST=emulator.host,
        DYLEN_CLOUD_TASKS_QUEUE_PATH=QUEUE_PATH,
        DYLEN_TASKS_INVOKER_SA=INVOKER,
    )
    stack = start_stack(database_url, logs_dir, **env)
    yield stack
    kill_all(stack)


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    server = StandIn(free_port(), "test-gemini-key", retry_delay=0.2)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gemini_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("telemetry-gemini")


@pytest.fixture(scope="module")
def gemini(database_url: str, logs_dir: Path, gemini_dir: Path, standin: StandIn) -> Iterator[Stack]:
    """The Gemini generator through the real SDK against the stand-in: every call on its lane."""
    env = _traced(
        gemini_dir,
        DYLEN_LESSON_GENERATOR="gemini",
        GEMINI_API_KEY="test-gemini-key",
        DYLEN_GEMINI_BASE_URL=standin.url,
        DYLEN_GEMINI_MODEL=MODEL,
        DYLEN_GEMINI_TIMEOUT_SECONDS="10",
        DYLEN_JOB_TIMEOUT_SECONDS="60",
    )
    stack = start_stack(database_url, logs_dir, **env)
    yield stack
    kill_all(stack)


# --- reading what the processes wrote -----------------------------------------------------------------


def _lines(directory: Path, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file name, object) per complete line; a line being written is skipped."""
    for path in sorted(directory.glob(f"{kind}-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                yield path.name, json.loads(line)
            except ValueError:
                continue


def _spans(directory: Path, trace_id: str) -> list[dict[str, Any]]:
    spans = []
    for name, span in _lines(directory, "spans"):
        if span["context"]["trace_id"] == "0x" + trace_id:
            span["file"] = name  # which process wrote it
            span["id"] = span["context"]["span_id"][2:]
            span["parent"] = span["parent_id"][2:] if span["parent_id"] else None
            spans.append(span)
    return spans


def _deliveries(spans: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    """process_job's request spans for the job, in the order they started."""
    found = [
        s
        for s in spans
        if s["name"] == "process_job"
        and s["kind"] == "SpanKind.SERVER"
        and s["attributes"].get("dylen.job.id") == job_id
    ]
    return sorted(found, key=lambda s: s["start_time"])


def _by_id(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in spans}


def _children(spans: list[dict[str, Any]], parent: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["parent"] == parent["id"] and s["name"] == name]


def _caller() -> tuple[str, str]:
    """A caller's trace id and span id, as a traceparent header would carry them."""
    return uuid.uuid4().hex, uuid.uuid4().hex[:16]


def _create(stack: Stack, user: str, topic: str, trace_id: str, parent: str) -> str:
    headers = {"traceparent": f"00-{trace_id}-{parent}-01"}
    response = stack.create(user, lesson_body(topic), headers=headers)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id


def _sections(db: sa.Engine, job_id: str) -> dict[str, str | None]:
    with db.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id::text AS id, traceparent FROM jobs WHERE parent_id = :id ORDER BY section_index"
            ),
            {"id": job_id},
        )
        return {row.id: row.traceparent for row in rows}


def _stored_traceparent(db: sa.Engine, job_id: str) -> str | None:
    with db.connect() as conn:
        value: str | None = conn.execute(
            sa.text("SELECT traceparent FROM jobs WHERE id = :id"), {"id": job_id}
        ).scalar()
        return value


def _lesson_trace(
    directory: Path, db: sa.Engine, *, job_id: str, trace_id: str, parent: str, lesson_attempts: int
) -> list[dict[str, Any]]:
    """Wait for every delivery's spans, then check the trace's shape; the spans."""
    sections = _sections(db, job_id)
    assert sections, "the fan-out generator plans sections"

    def complete() -> bool:
        spans = _spans(directory, trace_id)
        finished = [s for s in _deliveries(spans, job_id) if "dylen.outcome" in s["attributes"]]
        return len(finished) == lesson_attempts and all(_deliveries(spans, s) for s in sections)

    wait_until(complete, timeout=20, what="every delivery's spans in the files")
    spans = _spans(directory, trace_id)
    by_id = _by_id(spans)

    # Every span descends from create_job's, the only one under the caller's span.
    roots = [s for s in spans if s["parent"] not in by_id]
    assert [(s["name"], s["kind"], s["parent"]) for s in roots] == [("create_job", "SpanKind.SERVER", parent)]
    create = roots[0]
    assert create["attributes"]["http.response.status_code"] == 202

    # The job remembers the span that created it, for dispatches made outside this trace.
    assert _stored_traceparent(db, job_id) == f"00-{trace_id}-{create['id']}-01"

    lesson = _deliveries(spans, job_id)
    assert len(lesson) == lesson_attempts
    for delivery in lesson + [d for s in sections for d in _deliveries(spans, s)]:
        # In process_job's own process, under a dispatch of the same job.
        assert delivery["file"] != create["file"]
        dispatch = by_id[delivery["parent"]]
        assert dispatch["kind"] == "SpanKind.PRODUCER"
        assert dispatch["attributes"]["dylen.job.id"] == delivery["attributes"]["dylen.job.id"]
        failed = delivery["attributes"]["dylen.outcome"] in RESCHEDULED
        for step in ("claim", "run") if failed else ("claim", "run", "finish"):
            assert len(_children(spans, delivery, step)) == 1, (step, delivery["attributes"])
        (run,) = _children(spans, delivery, "run")
        assert run["status"]["status_code"] == ("ERROR" if failed else "UNSET")

    # The lesson's first dispatch is create_job's; each retry's is the failed attempt's.
    assert by_id[lesson[0]["parent"]]["parent"] == create["id"]
    for before, after in itertools.pairwise(lesson):
        assert before["attributes"]["dylen.outcome"] in RESCHEDULED
        assert by_id[after["parent"]]["parent"] == before["id"]
    planning = lesson[-1]
    (run,) = _children(spans, planning, "run")
    assert [s["attributes"]["dylen.job.id"] for s in _children(spans, run, "lesson.plan")] == [job_id]

    for section_id, stored in sections.items():
        (delivery,) = _deliveries(spans, section_id)
        assert by_id[delivery["parent"]]["parent"] == planning["id"]  # dispatched by the plan's delivery
        assert delivery["attributes"]["dylen.job.parent_id"] == job_id
        (run,) = _children(spans, delivery, "run")
        assert len(_children(spans, run, "lesson.write_section")) == 1
        assert stored is not None and stored.startswith(f"00-{trace_id}-")
    return spans


# --- the trace ---------------------------------------------------------------------------------------


def test_a_lesson_is_one_trace_through_the_local_dispatcher(
    local: Stack, local_dir: Path, db: sa.Engine, user: str
) -> None:
    trace_id, parent = _caller()
    job_id = _create(local, user, "Photosynthesis", trace_id, parent)
    assert local.wait_for(user, job_id)["status"] == "done"
    spans = _lesson_trace(local_dir, db, job_id=job_id, trace_id=trace_id, parent=parent, lesson_attempts=1)

    # Log lines join the spans: process_job's line for the lesson carries its request's span.
    (delivery,) = _deliveries(spans, job_id)
    received = [
        line
        for line in local.servers["process_job"].log_lines()
        if line.get("message") == f"Received task for job {job_id}"
    ]
    assert [(r["logging.googleapis.com/trace"], r["logging.googleapis.com/spanId"]) for r in received] == [
        (trace_id, delivery["id"])
    ]
    assert received[0]["logging.googleapis.com/trace_sampled"] is True


def test_without_a_traceparent_google_s_trace_header_is_continued(
    local: Stack, local_dir: Path, user: str
) -> None:
    # Cloud Run's front end sends X-Cloud-Trace-Context: TRACE_ID/SPAN_ID (decimal);o=1.
    trace_id, span_id = uuid.uuid4().hex, 1234567890123
    headers = {"X-Cloud-Trace-Context": f"{trace_id}/{span_id};o=1"}
    response = local.create(user, lesson_body("Google's header"), headers=headers)
    assert response.status_code == 202, response.text

    def created() -> list[dict[str, Any]]:
        return [s for s in _spans(local_dir, trace_id) if s["name"] == "create_job"]

    wait_until(lambda: bool(created()), timeout=20, what="create_job's span")
    assert [s["parent"] for s in created()] == [f"{span_id:016x}"]


def test_a_scheduled_retry_continues_the_trace(
    local: Stack, local_dir: Path, db: sa.Engine, user: str
) -> None:
    trace_id, parent = _caller()
    job_id = _create(local, user, "fail-once lesson", trace_id, parent)
    body = local.wait_for(user, job_id)
    assert body["status"] == "done" and body["attempts"] == 2
    _lesson_trace(local_dir, db, job_id=job_id, trace_id=trace_id, parent=parent, lesson_attempts=2)


def test_a_lesson_is_one_trace_through_cloud_tasks_with_a_retry(
    gcp: Stack, gcp_dir: Path, db: sa.Engine, user: str
) -> None:
    trace_id, parent = _caller()
    job_id = _create(gcp, user, "fail-once through the queue", trace_id, parent)
    assert gcp.wait_for(user, job_id, timeout=60)["status"] == "done"
    spans = _lesson_trace(gcp_dir, db, job_id=job_id, trace_id=trace_id, parent=parent, lesson_attempts=2)
    dispatches = [s for s in spans if s["kind"] == "SpanKind.PRODUCER"]
    assert {s["attributes"]["dylen.task.provider"] for s in dispatches} == {"gcp"}


def test_a_rescued_job_continues_the_trace_it_was_created_in(
    local: Stack, local_dir: Path, db: sa.Engine, user: str
) -> None:
    # A job whose dispatch was lost: queued, stale, created in a trace (the span `created_by`).
    trace_id, created_by = _caller()
    job_id = str(uuid.uuid4())
    with db.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id) VALUES (:u)"), {"u": user})
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json, attempts, "
                "max_attempts, dispatched_at, traceparent) VALUES (:id, :u, 'lesson', 'queued', :key, "
                "CAST(:request AS jsonb), 0, 3, now() - interval '1 hour', :tp)"
            ),
            {
                "id": job_id,
                "u": user,
                "key": uuid.uuid4().hex,
                "request": json.dumps(lesson_body("Rescued")),
                "tp": f"00-{trace_id}-{created_by}-01",
            },
        )
    assert rescue(local)["redispatched"] >= 1
    assert local.wait_for(user, job_id)["status"] == "done"

    def delivered() -> bool:
        return any(
            "dylen.outcome" in s["attributes"] for s in _deliveries(_spans(local_dir, trace_id), job_id)
        )

    wait_until(delivered, timeout=20, what="the rescued job's delivery span")
    spans = _spans(local_dir, trace_id)
    by_id = _by_id(spans)
    (delivery,) = _deliveries(spans, job_id)
    dispatch = by_id[delivery["parent"]]
    # Dispatched by rescue_jobs (its request is in a trace of its own: linked), under the job's span.
    assert dispatch["kind"] == "SpanKind.PRODUCER" and dispatch["parent"] == created_by
    assert dispatch["file"] != delivery["file"]
    (link,) = dispatch["links"]
    assert link["context"]["trace_id"] != "0x" + trace_id


def test_every_model_call_and_lane_wait_is_a_span_of_the_lessons_trace(
    gemini: Stack, gemini_dir: Path, db: sa.Engine, user: str
) -> None:
    # The plan's first call is answered 429: the lane pauses, the lesson is deferred, then planned.
    trace_id, parent = _caller()
    job_id = _create(
        gemini, user, f"Tides [run:{uuid.uuid4().hex[:8]}] [standin:429-once:plan]", trace_id, parent
    )
    assert gemini.wait_for(user, job_id, timeout=60)["status"] == "done"
    spans = _lesson_trace(gemini_dir, db, job_id=job_id, trace_id=trace_id, parent=parent, lesson_attempts=2)
    by_id = _by_id(spans)
    calls = [s for s in spans if s["name"] == f"generate_content {MODEL}"]
    assert all(s["kind"] == "SpanKind.CLIENT" for s in calls)
    assert {by_id[s["parent"]]["name"] for s in calls} == {"lesson.plan", "lesson.write_section"}
    outcomes = sorted(s["attributes"]["dylen.model.outcome"] for s in calls)
    assert outcomes == ["ok"] * (len(calls) - 1) + ["rate_limited"]
    for call in calls:
        attributes = call["attributes"]
        assert attributes["gen_ai.request.model"] == MODEL
        assert attributes["gen_ai.operation.name"] == "generate_content"
        if attributes["dylen.model.outcome"] == "ok":
            assert (
                attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
            )
        else:
            assert attributes["error.type"] == "rate_limited"
            assert call["status"]["status_code"] == "ERROR"
    waits = [s for s in spans if s["name"] == f"lane wait {MODEL}"]
    assert len(waits) == len(calls)  # each call took its slot first, under the same generator span
    assert sorted(by_id[w["parent"]]["id"] for w in waits) == sorted(by_id[c["parent"]]["id"] for c in calls)

    def counted() -> bool:
        points = _points(gemini_dir)
        names = {(m, a.get("model"), a.get("type"), a.get("outcome")) for m, a, _ in points}
        return {
            ("dylen.model.rate_limited", MODEL, None, None),
            ("dylen.model.tokens", MODEL, "input", None),
            ("dylen.model.tokens", MODEL, "output", None),
            ("dylen.model.lane.wait", MODEL, None, "slot"),
        } <= names and any(m == "gen_ai.client.token.usage" for m, _, _ in points)

    wait_until(counted, timeout=20, what="the model metrics in the exported files")


# --- metrics -----------------------------------------------------------------------------------------


def _points(directory: Path) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(metric, attributes, point) from each process's latest export (cumulative totals)."""
    latest: dict[str, dict[str, Any]] = {}
    for name, data in _lines(directory, "metrics"):
        latest[name] = data
    found = []
    for data in latest.values():
        for resource in data["resource_metrics"]:
            for scope in resource["scope_metrics"]:
                for metric in scope["metrics"]:
                    for point in metric["data"]["data_points"]:
                        found.append((metric["name"], point["attributes"], point))
    return found


def test_the_metrics_operators_alert_on(local: Stack, local_dir: Path, db: sa.Engine, user: str) -> None:
    trace_id, parent = _caller()
    job_id = _create(local, user, "fail-once metrics", trace_id, parent)
    assert local.wait_for(user, job_id)["status"] == "done"

    def point(metric: str, **attributes: str) -> dict[str, Any] | None:
        matching = [p for m, a, p in _points(local_dir) if m == metric and attributes.items() <= a.items()]
        return matching[0] if matching else None

    def exported() -> bool:
        return all(
            point(*wanted[:1], **wanted[1])
            for wanted in (
                ("dylen.jobs.created", {"job_kind": "lesson"}),
                ("dylen.jobs.finished", {"job_kind": "lesson", "status": "done"}),
                ("dylen.jobs.finished", {"job_kind": "lesson.section", "status": "done"}),
                ("dylen.jobs.retries", {"job_kind": "lesson", "outcome": "retry_scheduled"}),
                ("dylen.job.queue_latency", {"job_kind": "lesson.section"}),
                ("dylen.job.run.duration", {"job_kind": "lesson", "outcome": "error"}),
            )
        )

    wait_until(exported, timeout=20, what="the job metrics in the exported files")
    retries = point("dylen.jobs.retries", job_kind="lesson", outcome="retry_scheduled")
    assert retries is not None and retries["value"] >= 1
    latency = point("dylen.job.queue_latency", job_kind="lesson")
    assert latency is not None and latency["count"] >= 1 and 0 <= latency["sum"] < 60

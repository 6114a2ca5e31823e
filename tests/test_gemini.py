"""Lessons written by the Gemini generator (DYLEN_LESSON_GENERATOR=gemini) through the real
google-genai SDK, against tests/gemini_standin.py: a local stand-in of the Gemini REST API (a fake:
Google's endpoint cannot run here), reached through DYLEN_GEMINI_BASE_URL. Real function processes,
real PostgreSQL: every call goes through the model's lane and onto the ledger.

Scale: the issue's run (200 lessons, a 60 rpm lane) takes minutes at 60 calls a minute. The lane
runs here with the same algorithm on a 3 s window (DYLEN_MODEL_WINDOW_SECONDS, a setting only
tests and benchmarks change; 60 s in production) and 10 calls per window, and the stand-in is
checked against THAT window: never more than 10 calls in any 3 s. Six lessons a run, more calls than
one window allows, so the limit binds.

The 429 tests rely on the processor rescheduling a RetryLater without using an attempt (issue 22).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.faults import wait_until
from tests.gemini_standin import StandIn, most_in_any_window
from tests.support import (
    FunctionServer,
    Stack,
    StackFactory,
    base_env,
    free_port,
    lesson_body,
)

KEY = "test-gemini-key"
MODEL = "gemini-2.5-flash"
LANE_MODEL = "gemini-lane-test"  # the shared-lane tests' own lane (lanes are per model)
WINDOW, RPM, CONCURRENCY = 3, 10, 3


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    server = StandIn(free_port(), KEY)
    yield server
    server.stop()


def _gemini_env(standin: StandIn, model: str, **overrides: str) -> dict[str, str]:
    return {
        "DYLEN_LESSON_GENERATOR": "gemini",
        "GEMINI_API_KEY": KEY,
        "DYLEN_GEMINI_BASE_URL": standin.url,
        "DYLEN_GEMINI_MODEL": model,
        "DYLEN_GEMINI_TIMEOUT_SECONDS": "10",
        "DYLEN_JOB_TIMEOUT_SECONDS": "60",
        **overrides,
    }


@pytest.fixture(scope="module")
def gemini(make_stack: StackFactory, standin: StandIn) -> Stack:
    """One process_job, a generous lane, two attempts per job, bodies on the ledger."""
    return make_stack(
        **_gemini_env(
            standin,
            MODEL,
            DYLEN_MODEL_LIMITS=f"{MODEL}=rpm:1000,concurrency:20",
            DYLEN_JOB_MAX_ATTEMPTS="2",
            DYLEN_MODEL_CALL_BODIES="true",
            THREADS="8",
        )
    )


def _run() -> str:
    return uuid.uuid4().hex[:12]


def _create(stack: Stack, user: str, topic: str, create_url: str | None = None, **payload: Any) -> str:
    body = lesson_body(topic, **payload)
    response = stack.http.post(
        (create_url or stack.url("create_job")) + "/", json=body, headers={"X-Dylen-User": user}, timeout=30
    )
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def _calls(db: sa.Engine, job_ids: list[str]) -> list[Any]:
    with db.connect() as conn:
        return list(
            conn.execute(
                sa.text("SELECT * FROM model_calls WHERE job_id::text = ANY(:ids) ORDER BY started_at, id"),
                {"ids": job_ids},
            )
        )


def _job(db: sa.Engine, job_id: str) -> Any:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).one()


def test_a_lesson_is_written_through_the_sdk_and_every_call_is_on_the_ledger(
    gemini: Stack, standin: StandIn, db: sa.Engine, user: str
) -> None:
    run = _run()
    # When a lesson in Brazilian Portuguese is created
    job_id = _create(gemini, user, f"Tides [run:{run}]", language="pt-BR", depth="highlights")
    body = gemini.wait_for(user, job_id, timeout=30)
    assert body["status"] == "done", body
    # Then the stand-in saw one plan call and two section calls, each with its JSON schema
    seen = standin.calls(run=run)
    assert sorted(c["kind"] for c in seen) == ["plan", "section", "section"]
    assert all(c["status"] == 200 and c["schema_sent"] and c["model"] == MODEL for c in seen)
    # And the lesson is the plan with the written sections, from the model's replies
    lesson = gemini.get_lesson(user, body["result"]["lesson_id"]).json()
    content = lesson["content"]
    assert content["generator"] == f"gemini/{MODEL}" and content["language"] == "pt-BR"
    assert content["title"].startswith("Stand-in text")
    assert [sorted(s) for s in content["sections"]] == [
        ["body", "heading", "key_points", "prompt_version", "quiz"]
    ] * 2
    # And every call is on the ledger: the job, each section's index, the prompt versions, tokens
    calls = _calls(db, [job_id])
    assert (calls[0].purpose, calls[0].section_index, calls[0].outcome) == ("plan", None, "ok")
    assert sorted((c.purpose, c.section_index, c.outcome) for c in calls[1:]) == [
        ("section", 0, "ok"),
        ("section", 1, "ok"),
    ]
    assert {(c.user_id, c.attempt) for c in calls} == {(user, 1)}
    assert calls[0].prompt_version.startswith("plan@1+") and "system@1+" in calls[0].prompt_version
    assert all(c.prompt_version.startswith("section@1+") for c in calls[1:])
    assert all(c.latency_ms is not None and c.latency_ms >= 0 for c in calls)
    # The prompts ask for the lesson's language (bodies are kept in this stack)
    assert 'BCP 47 tag is "pt-BR"' in calls[0].request_body["system"]
    # And the ledger's tokens are the stand-in's, which get_job reports as the job's usage
    tokens = (sum(c["input_tokens"] for c in seen), sum(c["output_tokens"] for c in seen))
    assert (sum(c.input_tokens for c in calls), sum(c.output_tokens for c in calls)) == tokens
    usage = gemini.get_job(user, job_id).json()["usage"]
    assert usage == {"calls": 3, "input_tokens": tokens[0], "output_tokens": tokens[1]}


def test_a_malformed_reply_gets_one_repair_call(
    gemini: Stack, standin: StandIn, db: sa.Engine, user: str
) -> None:
    run = _run()
    job_id = _create(gemini, user, f"Volcanoes [run:{run}] [standin:malformed:plan]")
    body = gemini.wait_for(user, job_id, timeout=30)
    assert body["status"] == "done" and body["attempts"] == 1, body
    assert [c["kind"] for c in standin.calls(run=run)][:2] == ["plan", "repair"]
    plan_calls = [
        (c.purpose, c.outcome, c.error_code) for c in _calls(db, [job_id]) if c.section_index is None
    ]
    assert plan_calls == [("plan", "invalid", "reply_invalid"), ("repair", "ok", None)]


def test_a_reply_invalid_after_its_repair_fails_the_attempt_and_the_job_retries_it(
    gemini: Stack, standin: StandIn, db: sa.Engine, user: str
) -> None:
    run = _run()
    job_id = _create(gemini, user, f"Glaciers [run:{run}] [standin:malformed-always:plan]")
    body = gemini.wait_for(user, job_id, timeout=30)
    # Two attempts (the stack's maximum), each a call and one repair, then `error`
    assert (body["status"], body["attempts"], body["error"]["code"]) == ("error", 2, "attempts_exhausted")
    assert [c["kind"] for c in standin.calls(run=run)] == ["plan", "repair"] * 2
    assert [(c.purpose, c.attempt, c.outcome) for c in _calls(db, [job_id])] == [
        ("plan", 1, "invalid"),
        ("repair", 1, "invalid"),
        ("plan", 2, "invalid"),
        ("repair", 2, "invalid"),
    ]


def test_a_safety_block_ends_the_job_in_error_with_model_refused_and_no_retry(
    gemini: Stack, standin: StandIn, db: sa.Engine, user: str
) -> None:
    run = _run()
    job_id = _create(gemini, user, f"Something harmful [run:{run}] [standin:safety]")
    body = gemini.wait_for(user, job_id, timeout=30)
    assert (body["status"], body["attempts"], body["error"]["code"]) == ("error", 1, "model_refused")
    assert len(standin.calls(run=run)) == 1
    [call] = _calls(db, [job_id])
    assert (call.outcome, call.error_code) == ("refused", "prompt blocked: SAFETY")
    assert call.input_tokens == standin.calls(run=run)[0]["input_tokens"]
    assert gemini.get_job(user, job_id).json()["usage"]["calls"] == 1


def test_a_provider_500_is_an_ordinary_failure_retried_by_the_job_system(
    gemini: Stack, standin: StandIn, db: sa.Engine, user: str
) -> None:
    run = _run()
    job_id = _create(gemini, user, f"Comets [run:{run}] [standin:500-once:plan]")
    body = gemini.wait_for(user, job_id, timeout=45)
    assert (body["status"], body["attempts"]) == ("done", 2), body
    plan_calls = [(c.purpose, c.attempt, c.outcome, c.error_code) for c in _calls(db, [job_id])][:2]
    assert plan_calls == [("plan", 1, "error", "http_500"), ("plan", 2, "ok", None)]
    # One request per attempt: the SDK retried nothing itself
    assert [(c["kind"], c["status"]) for c in standin.calls(run=run)][:2] == [("plan", 500), ("plan", 200)]


# --- one lane, two process_job instances -----------------------------------------------------------


@pytest.fixture(scope="module")
def two_instances(database_url: str, logs_dir: Path, standin: StandIn) -> Iterator[dict[str, str]]:
    """Two process_job instances on one lane (LANE_MODEL: RPM per WINDOW s, CONCURRENCY in flight),
    and a create_job in front of each. A lesson created through either plans on its instance and
    its sections run on the other, so both instances' calls interleave on the lane. One attempt per
    job: a 429 that used an attempt would end its job in error."""
    ports = [free_port(), free_port()]
    env = base_env(
        database_url,
        **_gemini_env(
            standin,
            LANE_MODEL,
            DYLEN_MODEL_LIMITS=f"{LANE_MODEL}=rpm:{RPM},concurrency:{CONCURRENCY}",
            DYLEN_MODEL_WINDOW_SECONDS=str(WINDOW),
            DYLEN_MODEL_SLOT_WAIT_SECONDS="15",
            DYLEN_JOB_MAX_ATTEMPTS="1",
            THREADS="8",
        ),
    )
    servers = []
    for mine, other in ((ports[0], ports[1]), (ports[1], ports[0])):
        servers.append(
            FunctionServer(
                "process_job",
                {**env, "DYLEN_PROCESS_JOB_URL": f"http://127.0.0.1:{other}/"},
                logs_dir,
                port=mine,
            )
        )
        servers.append(
            FunctionServer(
                "create_job", {**env, "DYLEN_PROCESS_JOB_URL": f"http://127.0.0.1:{mine}/"}, logs_dir
            )
        )
    servers.append(FunctionServer("get_job", env, logs_dir))
    for server in servers:
        server.start(wait=False)
    try:
        for server in servers:
            server.wait_ready()
        yield {
            "create_0": servers[1].url,
            "create_1": servers[3].url,
            "get_job": servers[4].url,
            "process_0": str(servers[0].log_path),
            "process_1": str(servers[2].log_path),
            "logs": " ".join(str(s.log_path) for s in servers),
        }
    finally:
        for server in servers:  # no graceful drain: calls may be waiting for a slot
            server.kill()


def _lessons_on_two_instances(
    two_instances: dict[str, str], standin: StandIn, user: str, run: str, topics: list[str]
) -> tuple[Stack, list[str]]:
    stack = Stack({})
    job_ids = []
    for n, topic in enumerate(topics):
        create = two_instances[f"create_{n % 2}"]
        job_ids.append(_create(stack, user, f"{topic} [run:{run}]", create_url=create))
    return stack, job_ids


def _wait_all(
    two_instances: dict[str, str], stack: Stack, user: str, job_ids: list[str]
) -> list[dict[str, Any]]:
    bodies: dict[str, dict[str, Any]] = {}

    def finished() -> bool:
        for job_id in job_ids:
            if job_id not in bodies:
                response = stack.http.get(
                    f"{two_instances['get_job']}/{job_id}", headers={"X-Dylen-User": user}
                )
                body = response.json()
                if body["status"] in ("done", "error", "canceled"):
                    bodies[job_id] = body
        return len(bodies) == len(job_ids)

    wait_until(finished, timeout=60, interval=0.2, what="every lesson finished")
    return [bodies[j] for j in job_ids]


def _check_the_lane_held(
    standin: StandIn, db: sa.Engine, run: str, job_ids: list[str]
) -> list[dict[str, Any]]:
    seen = standin.calls(run=run)
    # The stand-in never saw more calls in any window than the lane allows, whichever instance sent them
    assert most_in_any_window([c["arrived"] for c in seen], WINDOW) <= RPM
    assert len(seen) > RPM  # the limit bound: more calls than one window allows
    # ...nor more in flight at once
    arrivals = sorted([(c["arrived"], 1) for c in seen] + [(c["ended"], -1) for c in seen])
    in_flight = most = 0
    for _, step in arrivals:
        in_flight += step
        most = max(most, in_flight)
    assert most <= CONCURRENCY
    # And the ledger's token sums are the stand-in's, call for call
    calls = _calls(db, job_ids)
    assert len(calls) == len(seen)
    assert sum(c.input_tokens or 0 for c in calls) == sum(c["input_tokens"] for c in seen)
    assert sum(c.output_tokens or 0 for c in calls) == sum(c["output_tokens"] for c in seen)
    return seen


def test_two_process_job_instances_share_one_lane_and_the_limit_holds_across_them(
    two_instances: dict[str, str], standin: StandIn, db: sa.Engine, user: str
) -> None:
    standin.configure(latency=0.4, rate_429=0)
    run = _run()
    stack, job_ids = _lessons_on_two_instances(
        two_instances, standin, user, run, [f"Topic {n}" for n in range(6)]
    )
    bodies = _wait_all(two_instances, stack, user, job_ids)
    assert [b["status"] for b in bodies] == ["done"] * 6, bodies
    _check_the_lane_held(standin, db, run, job_ids)
    # Both instances planned lessons and wrote sections: their calls shared the lane
    for log in (two_instances["process_0"], two_instances["process_1"]):
        text = Path(log).read_text()
        assert "Job planned; its sections are dispatched" in text and "Job completed successfully." in text


def test_429s_pause_the_lane_reschedule_without_using_an_attempt_and_answer_no_5xx(
    two_instances: dict[str, str], standin: StandIn, db: sa.Engine, user: str
) -> None:
    # Given the provider answers 429 (RetryInfo 1 s) to 10% of calls, and to the first call of one
    # lesson's plan in any case
    standin.configure(latency=0.4, rate_429=0.1, retry_delay=1)
    run = _run()
    topics = [f"Topic {n}" for n in range(5)] + ["Topic 5 [standin:429-once:plan]"]
    stack, job_ids = _lessons_on_two_instances(two_instances, standin, user, run, topics)
    bodies = _wait_all(two_instances, stack, user, job_ids)
    standin.configure(rate_429=0)
    # Then every lesson is done on its one attempt: no 429 used an attempt
    assert [b["status"] for b in bodies] == ["done"] * 6, bodies
    seen = _check_the_lane_held(standin, db, run, job_ids)
    limited = [c for c in seen if c["status"] == 429]
    assert limited
    calls = _calls(db, job_ids)
    assert sum(1 for c in calls if c.outcome == "rate_limited") == len(limited)
    # And process_job never answered >= 500 to a delivery of these jobs
    logs = " ".join(Path(p).read_text() for p in two_instances["logs"].split())
    assert not [
        line
        for line in logs.splitlines()
        if "process_job asked for a retry" in line
        and '"status": 5' in line
        and any(j in line for j in job_ids)
    ]


# --- the pieces, in-process -------------------------------------------------------------------------


def test_gemini_settings_need_one_credential_and_a_timeout_inside_the_lease() -> None:
    from common.lessons.settings import lesson_settings
    from common.platform.errors import ConfigError

    base = {"DYLEN_LESSON_GENERATOR": "gemini"}
    settings = lesson_settings.load({**base, "GEMINI_API_KEY": "k"}).gemini
    assert settings is not None and (settings.model, settings.timeout_seconds) == ("gemini-2.5-flash", 120)
    vertex = lesson_settings.load({**base, "DYLEN_GEMINI_VERTEX_PROJECT": "p"}).gemini
    assert vertex is not None and (vertex.vertex_project, vertex.vertex_location) == ("p", "us-central1")
    for env, says in [
        (base, "exactly one of GEMINI_API_KEY"),
        ({**base, "GEMINI_API_KEY": "k", "DYLEN_GEMINI_VERTEX_PROJECT": "p"}, "exactly one of"),
        (
            {**base, "GEMINI_API_KEY": "k", "DYLEN_JOB_TIMEOUT_SECONDS": "240"},
            "DYLEN_GEMINI_TIMEOUT_SECONDS (120)",
        ),
        ({**base, "GEMINI_API_KEY": "k", "DYLEN_GEMINI_MODEL": "a b"}, "DYLEN_GEMINI_MODEL"),
        ({**base, "GEMINI_API_KEY": "k", "DYLEN_GEMINI_BASE_URL": "ftp://x"}, "DYLEN_GEMINI_BASE_URL"),
    ]:
        with pytest.raises(ConfigError) as raised:
            lesson_settings.load(env)
        assert says in raised.value.detail
    # Another generator needs none of it
    assert lesson_settings.load({"DYLEN_LESSON_GENERATOR": "tests.generators:fanout"}).gemini is None


def test_replies_are_checked_against_the_schema_and_the_contract() -> None:
    from common.lessons import replies

    plan = {"title": "T", "summary": "S", "sections": [{"heading": "H", "brief": "B"}] * 2}
    assert replies.checked_plan(plan, 2)["title"] == "T"
    for bad, says in [
        ({**plan, "sections": plan["sections"][:1]}, "reply.sections must have 2 to 2 items"),
        ({**plan, "title": " "}, "reply.title must be a text"),
        ({"title": "T", "sections": plan["sections"]}, "reply lacks `summary`"),
        ({**plan, "sections": [{"heading": "H"}] * 2}, "reply.sections[0] lacks `brief`"),
    ]:
        with pytest.raises(ValueError) as raised:
            replies.checked_plan(bad, 2)
        assert says in str(raised.value)
    section = {
        "heading": "H",
        "body": "B",
        "key_points": ["a", "b"],
        "quiz": {"question": "Q", "options": ["x", "y", "z"], "answer_index": 2},
    }
    assert replies.checked_section(section, 0) == section
    for quiz, says in [
        ({"answer_index": 3}, "answer_index must name one of the options"),
        ({"answer_index": True}, "must be a JSON integer"),
        ({"options": ["x", "y"]}, "options must have 3 to 4 items"),
    ]:
        with pytest.raises(ValueError) as raised:
            replies.checked_section({**section, "quiz": {**section["quiz"], **quiz}}, 0)
        assert says in str(raised.value)


def test_a_429s_retry_delay_is_read_from_its_retry_info() -> None:
    from common.lessons.gemini import DEFAULT_RETRY_AFTER_SECONDS, retry_delay

    info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7.5s"}
    assert retry_delay({"error": {"code": 429, "details": [{"@type": "x.QuotaFailure"}, info]}}) == 7.5
    assert retry_delay({"error": {"code": 429}}) == DEFAULT_RETRY_AFTER_SECONDS
    assert retry_delay("not json") == DEFAULT_RETRY_AFTER_SECONDS


@pytest.fixture
def in_process(
    app_env: dict[str, str], standin: StandIn, db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """The Gemini generator in this process (its own lane), and a request of a real lesson job."""
    from common.lessons import gemini as generator
    from common.lessons.generation import LessonRequest
    from tests.factories import make_job, make_user

    model = f"gemini-inproc-{uuid.uuid4().hex[:6]}"
    env = _gemini_env(standin, model, DYLEN_GEMINI_TIMEOUT_SECONDS="1", DYLEN_MODEL_SLOT_WAIT_SECONDS="0")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(generator, "_client", None)  # built afresh from these settings
    with db.begin() as conn:
        user = make_user(conn)
        job_id = make_job(conn, user_id=user, status="running")

    def request(topic: str) -> LessonRequest:
        return LessonRequest(topic, None, "highlights", "en", job_id, user, attempt=1)

    yield generator, request, job_id, model


def test_a_429_pauses_the_lane_for_everyone_and_raises_retry_later_with_its_retry_info(
    in_process: Any, standin: StandIn, db: sa.Engine
) -> None:
    from common.models import ledger
    from common.platform.db import connection
    from common.platform.errors import RetryLater

    generator, request, job_id, model = in_process
    standin.configure(retry_delay=2)
    run = _run()
    with pytest.raises(RetryLater) as later:
        generator.plan(request(f"Reefs [run:{run}] [standin:429-once]"))
    standin.configure(retry_delay=1)
    assert (later.value.after_seconds, later.value.reason) == (2.0, "rate_limited")
    assert len(standin.calls(run=run)) == 1  # no retry by the SDK
    with connection() as conn:
        lane = next(s for s in ledger.lane_states(conn) if s.model == model)
    assert lane.paused_until is not None  # every instance's next take sees it
    # Another call of the model, for anyone, now waits for the pause: RetryLater without calling
    with pytest.raises(RetryLater) as paused:
        generator.plan(request(f"Other [run:{run}]"))
    assert paused.value.reason == "lane_paused" and 1.0 < paused.value.after_seconds <= 2.1  # + jitter
    assert len(standin.calls(run=run)) == 1
    assert [(c.outcome, c.error_code) for c in _calls(db, [job_id])] == [("rate_limited", "rate_limited")]


def test_a_call_slower_than_its_timeout_is_an_ordinary_failure_on_the_ledger_as_timeout(
    in_process: Any, standin: StandIn, db: sa.Engine
) -> None:
    from common.platform.errors import DylenError

    generator, request, job_id, _ = in_process
    started = time.monotonic()
    with pytest.raises(Exception) as failed:
        generator.plan(request(f"Slow [run:{_run()}] [standin:slow=3]"))
    assert time.monotonic() - started < 2.5  # the 1 s timeout, not the stand-in's 3 s
    assert not isinstance(failed.value, DylenError)  # not permanent, not RetryLater: retried
    [call] = _calls(db, [job_id])
    assert call.outcome == "timeout" and "Timeout" in call.error_code


def test_a_wrong_api_key_is_retried_not_failed_for_good_and_a_bad_request_is_permanent(
    in_process: Any, standin: StandIn, db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.lessons import gemini as generator
    from common.lessons.settings import lesson_settings
    from common.platform.errors import PermanentJobError

    _, request, job_id, _ = in_process
    monkeypatch.setenv("GEMINI_API_KEY", "not-the-key")
    lesson_settings.reset()
    monkeypatch.setattr(generator, "_client", None)
    # Google answers an invalid key with 400: the configuration's fault, so an ordinary failure
    with pytest.raises(generator.ModelCallFailed, match="400 INVALID_ARGUMENT"):
        generator.plan(request(f"Keys [run:{_run()}]"))
    assert [(c.outcome, c.error_code) for c in _calls(db, [job_id])] == [("error", "http_400")]

    # A 400 about the request itself: resending cannot help, so the job ends (no retry)
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    lesson_settings.reset()
    monkeypatch.setattr(generator, "_client", None)
    with pytest.raises(PermanentJobError) as rejected:
        generator.plan(request(f"Bad [run:{_run()}] [standin:400]"))
    assert rejected.value.code == "model_request_rejected" and rejected.value.public_message
    assert [(c.outcome, c.error_code) for c in _calls(db, [job_id])][1:] == [("error", "http_400")]

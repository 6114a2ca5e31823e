"""A lesson generator for tests, loaded by the function processes via DYLEN_LESSON_GENERATOR.

The topic chooses the behaviour so one server can serve every scenario:
  "fail-once ..."   raises on attempt 1, then succeeds
  "fail-always ..." raises on every attempt
  "permanent ..."   raises PermanentJobError (retrying cannot help)
  "slow:<s> ..."    sleeps <s> seconds first (holds the lease)
  "block:<path>"    waits until <path> exists (for killing the process mid-job)
  "later-twice:<s> ..."  raises RetryLater(<s>) on its first two claims (a provider's 429), then writes
  "later-always:<s> ..." raises RetryLater(<s>) on every claim
  "secret ..."      raises an error whose text holds a credential (SECRET), on every attempt
  "dbdown-once ..." raises DatabaseUnavailable on its first claim (the database dropped mid-run)
  "chaos:<fail>:<later> ..."  fails (RuntimeError) with probability <fail>, else raises RetryLater(0)
                    with probability <later>, else writes (the soak's generator)
Every run is recorded in $DYLEN_TEST_CALLS_DIR/<job_id>, one line per call.

Two planners: `fanout` (the template's plan and sections, failing or slow on cue) and `counting`
(every plan and section a model call through the lane and onto the ledger); their docstrings say
how a topic drives them.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.lessons import template
from common.lessons.generation import LessonRequest
from common.lessons.template import generate_lesson
from common.platform.errors import DatabaseUnavailable, PermanentJobError, RetryLater

# What a careless SDK puts in an exception: the request URL, API key included.
SECRET = "AIzaSyTESTSECRET0123456789abcdefghijkl"


def _record(request: LessonRequest) -> None:
    directory = os.environ.get("DYLEN_TEST_CALLS_DIR")
    if directory:
        with open(Path(directory) / request.job_id, "a") as calls:
            calls.write(f"{request.attempt}\n")


def generate(request: LessonRequest) -> dict[str, Any]:
    _record(request)
    topic = request.topic
    if topic.startswith("fail-once") and request.attempt == 1:
        raise RuntimeError("transient: the model timed out")
    if topic.startswith("fail-always"):
        raise RuntimeError("transient: the model is down")
    if topic.startswith("permanent"):
        raise PermanentJobError("unsupported_topic", "This topic cannot be taught.")
    if topic.startswith("later-twice:") and request.attempt <= 2:
        raise RetryLater(float(topic.split(":", 1)[1].split()[0]), "rate_limited")
    if topic.startswith("later-always:"):
        raise RetryLater(float(topic.split(":", 1)[1].split()[0]), "rate_limited")
    if topic.startswith("secret"):
        raise RuntimeError(f"HTTPError 401 for url https://models.example/v1/generate?key={SECRET}")
    if topic.startswith("dbdown-once") and request.attempt == 1:
        raise DatabaseUnavailable("The database is unreachable; retry shortly.")
    if topic.startswith("chaos:"):
        fail, later = (float(p) for p in topic.split()[0].split(":")[1:3])
        draw = random.random()
        if draw < fail:
            raise RuntimeError("transient: chaos")
        if draw < fail + later:
            raise RetryLater(0, "rate_limited")
    if topic.startswith("slow:"):
        time.sleep(float(topic.split(":", 1)[1].split()[0]))
    if topic.startswith("block:"):
        gate = Path(topic.split(":", 1)[1].strip())
        deadline = time.monotonic() + 120
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return generate_lesson(request)


class Fanout:
    """A planner for tests (DYLEN_LESSON_GENERATOR=tests.generators:fanout): the template's plan and
    sections, with behaviour chosen by the topic:
      "permanent-plan ..."      plan raises PermanentJobError
      "fail-once ..."           plan fails on its attempt 1 (the lesson job is retried), then plans
      "flaky-section:<i> ..."   section i fails on its attempts 1 and 2, then succeeds
      "fail3-section:<i> ..."   section i fails on its attempts 1 to 3 (a whole run of 3 attempts)
      "secret-section:<i> ..."  section i fails on every attempt with a credential in the error
      "slow:<s> ..."            each section sleeps <s> seconds first
      "block:<path>"            each section waits until <path> exists
    Every call is recorded in $DYLEN_TEST_CALLS_DIR/<lesson job id>: "plan <attempt>" or
    "section <index> <attempt>", one line each (read by tests.support.generator_calls).
    """

    def plan(self, request: LessonRequest) -> dict[str, Any]:
        _record_line(request.job_id, f"plan {request.attempt}")
        if request.topic.startswith("permanent-plan"):
            raise PermanentJobError("unsupported_topic", "This topic cannot be planned.")
        if request.topic.startswith("fail-once") and request.attempt == 1:
            raise RuntimeError("transient: the planner timed out")
        return template.plan(request)

    def write_section(self, request: LessonRequest, plan: dict[str, Any], index: int) -> dict[str, Any]:
        _record_line(request.job_id, f"section {index} {request.attempt}")
        topic = request.topic
        if topic.startswith(f"flaky-section:{index} ") and request.attempt <= 2:
            raise RuntimeError(f"transient: section {index} timed out")
        if topic.startswith(f"fail3-section:{index} ") and request.attempt <= 3:
            raise RuntimeError(f"transient: section {index} model is down")
        if topic.startswith(f"secret-section:{index} "):
            raise RuntimeError(f"HTTPError 401 for url https://models.example/v1/generate?key={SECRET}")
        if topic.startswith("slow:"):
            time.sleep(float(topic.split(":", 1)[1].split()[0]))
        if topic.startswith("block:"):
            gate = Path(topic.split(":", 1)[1].strip())
            deadline = time.monotonic() + 120
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return template.write_section(request, plan, index)


COUNTING_MODEL = "test-model"
COUNTING_TOKENS = (100, 50)  # input, output tokens each counting call reports


class Counting:
    """A planner whose every call is a model call (DYLEN_LESSON_GENERATOR=tests.generators:counting):
    `plan` and each `write_section` run inside `request.model_call(COUNTING_MODEL, ...)`, so the
    lane, the user's share and the ledger see them, and each reports COUNTING_TOKENS. When a call
    ends (raised or not), one line is appended to $DYLEN_TEST_CALLS_DIR/<user_id>.calls:
    "<lesson job id> plan|section:<i> <attempt> <start> <end>" (time.time() stamps; read by
    tests.support.counted_calls). A call the lane refuses (RetryLater, a canceled job) writes none.
    The topic chooses the behaviour:
      "slow:<s> ..."          every call lasts <s> seconds
      "hold:<path> ..."       every section's call lasts until <path> exists (a cancel mid-call)
      "wait:<path> ..."       every section waits for <path> before its call (claimed, not calling)
      "later-plan:<s> ..."    plan raises RetryLater(<s>) before its call (a claim given back)
      "fail-plan ..."         the plan's call fails (RuntimeError) on every attempt
      "fail-section:<i> ..."  section i's call fails on every attempt
    """

    def plan(self, request: LessonRequest) -> dict[str, Any]:
        topic = request.topic
        if topic.startswith("later-plan:"):
            raise RetryLater(float(topic.split(":", 1)[1].split()[0]), "rate_limited")
        with self._call(request, "plan"):
            if topic.startswith("fail-plan"):
                raise RuntimeError("transient: the model is down")
            return template.plan(request)

    def write_section(self, request: LessonRequest, plan: dict[str, Any], index: int) -> dict[str, Any]:
        topic = request.topic
        if topic.startswith("wait:"):
            _wait_for(Path(topic.split(":", 1)[1].split()[0]))
        with self._call(request, f"section:{index}"):
            if topic.startswith("hold:"):
                _wait_for(Path(topic.split(":", 1)[1].split()[0]))
            if topic.startswith(f"fail-section:{index} "):
                raise RuntimeError(f"transient: section {index} model is down")
            return template.write_section(request, plan, index)

    @contextmanager
    def _call(self, request: LessonRequest, what: str) -> Iterator[None]:
        with request.model_call(COUNTING_MODEL, purpose=what.split(":")[0], estimated_tokens=150) as call:
            started = time.time()
            try:
                if request.topic.startswith("slow:"):
                    time.sleep(float(request.topic.split(":", 1)[1].split()[0]))
                call.usage(*COUNTING_TOKENS)
                yield
            finally:
                directory = os.environ.get("DYLEN_TEST_CALLS_DIR")
                if directory:
                    line = f"{request.job_id} {what} {request.attempt} {started:.6f} {time.time():.6f}\n"
                    with open(Path(directory) / f"{request.user_id}.calls", "a") as calls:
                        calls.write(line)  # one short O_APPEND write: lines never interleave


def _wait_for(gate: Path) -> None:
    deadline = time.monotonic() + 60
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


counting = Counting()


def _record_line(job_id: str, line: str) -> None:
    directory = os.environ.get("DYLEN_TEST_CALLS_DIR")
    if directory:
        # One short O_APPEND write per call: concurrent sections never interleave within a line.
        with open(Path(directory) / job_id, "a") as calls:
            calls.write(line + "\n")


fanout = Fanout()

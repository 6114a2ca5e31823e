"""Lesson generators that fail on purpose, for trying the failure paths locally and for the tests.

Pick one with DYLEN_LESSON_GENERATOR (the README's "Make a failure and watch it"):

    DYLEN_LESSON_GENERATOR=devtools.generators:generate make run   # one step per lesson
    DYLEN_LESSON_GENERATOR=devtools.generators:fanout make run     # a plan, then one job per section

The topic's first word chooses what happens; the rest of the topic is the lesson's subject, written
by the built-in template generator whenever nothing fails ("fail-once Volcanoes").

`generate` (one step):
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

`fanout` (a planner): see Fanout.

Every run is recorded in $DYLEN_TEST_CALLS_DIR/<job_id>, one line per call, when that is set (the
tests count calls with it). tests/generators.py re-exports both under their old names.
"""

from __future__ import annotations

import os
import random
import time
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
    """A planner (DYLEN_LESSON_GENERATOR=devtools.generators:fanout): the template's plan and
    sections, with behaviour chosen by the topic:
      "permanent-plan ..."      plan raises PermanentJobError
      "fail-once ..."           plan fails on its attempt 1 (the lesson job is retried), then plans
      "flaky-section:<i> ..."   section i fails on its attempts 1 and 2, then succeeds
      "fail3-section:<i> ..."   section i fails on its attempts 1 to 3: with DYLEN_JOB_MAX_ATTEMPTS=3
                                the lesson fails (section_failed), and an operator's retry makes it
      "secret-section:<i> ..."  section i fails on every attempt with a credential in the error
      "slow:<s> ..."            each section sleeps <s> seconds first
      "stagger:<s> ..."         section i sleeps (i + 1) * <s> seconds first: progress in steps
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
        if topic.startswith("stagger:"):
            time.sleep((index + 1) * float(topic.split(":", 1)[1].split()[0]))
        if topic.startswith("block:"):
            gate = Path(topic.split(":", 1)[1].strip())
            deadline = time.monotonic() + 120
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return template.write_section(request, plan, index)


def _record_line(job_id: str, line: str) -> None:
    directory = os.environ.get("DYLEN_TEST_CALLS_DIR")
    if directory:
        # One short O_APPEND write per call: concurrent sections never interleave within a line.
        with open(Path(directory) / job_id, "a") as calls:
            calls.write(line + "\n")


fanout = Fanout()

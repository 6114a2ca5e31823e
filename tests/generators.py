"""Generators for tests. The failure generators keep the names the tests have always used
(`tests.generators:generate`, `tests.generators:fanout`); they live in devtools/generators.py, where
the README documents them. `counting` is the tests' own: every call a model call, counted."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.lessons import template
from common.lessons.generation import LessonRequest
from common.platform.errors import RetryLater
from devtools.generators import SECRET, Fanout, fanout, generate

__all__ = [
    "COUNTING_MODEL",
    "COUNTING_TOKENS",
    "SECRET",
    "Counting",
    "Fanout",
    "counting",
    "fanout",
    "generate",
]

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

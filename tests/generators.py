"""A lesson generator for tests, loaded by the function processes via DYLEN_LESSON_GENERATOR.

The topic chooses the behaviour so one server can serve every scenario:
  "fail-once ..."   raises on attempt 1, then succeeds
  "fail-always ..." raises on every attempt
  "permanent ..."   raises PermanentJobError (retrying cannot help)
  "slow:<s> ..."    sleeps <s> seconds first (holds the lease)
  "block:<path>"    waits until <path> exists (for killing the process mid-job)
Every run is recorded in $DYLEN_TEST_CALLS_DIR/<job_id>, one line per call.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from common.lessons.generation import LessonRequest
from common.lessons.template import generate_lesson
from common.platform.errors import PermanentJobError


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
    if topic.startswith("slow:"):
        time.sleep(float(topic.split(":", 1)[1].split()[0]))
    if topic.startswith("block:"):
        gate = Path(topic.split(":", 1)[1].strip())
        deadline = time.monotonic() + 120
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return generate_lesson(request)

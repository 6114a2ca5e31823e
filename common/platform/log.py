"""One JSON object per line on stdout, in the shape Cloud Logging reads (severity, message, trace).

The trace is the current span's when telemetry is on (with its span id, so Cloud Logging shows the
line under that span in Cloud Trace), else the request's X-Cloud-Trace-Context."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

from common.platform.telemetry import current_ids

_trace: contextvars.ContextVar[str | None] = contextvars.ContextVar("dylen_trace", default=None)
_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                entry[key] = value
        ids = current_ids()
        if ids is not None:
            entry["logging.googleapis.com/trace"] = _trace_name(ids[0])
            entry["logging.googleapis.com/spanId"] = ids[1]
            entry["logging.googleapis.com/trace_sampled"] = ids[2]
        elif trace := _trace.get():
            entry["logging.googleapis.com/trace"] = trace
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _configure() -> logging.Logger:
    logger = logging.getLogger("dylen")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("DYLEN_LOG_LEVEL", "INFO").upper())
        logger.propagate = False
    return logger


logger = _configure()


class RateLimit:
    """At most one log line per key per `seconds`, counting what it held back (a queue retrying a
    refused task ten times a second, a database away for minutes)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, int]] = {}  # key -> (next allowed, held back since)

    def allow(self, key: str) -> int | None:
        """None: hold this one back; else how many were held back since the last line."""
        now = time.monotonic()
        with self._lock:
            allowed_at, held = self._state.get(key, (0.0, 0))
            if now < allowed_at:
                self._state[key] = (allowed_at, held + 1)
                return None
            self._state[key] = (now + self.seconds, 0)
            return held


def _trace_name(trace_id: str) -> str:
    project = os.environ.get("GOOGLE_CLOUD_PROJECT")
    return f"projects/{project}/traces/{trace_id}" if project else trace_id


def set_trace(header: str | None) -> contextvars.Token[str | None]:
    """Bind the request's X-Cloud-Trace-Context (`TRACE_ID/SPAN;o=1`) to its log lines."""
    value = None
    if header:
        trace_id = header.split("/", 1)[0].strip()
        if trace_id and len(trace_id) <= 64 and trace_id.isalnum():
            value = _trace_name(trace_id)
    return _trace.set(value)


def reset_trace(token: contextvars.Token[str | None]) -> None:
    _trace.reset(token)


_instance: str | None = None


def instance_id() -> str:
    """Which instance this is, for operators reading an attempt's record: Cloud Run's revision
    (K_REVISION) or `local`, the host and the process."""
    global _instance
    if _instance is None:
        _instance = f"{os.environ.get('K_REVISION', 'local')}/{socket.gethostname()}/{os.getpid()}"
    return _instance

"""The job system's settings: attempts and their backoff, leases, waits, rescue, and how the local
dispatcher delivers."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from common.platform.env import Reader, Section
from common.platform.errors import ConfigError


@dataclass(frozen=True)
class RetryPolicy:
    """How a kind's failed attempts are retried: exponential backoff with full jitter (AWS's
    "Exponential Backoff And Jitter"): the n-th retry waits a uniform draw from 0 to
    min(cap, base * 2**(n-1)), so retries of many jobs spread out instead of arriving together."""

    base_seconds: float
    cap_seconds: float
    max_attempts: int

    def ceiling(self, attempt: int) -> float:
        """The longest wait after failed attempt number `attempt` (1-based)."""
        return min(self.cap_seconds, self.base_seconds * 2 ** max(0, attempt - 1))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(0.0, self.ceiling(attempt))


@dataclass(frozen=True)
class JobSettings:
    auto_process: bool  # dispatch each job as it is created (off: tests and manual setups deliver)
    max_attempts: int
    timeout_seconds: int  # an attempt's lease, and the dispatch deadline of its task
    rescue_after_seconds: int  # a queued job this long past its due time is dispatched again
    retry: RetryPolicy  # every kind's, unless DYLEN_JOB_RETRY_POLICIES names it
    max_wait_seconds: float  # the most RetryLater and infrastructure faults may defer one job
    retention_days: int  # finished jobs older than this are deleted by the daily maintenance
    local_dispatch_min_backoff_seconds: float
    local_dispatch_max_backoff_seconds: float
    local_dispatch_workers: int
    retry_by_kind: dict[str, RetryPolicy] = field(default_factory=dict)

    def policy(self, kind: str) -> RetryPolicy:
        return self.retry_by_kind.get(kind, self.retry)


def parse_policies(raw: str, default: RetryPolicy, name: str) -> dict[str, RetryPolicy]:
    """`kind=base:10,cap:600,attempts:5;other=attempts:3`: per kind, what differs from the default."""
    policies: dict[str, RetryPolicy] = {}
    for entry in raw.split(";"):
        if not entry.strip():
            continue
        kind, sep, spec = entry.partition("=")
        kind = kind.strip()
        values = {"base": default.base_seconds, "cap": default.cap_seconds, "attempts": default.max_attempts}
        for item in spec.split(","):
            key, colon, value = item.partition(":")
            key = key.strip()
            if not sep or not kind or not colon or key not in values:
                raise ConfigError(f"{name}: expected kind=base:S,cap:S,attempts:N;..., got {entry.strip()!r}")
            try:
                values[key] = int(value) if key == "attempts" else float(value)
            except ValueError:
                raise ConfigError(
                    f"{name}: {key} of {kind!r} must be a number, got {value.strip()!r}"
                ) from None
        if values["attempts"] < 1 or values["base"] < 0 or values["cap"] < values["base"]:
            raise ConfigError(f"{name}: {kind!r} needs attempts >= 1 and 0 <= base <= cap")
        policies[kind] = RetryPolicy(float(values["base"]), float(values["cap"]), int(values["attempts"]))
    return policies


def _load(r: Reader) -> JobSettings:
    max_attempts = r.integer("DYLEN_JOB_MAX_ATTEMPTS", 5, minimum=1, maximum=100)
    retry = RetryPolicy(
        base_seconds=r.number("DYLEN_JOB_RETRY_BASE_SECONDS", 10.0, minimum=0.0),
        cap_seconds=r.number("DYLEN_JOB_RETRY_CAP_SECONDS", 600.0, minimum=0.0),
        max_attempts=max_attempts,
    )
    if retry.cap_seconds < retry.base_seconds:
        raise ConfigError("DYLEN_JOB_RETRY_CAP_SECONDS must be >= DYLEN_JOB_RETRY_BASE_SECONDS")
    settings = JobSettings(
        auto_process=r.boolean("DYLEN_JOBS_AUTO_PROCESS", True),
        max_attempts=max_attempts,
        timeout_seconds=r.integer("DYLEN_JOB_TIMEOUT_SECONDS", 600, minimum=1, maximum=86400),
        rescue_after_seconds=r.integer("DYLEN_RESCUE_AFTER_SECONDS", 300, minimum=1),
        retry=retry,
        max_wait_seconds=r.number("DYLEN_JOB_MAX_WAIT_SECONDS", 3600.0, minimum=0.0),
        retention_days=r.integer("DYLEN_JOB_RETENTION_DAYS", 30, minimum=1, maximum=3650),
        local_dispatch_min_backoff_seconds=r.number(
            "DYLEN_LOCAL_DISPATCH_MIN_BACKOFF_SECONDS", 0.1, minimum=0.0
        ),
        local_dispatch_max_backoff_seconds=r.number(
            "DYLEN_LOCAL_DISPATCH_MAX_BACKOFF_SECONDS", 10.0, minimum=0.0
        ),
        local_dispatch_workers=r.integer("DYLEN_LOCAL_DISPATCH_WORKERS", 8, minimum=1, maximum=256),
        retry_by_kind=parse_policies(
            r.text("DYLEN_JOB_RETRY_POLICIES") or "", retry, "DYLEN_JOB_RETRY_POLICIES"
        ),
    )
    if settings.local_dispatch_max_backoff_seconds < settings.local_dispatch_min_backoff_seconds:
        raise ConfigError(
            "DYLEN_LOCAL_DISPATCH_MAX_BACKOFF_SECONDS must be >= DYLEN_LOCAL_DISPATCH_MIN_BACKOFF_SECONDS"
        )
    return settings


job_settings = Section(_load)

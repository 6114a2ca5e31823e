"""The job system's settings: attempts, leases, rescue, and how the local dispatcher delivers."""

from __future__ import annotations

from dataclasses import dataclass

from common.platform.env import Reader, Section
from common.platform.errors import ConfigError


@dataclass(frozen=True)
class JobSettings:
    auto_process: bool  # dispatch each job as it is created (off: tests and manual setups deliver)
    max_attempts: int
    timeout_seconds: int  # an attempt's lease, and the dispatch deadline of its task
    rescue_after_seconds: int  # a queued job older than this is dispatched again by rescue_jobs
    local_dispatch_min_backoff_seconds: float
    local_dispatch_max_backoff_seconds: float
    local_dispatch_workers: int


def _load(r: Reader) -> JobSettings:
    settings = JobSettings(
        auto_process=r.boolean("DYLEN_JOBS_AUTO_PROCESS", True),
        max_attempts=r.integer("DYLEN_JOB_MAX_ATTEMPTS", 5, minimum=1, maximum=100),
        timeout_seconds=r.integer("DYLEN_JOB_TIMEOUT_SECONDS", 600, minimum=1, maximum=86400),
        rescue_after_seconds=r.integer("DYLEN_RESCUE_AFTER_SECONDS", 300, minimum=1),
        local_dispatch_min_backoff_seconds=r.number(
            "DYLEN_LOCAL_DISPATCH_MIN_BACKOFF_SECONDS", 0.1, minimum=0.0
        ),
        local_dispatch_max_backoff_seconds=r.number(
            "DYLEN_LOCAL_DISPATCH_MAX_BACKOFF_SECONDS", 10.0, minimum=0.0
        ),
        local_dispatch_workers=r.integer("DYLEN_LOCAL_DISPATCH_WORKERS", 8, minimum=1, maximum=256),
    )
    if settings.local_dispatch_max_backoff_seconds < settings.local_dispatch_min_backoff_seconds:
        raise ConfigError(
            "DYLEN_LOCAL_DISPATCH_MAX_BACKOFF_SECONDS must be >= DYLEN_LOCAL_DISPATCH_MIN_BACKOFF_SECONDS"
        )
    return settings


job_settings = Section(_load)

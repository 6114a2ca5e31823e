"""The `maintenance.archive_lessons` job kind and its daily scheduling: archive_lessons (called by
Cloud Scheduler) submits one job per UTC day through the job system, and the job runs the archiver,
then the job system's retention (finished jobs past DYLEN_JOB_RETENTION_DAYS) and the model-call
ledger's (calls past DYLEN_MODEL_CALL_RETENTION_DAYS)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from common.accounts.settings import tier_settings
from common.jobs.kinds import Completion
from common.jobs.model import Job
from common.jobs.retention import prune_finished
from common.jobs.service import Created, submit_job
from common.jobs.settings import job_settings
from common.lessons.archive.algorithm import archive_over_limit
from common.models import ledger
from common.platform.errors import ValidationFailed

KIND = "maintenance.archive_lessons"


class ArchiveLessonsKind:
    kind = KIND
    user_creatable = False  # only the archive_lessons function (task auth) creates these
    admission = None  # maintenance: no user, no tier

    def validate(self, payload: Any) -> dict[str, Any]:
        if payload not in (None, {}):
            raise ValidationFailed(
                "This job takes no payload.", errors=[{"field": "payload", "message": "must be empty"}]
            )
        return {}

    def run(self, job: Job) -> Completion:
        report = archive_over_limit(tier_settings().history_limits)
        # The day's other maintenance: finished jobs past their retention go (lessons stay), and
        # model call records past theirs.
        pruned = prune_finished(days=job_settings().retention_days)
        calls = ledger.prune()
        # All commit their own batches; there is nothing left to write with `done`.
        return Completion(result={**report.as_result(), **pruned.as_result(), "model_calls_pruned": calls})


def archive_key(today: datetime | None = None) -> str:
    """One maintenance job per UTC day: Cloud Scheduler may call twice, only one job runs."""
    return f"archive-{(today or datetime.now(UTC)).astimezone(UTC).date().isoformat()}"


def enqueue_daily_archive(today: datetime | None = None) -> Created:
    """Create today's maintenance job (owned by no user) and dispatch it; idempotent per UTC day:
    Cloud Scheduler may call twice, and the second call gets the same job (created=False)."""
    return submit_job(
        user_id=None,
        job_kind=KIND,
        idempotency_key=archive_key(today),
        request_json={"job_kind": KIND, "payload": {}},
    )

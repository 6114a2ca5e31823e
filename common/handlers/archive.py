"""The `maintenance.archive_lessons` job kind: run the batched archiver (created by archive_lessons)."""

from __future__ import annotations

from typing import Any

from common import archive
from common.config import get_settings
from common.errors import ValidationFailed
from common.handlers import Completion
from common.store import Job


class ArchiveLessonsHandler:
    kind = archive.KIND
    user_creatable = False  # only the archive_lessons function (task auth) creates these

    def validate(self, payload: Any) -> dict[str, Any]:
        if payload not in (None, {}):
            raise ValidationFailed(
                "This job takes no payload.", errors=[{"field": "payload", "message": "must be empty"}]
            )
        return {}

    def run(self, job: Job) -> Completion:
        report = archive.archive_over_limit(get_settings().tier_history_limits)
        # The archiver commits its own batches; there is nothing left to write with `done`.
        return Completion(result=report.as_result(), write=None)

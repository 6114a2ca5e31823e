"""The lesson product's SQL: reading lessons, and storing one with its job's `done` transition."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from common.jobs import transitions
from common.platform.db import Connection, Statement

LESSON_COLUMNS = "id, user_id, job_id, topic, title, content, created_at, archived_at"


def get_lesson(conn: Connection, lesson_id: uuid.UUID) -> Any:
    return conn.execute(
        Statement(f"SELECT {LESSON_COLUMNS} FROM lessons WHERE id = :id"), {"id": lesson_id}
    ).first()


def list_visible_lessons(
    conn: Connection,
    *,
    user_id: str,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[Any]:
    """Newest first, keyset-paged on (created_at, id); archived lessons never appear."""
    params: dict[str, Any] = {"user_id": user_id, "limit": limit}
    keyset = ""
    if after is not None:
        keyset = "AND (created_at, id) < (:after_created, :after_id)"
        params.update(after_created=after[0], after_id=after[1])
    return list(
        conn.execute(
            Statement(
                "SELECT id, job_id, topic, title, created_at FROM lessons "
                f"WHERE user_id = :user_id AND archived_at IS NULL {keyset} "
                "ORDER BY created_at DESC, id DESC LIMIT :limit"
            ),
            params,
        )
    )


# The lesson rides on its job's `done` (common.jobs.transitions): stored in the same statement, so
# there is never a done lesson job without its lesson, nor a lesson of a job that did not finish;
# lessons.job_id being unique stops a second lesson whatever happens.
ONE_STEP_LESSON = transitions.Output(
    """
    INSERT INTO lessons (id, user_id, job_id, topic, title, content)
    SELECT CAST(:lesson_id AS uuid), user_id, id, CAST(:topic AS text), CAST(:title AS text),
           CAST(:content AS jsonb)
      FROM done
    RETURNING id
    """
)

# The fan-in of a planned lesson: the plan with its briefs replaced by the sections in plan order.
PLANNED_LESSON = transitions.Output(
    """
    INSERT INTO lessons (id, user_id, job_id, topic, title, content)
    SELECT CAST(:lesson_id AS uuid), user_id, id, request_json #>> '{payload,topic}', plan ->> 'title',
           (plan - 'sections') || jsonb_build_object('sections', section_results)
      FROM done
    RETURNING id
    """,
    fan_in=True,
)


_LESSONS_OF_JOBS = Statement("SELECT job_id FROM lessons WHERE job_id = ANY(CAST(:ids AS uuid[]))")


def jobs_with_lessons(conn: Connection, job_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    rows = conn.execute(_LESSONS_OF_JOBS, {"ids": [str(i) for i in job_ids]})
    return {row.job_id for row in rows}

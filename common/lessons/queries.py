"""The lesson product's SQL: storing a lesson with its job's `done` transition, and reading lessons."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from common.jobs.queries import FINISH_GUARD
from common.platform.db import Connection, Statement, jsonb

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


_COMPLETE_JOB_WITH_LESSON = Statement(
    f"""
    WITH done AS (
        UPDATE jobs SET status = 'done', result_json = CAST(:result AS jsonb),
               error_json = NULL, lease_expires_at = NULL, completed_at = now(),
               updated_at = now()
        {FINISH_GUARD}
        RETURNING id, user_id
    )
    INSERT INTO lessons (id, user_id, job_id, topic, title, content)
    SELECT CAST(:lesson_id AS uuid), user_id, id, CAST(:topic AS text), CAST(:title AS text),
           CAST(:content AS jsonb)
      FROM done
    RETURNING id
    """,
    prepare=True,
)


def complete_job_with_lesson(
    conn: Connection,
    *,
    job_id: uuid.UUID,
    attempt: int,
    result: dict[str, Any],
    lesson_id: uuid.UUID,
    topic: str,
    title: str,
    content: dict[str, Any],
) -> bool:
    """The guarded `done` transition and the lesson insert as one statement: both or neither.

    If the claim was lost (canceled, or a newer attempt), the UPDATE matches nothing and no lesson
    is written; lessons.job_id being unique stops a second lesson whatever happens.
    """
    row = conn.execute(
        _COMPLETE_JOB_WITH_LESSON,
        {
            "id": job_id,
            "attempt": attempt,
            "result": jsonb(result),
            "lesson_id": lesson_id,
            "topic": topic,
            "title": title,
            "content": jsonb(content),
        },
    ).first()
    return row is not None


# The fan-in. Run right after a section's `done` in the transaction that locked the parent (see
# common.jobs.queries.finish_section), so it sees every section that finished before: the parent
# becomes `done` and its lesson (the plan, its briefs replaced by the sections in plan order) is
# stored in one statement, only if every section is done. Exactly one last finisher matches.
_COMPLETE_PARENT_WITH_LESSON = Statement(
    """
    WITH done AS (
        UPDATE jobs SET status = 'done',
               result_json = jsonb_build_object('lesson_id', CAST(:lesson_id AS text)),
               error_json = NULL, completed_at = now(), updated_at = now()
         WHERE id = :id AND status = 'running' AND lease_expires_at IS NULL AND plan IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM jobs s WHERE s.parent_id = jobs.id AND s.status <> 'done')
        RETURNING id, user_id, request_json, plan
    )
    INSERT INTO lessons (id, user_id, job_id, topic, title, content)
    SELECT CAST(:lesson_id AS uuid), user_id, id, request_json #>> '{payload,topic}', plan ->> 'title',
           (plan - 'sections') || jsonb_build_object('sections',
               (SELECT jsonb_agg(s.result_json ORDER BY s.section_index)
                  FROM jobs s WHERE s.parent_id = done.id))
      FROM done
    RETURNING id
    """,
    prepare=True,
)


def complete_parent_with_lesson(conn: Connection, *, job_id: uuid.UUID, lesson_id: uuid.UUID) -> bool:
    """True when this call stored the lesson (the last section); False while sections remain."""
    return (
        conn.execute(_COMPLETE_PARENT_WITH_LESSON, {"id": job_id, "lesson_id": lesson_id}).first() is not None
    )

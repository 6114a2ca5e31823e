"""The archiver, run in-process on a database of this module's own.

The archiver walks every user of its database, so these tests never share one with other tests
(whose users have a few lessons each and would lose them mid-test); each test starts empty.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from common.lessons.archive import algorithm as archive
from common.lessons.archive.algorithm import Batch
from tests.factories import make_history, make_lesson, make_user
from tests.support import base_env, migrated_database

DEFAULT_LIMITS = {"free": 3, "starter": 20, "plus": 50, "pro": 80}
BASE = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def archive_db_url(pg_admin_url: str) -> Iterator[str]:
    with migrated_database(pg_admin_url) as url:
        yield url


@pytest.fixture(scope="module")
def adb(archive_db_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sa.engine.make_url(archive_db_url).set(drivername="postgresql+pg8000"))
    yield engine
    engine.dispose()


@pytest.fixture
def run_env(archive_db_url: str, adb: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Empty the private database and point in-process `common` code at it."""
    from common.platform import db as common_db
    from common.platform.config import reset_settings

    with adb.begin() as conn:
        conn.execute(sa.text("TRUNCATE lessons, job_attempts, model_calls, quota_grants, jobs, users"))
    for key, value in base_env(archive_db_url).items():
        if key.startswith("DYLEN_"):
            monkeypatch.setenv(key, value)
    reset_settings()
    common_db.dispose_pool()
    yield
    common_db.dispose_pool()
    reset_settings()


def history(conn: sa.Connection, user: str, count: int, *, start: datetime = BASE) -> list[str]:
    """`count` lessons a minute apart, oldest first."""
    return [make_lesson(conn, user_id=user, created_at=start + timedelta(minutes=i)) for i in range(count)]


def visible(conn: sa.Connection, user: str) -> list[str]:
    rows = conn.execute(
        sa.text(
            "SELECT id FROM lessons WHERE user_id = :u AND archived_at IS NULL "
            "ORDER BY created_at DESC, id DESC"
        ),
        {"u": user},
    )
    return [str(r.id) for r in rows]


@pytest.mark.parametrize("tier", ["free", "starter", "plus", "pro"])
def test_each_default_tier_keeps_its_newest_lessons(run_env: None, adb: sa.Engine, tier: str) -> None:
    limit = DEFAULT_LIMITS[tier]
    with adb.begin() as conn:
        over = make_user(conn, tier=tier)
        at_limit = make_user(conn, tier=tier)
        under = make_user(conn, tier=tier)
        over_ids = history(conn, over, limit + 4)
        at_ids = history(conn, at_limit, limit)
        under_ids = history(conn, under, max(0, limit - 1))

    report = archive.archive_over_limit(DEFAULT_LIMITS)

    with adb.connect() as conn:
        assert visible(conn, over) == list(reversed(over_ids[4:]))
        assert sorted(visible(conn, at_limit)) == sorted(at_ids)
        assert sorted(visible(conn, under)) == sorted(under_ids)
    assert (report.users_over_limit, report.lessons_archived, report.batches) == (1, 4, 1)


def test_custom_map_and_a_tier_missing_from_it_uses_free(run_env: None, adb: sa.Engine) -> None:
    limits = {"free": 1, "gold": 5, "none": 0}
    with adb.begin() as conn:
        free = make_user(conn, tier="free")
        gold = make_user(conn, tier="gold")
        none = make_user(conn, tier="none")
        legacy = make_user(conn, tier="legacy")  # not in the map: free's limit, and logged
        ids = {user: history(conn, user, 7) for user in (free, gold, none, legacy)}
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("dylen").addHandler(handler)
    try:
        report = archive.archive_over_limit(limits)
    finally:
        logging.getLogger("dylen").removeHandler(handler)

    with adb.connect() as conn:
        assert visible(conn, free) == [ids[free][-1]]
        assert visible(conn, gold) == list(reversed(ids[gold][-5:]))
        assert visible(conn, none) == []
        assert visible(conn, legacy) == [ids[legacy][-1]]
    assert report.lessons_archived == 6 + 2 + 7 + 6
    assert report.users_over_limit == 4
    warnings = [r for r in seen if "missing from DYLEN_TIER_HISTORY_LIMITS" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].tiers == ["legacy"]  # type: ignore[attr-defined]


def test_ties_on_created_at_keep_the_highest_ids(run_env: None, adb: sa.Engine) -> None:
    with adb.begin() as conn:
        user = make_user(conn)
        same_moment = [make_lesson(conn, user_id=user, created_at=BASE) for _ in range(6)]
        older = make_lesson(conn, user_id=user, created_at=BASE - timedelta(days=1))
    archive.archive_over_limit(DEFAULT_LIMITS)
    with adb.connect() as conn:
        assert visible(conn, user) == sorted(same_moment, reverse=True)[:3]
        assert older not in visible(conn, user)
        archived = conn.execute(
            sa.text("SELECT count(*) FROM lessons WHERE user_id = :u AND archived_at IS NOT NULL"),
            {"u": user},
        ).scalar_one()
    assert archived == 4


def test_already_archived_lessons_do_not_count_and_a_second_run_archives_nothing(
    run_env: None, adb: sa.Engine
) -> None:
    with adb.begin() as conn:
        user = make_user(conn)
        untouched = make_user(conn)
        for i in range(5):
            make_lesson(conn, user_id=user, created_at=BASE - timedelta(days=10 + i), archived_at=BASE)
        kept = history(conn, user, 3)
        small = history(conn, untouched, 2)
        before = conn.execute(
            sa.text("SELECT id, archived_at FROM lessons WHERE user_id = :u ORDER BY id"), {"u": untouched}
        ).all()

    first = archive.archive_over_limit(DEFAULT_LIMITS)
    second = archive.archive_over_limit(DEFAULT_LIMITS)

    assert first.lessons_archived == 0 and first.users_over_limit == 0 and first.batches == 0
    assert second.lessons_archived == 0
    with adb.connect() as conn:
        assert sorted(visible(conn, user)) == sorted(kept)
        assert sorted(visible(conn, untouched)) == sorted(small)
        after = conn.execute(
            sa.text("SELECT id, archived_at FROM lessons WHERE user_id = :u ORDER BY id"), {"u": untouched}
        ).all()
        # Archived ones keep their original archived_at: the run never rewrites history.
        old = conn.execute(
            sa.text("SELECT count(*) FROM lessons WHERE user_id = :u AND archived_at = :at"),
            {"u": user, "at": BASE},
        ).scalar_one()
    assert after == before
    assert old == 5


def test_lessons_created_while_it_runs_are_not_archived_by_that_run(run_env: None, adb: sa.Engine) -> None:
    # Given a user well over the limit (so the run takes several batches) and one under it
    with adb.begin() as conn:
        busy = make_user(conn, "a-busy")
        quiet = make_user(conn, "b-quiet")
        busy_old = history(conn, busy, 10)
        quiet_old = history(conn, quiet, 2)
    fresh: dict[str, list[str]] = {}

    def create_lessons_mid_run(batch: Batch) -> None:
        if batch.number == 1:  # after the first committed batch, both users generate new lessons
            with adb.begin() as conn:
                fresh[busy] = [make_lesson(conn, user_id=busy) for _ in range(5)]
                fresh[quiet] = [make_lesson(conn, user_id=quiet) for _ in range(4)]

    # When the archiver runs in batches of 2
    report = archive.archive_over_limit(DEFAULT_LIMITS, batch_size=2, on_batch=create_lessons_mid_run)

    # Then it archives what was over the limit when it started, and nothing created meanwhile, even
    # the busy user's new lessons beyond the limit
    with adb.connect() as conn:
        assert sorted(visible(conn, busy)) == sorted(fresh[busy] + busy_old[-3:])
        assert sorted(visible(conn, quiet)) == sorted(fresh[quiet] + quiet_old)
    assert (report.lessons_archived, report.users_over_limit) == (7, 1)
    assert report.batches == 4 and report.max_batch == 2

    # And the next run archives everything beyond the newest 3, new lessons included
    later = archive.archive_over_limit(DEFAULT_LIMITS)
    assert (later.lessons_archived, later.users_over_limit) == (5 + 3, 2)
    with adb.connect() as conn:
        # (each user's new lessons share one created_at: the highest ids are the newest)
        assert visible(conn, busy) == sorted(fresh[busy], reverse=True)[:3]
        assert visible(conn, quiet) == sorted(fresh[quiet], reverse=True)[:3]


def _mismatches(conn: sa.Connection, limits: dict[str, int]) -> tuple[int, int]:
    """Independent oracle: rank every lesson with a window function (the naive method)."""
    params = {"tiers": list(limits), "keeps": list(limits.values()), "fallback": limits["free"]}
    wrong = conn.execute(
        sa.text(
            """
            WITH ranked AS (
                SELECT l.archived_at,
                       row_number() OVER (PARTITION BY l.user_id ORDER BY l.created_at DESC, l.id DESC) AS rn,
                       coalesce(t.keep, :fallback) AS keep
                  FROM lessons l
                  JOIN users u ON u.id = l.user_id
                  LEFT JOIN unnest(CAST(:tiers AS text[]), CAST(:keeps AS integer[])) AS t(tier, keep)
                         ON t.tier = u.tier
            )
            SELECT count(*) FILTER (WHERE (rn > keep) <> (archived_at IS NOT NULL))
              FROM ranked
            """
        ),
        params,
    ).scalar_one()
    # Per user: visible == least(total, keep)
    bad_users = conn.execute(
        sa.text(
            """
            SELECT count(*) FROM (
                SELECT u.id, count(l.id) AS total, count(l.id) FILTER (WHERE l.archived_at IS NULL) AS shown,
                       coalesce(t.keep, :fallback) AS keep
                  FROM users u
                  LEFT JOIN lessons l ON l.user_id = u.id
                  LEFT JOIN unnest(CAST(:tiers AS text[]), CAST(:keeps AS integer[])) AS t(tier, keep)
                         ON t.tier = u.tier
                 GROUP BY u.id, t.keep
            ) per_user
             WHERE shown <> least(total, keep)
            """
        ),
        params,
    ).scalar_one()
    return int(wrong), int(bad_users)


def test_50000_lessons_over_5000_users(run_env: None, adb: sa.Engine) -> None:
    with adb.begin() as conn:
        make_history(conn, prefix="bulk-", users=5000, lessons=50_000, base=BASE)
        conn.execute(sa.text("ANALYZE users; ANALYZE lessons"))
        expected = conn.execute(
            sa.text(
                """
                SELECT count(*) AS lessons, count(DISTINCT user_id) AS users FROM (
                    SELECT l.user_id, row_number() OVER (
                               PARTITION BY l.user_id ORDER BY l.created_at DESC, l.id DESC) AS rn,
                           CASE u.tier WHEN 'starter' THEN 20 WHEN 'plus' THEN 50 WHEN 'pro' THEN 80 ELSE 3 END
                               AS keep
                      FROM lessons l JOIN users u ON u.id = l.user_id
                ) r WHERE rn > keep
                """
            )
        ).one()
    assert expected.lessons > 15_000 and expected.users > 2_000  # the data exercises the limits

    started = time.monotonic()
    report = archive.archive_over_limit(DEFAULT_LIMITS, workers=2)  # concurrent batches, same result
    elapsed = time.monotonic() - started

    assert (report.lessons_archived, report.users_over_limit) == (expected.lessons, expected.users)
    assert report.max_batch <= 10_000
    with adb.connect() as conn:
        assert _mismatches(conn, DEFAULT_LIMITS) == (0, 0)
    assert archive.archive_over_limit(DEFAULT_LIMITS).lessons_archived == 0
    assert elapsed < 20


def test_small_batches_resume_after_a_kill_mid_run(run_env: None, adb: sa.Engine) -> None:
    limits = {"free": 2, "pro": 6}
    with adb.begin() as conn:
        make_history(conn, prefix="k-", users=300, lessons=3000, tiers=("free", "pro"), base=BASE)
    sizes: list[int] = []

    class Killed(Exception):
        pass

    def kill_after_three(batch: Batch) -> None:
        sizes.append(batch.archived)
        if batch.number == 3:
            raise Killed

    # A run that dies after its third batch keeps what those batches committed...
    with pytest.raises(Killed):
        archive.archive_over_limit(limits, batch_size=250, on_batch=kill_after_three)
    with adb.connect() as conn:
        done = conn.execute(
            sa.text("SELECT count(*) FROM lessons WHERE archived_at IS NOT NULL")
        ).scalar_one()
    assert done == sum(sizes) == 750

    # ...and the next run archives exactly the rest, in batches never over the size
    rest = archive.archive_over_limit(limits, batch_size=250, on_batch=lambda b: sizes.append(b.archived))
    assert max(sizes) <= 250 and rest.max_batch <= 250
    with adb.connect() as conn:
        assert _mismatches(conn, limits) == (0, 0)
        total = conn.execute(
            sa.text("SELECT count(*) FROM lessons WHERE archived_at IS NOT NULL")
        ).scalar_one()
    assert rest.lessons_archived == total - 750
    assert rest.batches >= (total - 750) // 250


def test_batch_size_is_bounded(run_env: None) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        archive.archive_over_limit(DEFAULT_LIMITS, batch_size=10_001)


def test_preview_matches_the_run(run_env: None, adb: sa.Engine) -> None:
    with adb.begin() as conn:
        make_history(conn, prefix="p-", users=200, lessons=4000, base=BASE)
    preview = {p.tier: (p.users_over_limit, p.lessons) for p in archive.preview(DEFAULT_LIMITS)}
    with adb.connect() as conn:
        untouched = conn.execute(
            sa.text("SELECT count(*) FROM lessons WHERE archived_at IS NOT NULL")
        ).scalar()
    report = archive.archive_over_limit(DEFAULT_LIMITS)
    assert untouched == 0
    assert sum(users for users, _ in preview.values()) == report.users_over_limit
    assert sum(lessons for _, lessons in preview.values()) == report.lessons_archived
    assert set(preview) == {"free", "starter", "plus", "legacy"}  # no pro user of this data is over 80

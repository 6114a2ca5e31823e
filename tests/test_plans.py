"""Every request-path statement is index-bound: planned over a realistic volume (tests/volume.py:
~200k jobs with sections, ~225k lessons, 10k users over 30 days, then VACUUM ANALYZE), none may
read `jobs`, `lessons` or `users` whole: no Seq Scan, no index read whole (see full_scans).

How a statement joins, by construction:
- every module-level `Statement` of `common/` (a `common.jobs.transitions.Output` is one) is found by importing the modules and reading their globals;
  each needs parameters in STATEMENTS, or a reason in FULL_SCANS;
- every function of `common/` that builds SQL inline (a `Statement(...)` call, or SQL text handed to
  `execute` / `execute_simple`) is found by reading the source; each needs representative calls
  in `_calls()` (run for real, every statement they execute recorded), or a reason in FULL_SCANS.

What is checked, for each statement and parameter set:
- the custom plan (`EXPLAIN (FORMAT JSON)` with the parameters bound, as every unnamed statement
  and a prepared one's first five executions are planned);
- for `prepare=True` statements, the generic plan too (`plan_cache_mode = force_generic_plan`):
  a named prepared statement may switch to it after five executions;
- inside a plpgsql or SQL function it calls (`insert_limited_job`), the plans of the function's
  own statements: the statement runs for real in a transaction rolled back, with auto_explain
  (a contrib module shipped with PostgreSQL) sending each nested plan to the client.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import pkgutil
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, cast

import pg8000.native
import pytest
import sqlalchemy as sa

import common
from common.platform.config import load_settings
from common.platform.db import Connection, Statement
from common.platform.db.pool import build_pool
from tests import volume
from tests.support import ROOT, migrated_database

WATCHED = frozenset({"jobs", "lessons", "users"})
LESSON_JOBS, OLD_LESSONS = 80_000, 150_000  # -> ~208k jobs (sections included), ~226k lessons

# --- the volume -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def plan_url(pg_admin_url: str) -> Iterator[str]:
    """A migrated database of its own, filled with tests/volume.py (other tests never see it)."""
    with migrated_database(pg_admin_url) as url:
        engine = sa.create_engine(sa.engine.make_url(url).set(drivername="postgresql+pg8000"))
        try:
            built = volume.build(engine, lesson_jobs=LESSON_JOBS, old_lessons=OLD_LESSONS)
        finally:
            engine.dispose()
        assert built.jobs >= 200_000 and built.lessons >= 200_000, built
        yield url


@pytest.fixture(scope="session")
def pg(plan_url: str) -> Iterator[pg8000.native.Connection]:
    parts = sa.engine.make_url(plan_url)
    con = pg8000.native.Connection(
        user=parts.username or "postgres",
        password=parts.password,
        host=parts.host or "127.0.0.1",
        port=parts.port or 5432,
        database=parts.database,
    )
    yield con
    con.close()


@pytest.fixture(scope="session")
def app_conn(plan_url: str) -> Iterator[Connection]:
    """A connection of the application's own pool on the plan database (for CALLS)."""
    pool = build_pool(
        load_settings(
            {"DYLEN_DATABASE_URL": plan_url, "DYLEN_ENV_FILE": os.devnull, "DYLEN_AUTH_MODE": "dev"},
            serving=False,
        )
    )
    record = pool.acquire()
    try:
        yield Connection(pool, record)
    finally:
        pool.release(record)
        pool.invalidate_all()


def _one(pg: pg8000.native.Connection, sql: str, **params: Any) -> Any:
    rows = pg.run(sql, **params)
    assert rows, sql
    return rows[0][0] if len(rows[0]) == 1 else rows[0]


@pytest.fixture(scope="session")
def d(pg: pg8000.native.Connection) -> SimpleNamespace:
    """Realistic parameter values, read from the volume: the heaviest user's rows where it matters
    (the plans most likely to flip to a scan), a typical user's, live jobs, a planned parent."""
    heavy = volume.HEAVY_USER
    typical = _one(
        pg,
        "SELECT user_id FROM (SELECT user_id, count(*) AS n FROM jobs WHERE user_id IS NOT NULL "
        "GROUP BY 1) c ORDER BY n, user_id OFFSET (SELECT count(DISTINCT user_id) / 2 FROM jobs) LIMIT 1",
    )
    done_id, done_key, done_request = _one(
        pg,
        "SELECT id, idempotency_key, request_json FROM jobs WHERE user_id = :u AND job_kind = 'lesson' "
        "AND status = 'done' AND plan IS NULL ORDER BY created_at DESC LIMIT 1",
        u=heavy,
    )
    parent = _one(
        pg,
        "SELECT id FROM jobs WHERE user_id = :u AND plan IS NOT NULL AND status = 'done' "
        "ORDER BY created_at DESC LIMIT 1",
        u=heavy,
    )
    waiting = _one(
        pg,
        "SELECT id FROM jobs WHERE status = 'running' AND lease_expires_at IS NULL AND plan IS NOT NULL LIMIT 1",
    )
    leased_section, leased_attempt = _one(
        pg, "SELECT id, attempts FROM jobs WHERE parent_id = :p AND status = 'running'", p=waiting
    )
    queued_section = _one(
        pg, "SELECT id FROM jobs WHERE parent_id = :p AND status = 'queued' LIMIT 1", p=waiting
    )
    queued = _one(pg, "SELECT id FROM jobs WHERE status = 'queued' AND parent_id IS NULL LIMIT 1")
    running, running_attempt = _one(
        pg,
        "SELECT id, attempts FROM jobs WHERE status = 'running' AND lease_expires_at IS NOT NULL "
        "AND parent_id IS NULL LIMIT 1",
    )
    errors = [
        r[0] for r in pg.run("SELECT id FROM jobs WHERE status = 'error' AND parent_id IS NULL LIMIT 50")
    ]
    archive_key = _one(
        pg, "SELECT max(idempotency_key) FROM jobs WHERE job_kind = 'maintenance.archive_lessons'"
    )
    lessons = pg.run(
        "SELECT id, created_at FROM lessons WHERE user_id = :u AND archived_at IS NULL "
        "ORDER BY created_at DESC, id DESC LIMIT 21",
        u=heavy,
    )
    newest_users = [r[0] for r in pg.run("SELECT id FROM users ORDER BY created_at DESC, id LIMIT 50")]
    through = _one(pg, "SELECT through FROM job_done_mark")
    return SimpleNamespace(
        heavy=heavy,
        typical=typical,
        done_id=done_id,
        done_key=done_key,
        done_request=json.dumps(done_request),
        parent=parent,
        waiting=waiting,
        leased_section=leased_section,
        leased_attempt=leased_attempt,
        queued_section=queued_section,
        queued=queued,
        running=running,
        running_attempt=running_attempt,
        errors=[str(e) for e in errors],
        archive_key=archive_key,
        lesson=lessons[0][0],
        page_end=(lessons[-1][1], lessons[-1][0]),
        newest_users=newest_users,
        through=through,
        now=_one(pg, "SELECT now()"),
    )


# --- the statements and their parameters ----------------------------------------------------------

Params = dict[str, Any]
ParamSets = Callable[[SimpleNamespace], list[Params]]

_LESSON_REQUEST = json.dumps(
    {
        "job_kind": "lesson",
        "payload": {"topic": "Photosynthesis", "details": None, "depth": "highlights", "language": "en"},
    }
)
_NO_LIMITS = {"daily_limits": None, "active_limits": None, "token_limits": None, "now": None}


def _limits() -> Params:
    return {
        "daily_limits": '{"free": 10, "pro": 500}',
        "token_limits": '{"free": 200000, "pro": 10000000}',
        "active_limits": '{"free": 2, "pro": 20}',
        "now": None,
    }


# Module-level statements: name -> the parameter sets they are planned with (realistic values; the
# heavy user wherever a user's rows are read).
STATEMENTS: dict[str, ParamSets] = {
    # create_job and the daily maintenance job
    "common.jobs.transitions._CREATE": lambda d: [
        {
            "job_kind": "maintenance.archive_lessons",
            "key": "archive-2100-01-01",
            "request": "{}",
            "max_attempts": 5,
            "traceparent": None,
        }
    ],
    "common.jobs.transitions._CREATE_FOR_USER": lambda d: [
        {
            "user_id": u,
            "job_kind": "lesson",
            "key": uuid.uuid4().hex,
            "request": _LESSON_REQUEST,
            "max_attempts": 5,
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            **limits,
        }
        for u in (d.heavy, d.typical)
        for limits in (_limits(), _NO_LIMITS)
    ],
    # replay and 409: the lookup after the create found the key taken
    "common.jobs.queries._FIND_JOB_BY_KEY": lambda d: [
        {"user_id": d.heavy, "job_kind": "lesson", "key": d.done_key},
        {"user_id": d.typical, "job_kind": "lesson", "key": "no-such-key"},
    ],
    "common.jobs.queries._FIND_OWNERLESS_JOB_BY_KEY": lambda d: [
        {"job_kind": "maintenance.archive_lessons", "key": d.archive_key}
    ],
    # get_job, cancel, process_job
    "common.jobs.queries._GET_JOB": lambda d: [{"id": d.done_id}],
    "common.jobs.queries._GET_JOB_WITH_PROGRESS": lambda d: [{"id": d.parent}, {"id": d.done_id}],
    "common.jobs.queries._GET_JOBS": lambda d: [{"ids": d.errors}],
    "common.jobs.queries._GET_PLAN": lambda d: [{"id": d.waiting}],
    "common.jobs.queries._LIST_SECTIONS": lambda d: [{"id": d.parent}],
    "common.jobs.transitions._CLAIM": lambda d: [
        {"id": d.queued, "lease_seconds": 600, "early_seconds": 2.0},
        {"id": d.queued_section, "lease_seconds": 600, "early_seconds": 2.0},
    ],
    "common.jobs.transitions._COMPLETE": lambda d: [
        {"id": d.running, "attempt": d.running_attempt, "result": '{"ok": true}'}
    ],
    "common.jobs.transitions._PLAN": lambda d: [
        {
            "id": d.running,
            "attempt": d.running_attempt,
            "kind": "lesson.section",
            "max_attempts": 5,
            "plan": '{"title": "T", "sections": [{"heading": "a"}, {"heading": "b"}, {"heading": "c"}]}',
            "instance": "local/host/1",
            "traceparent": None,
        }
    ],
    "common.jobs.transitions._FINISH_SECTION": lambda d: [
        {
            "id": d.leased_section,
            "parent_id": d.waiting,
            "attempt": d.leased_attempt,
            "result": '{"body": "x"}',
        }
    ],
    # retry, defer and fail: one statement with the attempt's record
    "common.jobs.transitions._END_ATTEMPT": lambda d: [
        {
            "id": d.running,
            "attempt": d.running_attempt,
            "final": final,
            "delay": 12.5,
            "refund": refund,
            "waited": 12.5 * refund,
            "error": '{"code": "x", "message": "m"}',
            "outcome": outcome,
            "code": "x",
            "message": "m",
            "detail": "RuntimeError: x",
            "instance": "local/host/1",
        }
        for final, refund, outcome in ((False, 0, "retry"), (False, 1, "deferred"), (True, 0, "failed"))
    ],
    "common.jobs.transitions._RECORD_ATTEMPT": lambda d: [
        {
            "id": d.running,
            "attempt": d.running_attempt,
            "outcome": "superseded",
            "code": "superseded",
            "message": "m",
            "detail": None,
            "instance": "local/host/1",
        }
    ],
    "common.jobs.queries._ATTEMPTS": lambda d: [{"id": d.done_id}],
    "common.jobs.transitions._EXPIRE": lambda d: [
        {"id": d.running, "error": '{"code": "x"}', "code": "attempts_exhausted", "message": "m"}
    ],
    # retention, in the daily maintenance: the oldest finished jobs first, by completed_at
    "common.jobs.transitions._PRUNE": lambda d: [{"days": 30, "done_mark": d.through, "batch": 2000}],
    "common.jobs.transitions._FAIL_PARENTS": lambda d: [{"parent_id": None}, {"parent_id": d.waiting}],
    "common.jobs.transitions._CANCEL": lambda d: [
        {"id": d.queued, "owner": d.heavy},
        {"id": d.queued, "owner": None},
    ],
    "common.jobs.transitions._CANCEL_SECTIONS": lambda d: [{"id": d.waiting}],
    "common.jobs.transitions._REQUEUE": lambda d: [{"ids": d.errors[:5], "extra": 1}],
    "common.jobs.transitions._RESCUE": lambda d: [{"stale": 300, "limit": 500}],
    "common.jobs.transitions._RESTORE_DISPATCH_STAMP": lambda d: [
        {"id": d.queued, "ours": d.now, "previous": d.now - timedelta(minutes=10)}
    ],
    "common.lessons.queries.ONE_STEP_LESSON": lambda d: [
        {
            "id": d.running,
            "attempt": d.running_attempt,
            "result": '{"lesson_id": "x"}',
            "lesson_id": str(uuid.uuid4()),
            "topic": "Photosynthesis",
            "title": "Photosynthesis",
            "content": '{"sections": []}',
        }
    ],
    "common.lessons.queries.PLANNED_LESSON": lambda d: [
        {"id": d.waiting, "result": '{"lesson_id": "x"}', "lesson_id": str(uuid.uuid4())}
    ],
    "common.lessons.queries._LESSONS_OF_JOBS": lambda d: [{"ids": d.errors}],
    # list_lessons' usage, the Users page's usage, set-tier
    "common.accounts.users._USAGE": lambda d: [
        {"user_id": u, "job_kind": "lesson", "now": None} for u in (d.heavy, d.typical)
    ],
    "common.accounts.users._USAGES": lambda d: [{"user_ids": d.newest_users, "job_kind": "lesson"}],
    "common.accounts.users._SET_TIER": lambda d: [{"id": d.heavy, "tier": "pro"}],
    # an operator's refund: the user's lock, then the grant (clamped to what the day counts)
    "common.accounts.users._LOCK_USER": lambda d: [{"user_id": d.heavy}],
    "common.accounts.users._GRANT": lambda d: [
        {"user_id": d.heavy, "job_kind": "lesson", "jobs": 2, "tokens": 1000}
    ],
    # the dashboard's overview
    "common.jobs.totals._LOCK_STALE_MARK": lambda d: [{}],
    "common.jobs.totals._ADD_DONE": lambda d: [{"through": d.through - timedelta(hours=2)}],
    "common.jobs.totals._ALL_TIME": lambda d: [{"through": d.through}],
    "common.jobs.totals._MARK": lambda d: [{}],
    # model calls: a lane's take and settle, a job's usage (get_job), the ledger's views
    "common.models.lanes._TAKE": lambda d: [
        {
            "model": "gemini-2.5-flash",
            "rpm": 1000,
            "tpm": 2000000,
            "concurrency": 50,
            "window": 61.0,
            "estimated_tokens": 2000,
            "lease": 120.0,
            "job_id": d.running,
            "section_index": None,
            "attempt": 1,
            "user_id": d.heavy,
            "purpose": "plan",
            "prompt_version": "plan@1",
            "shares": '{"free": 2, "pro": 16}',
        }
    ],
    "common.models.lanes._SETTLE": lambda d: [
        {
            "id": 1,
            "model": "gemini-2.5-flash",
            "outcome": "ok",
            "error_code": None,
            "input_tokens": 100,
            "output_tokens": 200,
            "latency_ms": 900,
            "pause_seconds": None,
            "request_body": None,
            "response_body": None,
        }
    ],
    "common.models.ledger._JOB_USAGE": lambda d: [{"job_id": d.done_id}],
    "common.models.ledger._JOB_CALLS": lambda d: [{"job_id": d.done_id, "limit": 200}],
    "common.models.ledger._USER_USAGE": lambda d: [{"user_id": d.heavy, "since": d.now - timedelta(days=1)}],
    "common.models.ledger._DAILY": lambda d: [{"days": 14}],
    "common.models.ledger._TOP_USERS": lambda d: [{"since": d.now - timedelta(days=1)}],
    "common.models.ledger._LANES": lambda d: [{"window": 61.0}],
    "common.models.ledger._PRUNE": lambda d: [{"days": 30, "batch": 5000}],
    "common.dashboard.queries._LAST_DAY": lambda d: [{}],
    "common.dashboard.queries._PER_MINUTE": lambda d: [{"leave_out": ["lesson.section"]}],
    "common.dashboard.queries._PER_HOUR": lambda d: [{"leave_out": ["lesson.section"]}],
    "common.dashboard.queries._FAILURE_GROUPS": lambda d: [{"leave_out": ["lesson.section"]}],
    "common.jobs.queries._FINISHED_COUNTS": lambda d: [{"w": 3600.0, "leave_out": ["lesson.section"]}],
    # the job page (a lesson's sections' progress, its lesson), the Users page, CSRF key
    "common.dashboard.queries._PROGRESS": lambda d: [{"ids": [str(d.parent), str(d.done_id)]}],
    "common.dashboard.queries._LESSON_OF": lambda d: [{"id": d.done_id}],
    "common.dashboard.queries._USERS": lambda d: [
        {"user_id": None, "limit": 50},
        {"user_id": d.heavy, "limit": 50},
    ],
    "common.dashboard.queries._SECRET": lambda d: [{}],
    # the queue view (now, and the 1 h / 24 h windows) and the usage view's top users
    "common.dashboard.queries._QUEUE_NOW": lambda d: [{}],
    "common.dashboard.queries._THROUGHPUT": lambda d: [
        {"since": d.now - timedelta(hours=h), "step": s} for h, s in ((1, 120.0), (24, 3600.0))
    ],
    "common.dashboard.queries._LATENCY": lambda d: [
        {
            "since": d.now - timedelta(hours=h),
            "step": s,
            "buckets": n,
            "per_bucket": 100,
            "kinds": ["lesson", "lesson.section", "maintenance.archive_lessons"],
        }
        for h, s, n in ((1, 120.0, 30), (24, 3600.0, 24))
    ],
    "common.dashboard.queries._TOP_USERS": lambda d: [{"limit": 20}],
}


@dataclass(frozen=True)
class Recorder:
    """The application's connection, recording every statement a call runs (and running it)."""

    conn: Connection
    seen: list[tuple[str, Statement, Params]] = field(default_factory=list)

    def execute(self, statement: Statement | str, params: Params | None = None) -> Any:
        stmt = statement if isinstance(statement, Statement) else Statement(statement)
        self.seen.append(("execute", stmt, dict(params or {})))
        return self.conn.execute(stmt, params)

    def execute_simple(self, sql: str) -> Any:
        self.seen.append(("simple", Statement(sql), {}))
        return self.conn.execute_simple(sql)

    @contextmanager
    def transaction(self) -> Iterator[Recorder]:
        with self.conn.transaction():
            yield self


Call = Callable[[Connection, SimpleNamespace], object]


def _jobs(**filters: Any) -> Call:
    from common.jobs.queries import JobFilter, list_jobs

    limit = filters.pop("limit", 51)
    return lambda c, d: list_jobs(
        c, JobFilter(**{k: v(d) if callable(v) else v for k, v in filters.items()}), limit=limit
    )


def _calls() -> dict[str, list[Call]]:
    from common.jobs import queries as jq
    from common.jobs import totals
    from common.lessons import queries as lq
    from common.lessons.archive import queries as aq

    return {
        # get_lesson, list_lessons (first page, the next page, a typical user)
        "common.lessons.queries.get_lesson": [lambda c, d: lq.get_lesson(c, d.lesson)],
        "common.lessons.queries.list_visible_lessons": [
            lambda c, d: lq.list_visible_lessons(c, user_id=d.heavy, limit=21, after=None),
            lambda c, d: lq.list_visible_lessons(c, user_id=d.heavy, limit=21, after=d.page_end),
            lambda c, d: lq.list_visible_lessons(c, user_id=d.typical, limit=101, after=None),
        ],
        # the dashboard's Jobs page (each filter it offers), Failures page and bulk retry, the CLI
        "common.jobs.queries.list_jobs": [
            _jobs(),
            _jobs(before=lambda d: (d.now - timedelta(days=3), uuid.UUID(int=0))),
            _jobs(statuses=("error",)),
            _jobs(statuses=("canceled",)),
            _jobs(statuses=("queued", "running")),
            _jobs(statuses=("done",)),
            _jobs(kinds=("lesson",)),
            _jobs(kinds=("maintenance.archive_lessons",)),
            _jobs(user_id=lambda d: d.heavy),
            _jobs(user_id=lambda d: d.typical, statuses=("error",)),
            _jobs(statuses=("error",), created_before_seconds=3600.0),
            _jobs(statuses=("error",), finished_within_seconds=86400.0, error_code="generator_failed"),
            _jobs(
                statuses=("error",),
                finished_within_seconds=86400.0,
                error_code="generator_failed",
                limit=None,
            ),
        ],
        "common.jobs.queries.oldest_queued": [lambda c, d: jq.oldest_queued(c)],
        "common.jobs.totals.all_time_counts": [lambda c, d: totals.all_time_counts(c)],
        "common.lessons.archive.queries.database_now": [lambda c, d: aq.database_now(c)],
        "common.lessons.archive.queries.lesson_blocks": [lambda c, d: aq.lesson_blocks(c)],
    }


# Statements and call sites that read a whole table on purpose, and why. Nothing a user's request
# runs belongs here.
FULL_SCANS: dict[str, str] = {
    "common.jobs.queries._KIND_EXISTS": "operators only, and only for a kind with no handler (a retired "
    "kind or a typo): stops at the first row of that kind; an index leading with job_kind would be paid "
    "by every insert for it",
    "common.jobs.queries.job_counts": "`jobs stats` (CLI): the exact all-time count by kind and status "
    "(the dashboard's overview reads all_time_counts instead)",
    "common.lessons.archive.queries._CREATE_BOUNDARIES": "the archiver: creates its temporary table",
    "common.lessons.archive.queries._FILL_BOUNDARIES": "the archiver, once a day: one index-only probe "
    "per user, for every user",
    "common.lessons.archive.queries._ARCHIVE_BLOCKS": "the archiver's batches walk lessons block range "
    "by block range in physical order, on purpose (bench/RESULTS.md, Archive)",
    "common.lessons.archive.queries._PREVIEW_ARCHIVE": "`archive preview` (CLI): the archiver's "
    "boundaries over every user",
    "common.lessons.archive.queries.unknown_tiers": "the archiver, once a day: the distinct tiers of all users",
    "common.lessons.archive.queries.create_boundaries": "the archiver: ANALYZE of its temporary table",
    "common.lessons.archive.queries.drop_boundaries": "the archiver: drops its temporary table",
}


# The database layer (its pings, BEGIN / COMMIT, the runner) builds Statements from what it is
# given, and two transitions run what they are given; what they are given is found above.
def _runner(site: str) -> bool:
    return site.startswith("common.platform.db.") or site in (
        "common.jobs.transitions.complete",
        "common.jobs.transitions.fan_in",
    )


# --- finding statements -----------------------------------------------------------------------------


def _modules() -> list[ModuleType]:
    # A package's __main__ runs its command when imported (python -m common.cli): it declares nothing.
    names = [
        info.name
        for info in pkgutil.walk_packages(common.__path__, "common.")
        if not info.name.endswith(".__main__")
    ]
    return [importlib.import_module(name) for name in sorted(names)]


def module_statements() -> dict[str, Statement]:
    """Every module-level Statement (an Output is one) of common/, also inside a module-level
    dict, list or tuple, named where it is defined."""
    found: dict[str, Statement] = {}
    for module in _modules():
        source = Path(module.__file__ or "").read_text(encoding="utf-8")
        for name, value in vars(module).items():
            if not re.search(rf"^{re.escape(name)}\s*[:=]", source, re.M):
                continue  # imported from the module that defines it
            items = (
                value.items()
                if isinstance(value, dict)
                else enumerate(value)
                if isinstance(value, list | tuple)
                else [(None, value)]
            )
            for key, item in items:
                if isinstance(item, Statement):
                    found[f"{module.__name__}.{name}" + ("" if key is None else f"[{key!r}]")] = item
    return found


def inline_sql_sites() -> set[str]:
    """`module.function` of every function of common/ that builds a Statement, or hands execute /
    execute_simple anything but a module-level name or an attribute (`self.statement`): SQL text,
    a local variable, a subscript."""
    sites: set[str] = set()
    for path in sorted((ROOT / "common").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        module = ".".join(parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        globals_ = {
            t.id
            for node in tree.body
            if isinstance(node, ast.Assign | ast.AnnAssign)
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name)
        }

        _visit(tree, module, globals_, [], False, sites)
    return sites


def _visit(
    node: ast.AST, module: str, globals_: set[str], scope: list[str], in_function: bool, sites: set[str]
) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            is_function = in_function or not isinstance(child, ast.ClassDef)
            _visit(child, module, globals_, [*scope, child.name], is_function, sites)
            continue
        if in_function and isinstance(child, ast.Call) and _builds_sql(child, globals_):
            sites.add(".".join([module, *scope]))
        _visit(child, module, globals_, scope, in_function, sites)


def _builds_sql(call: ast.Call, globals_: set[str]) -> bool:
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    if name == "Statement":
        return True
    if name in ("execute", "execute_simple") and call.args:
        arg = call.args[0]
        return not (isinstance(arg, ast.Attribute) or (isinstance(arg, ast.Name) and arg.id in globals_))
    return False


# --- planning -----------------------------------------------------------------------------------------


def _plans(rows: Any) -> list[dict[str, Any]]:
    value = rows[0][0]
    return cast(list[dict[str, Any]], json.loads(value) if isinstance(value, str) else value)


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


@dataclass(frozen=True)
class Index:
    table: str
    first_column: str
    partial: bool


def full_scans(plan: dict[str, Any], indexes: dict[str, Index]) -> list[str]:
    """What in the plan reads all of a watched table: a Seq Scan, or an index scanned whole (its
    leading column not bound by the Index Cond; `user_id IS NOT DISTINCT FROM ...` is one). Not
    counted: a partial index (bounded by its predicate: the live jobs, say), and an ordered walk
    under a LIMIT (newest first until the page is full)."""
    found = set()

    def walk(node: dict[str, Any], under_limit: bool) -> None:
        kind = node["Node Type"]
        if kind == "Seq Scan" and node.get("Relation Name") in WATCHED:
            found.add(f"Seq Scan on {node['Relation Name']}")
        index = indexes.get(node.get("Index Name", ""))
        if index is not None and kind.endswith("Index Scan") and not index.partial:
            bound = re.search(rf"\b{index.first_column}\b", node.get("Index Cond", ""))
            ordered = under_limit and kind != "Bitmap Index Scan"
            if not bound and not ordered:
                found.add(f"{kind} of all of {node['Index Name']} on {index.table}")
        for child in node.get("Plans", []):
            walk(child, under_limit or kind == "Limit")

    walk(plan, False)
    return sorted(found)


def custom_plan(pg: pg8000.native.Connection, stmt: Statement, params: Params) -> dict[str, Any]:
    sql = "EXPLAIN (FORMAT JSON) " + stmt.sql
    rows = pg.run(sql, **params) if params else pg.run(sql)
    return _plans(rows)[0]["Plan"]


def generic_plan(pg: pg8000.native.Connection, stmt: Statement, params: Params) -> dict[str, Any]:
    numbered, make_args = stmt.compiled()
    arity = len(make_args(params))
    pg.run("PREPARE plan_probe AS " + numbered)
    try:
        pg.run("SET plan_cache_mode = force_generic_plan")
        nulls = ", ".join(["NULL"] * arity)
        return _plans(pg.run(f"EXPLAIN (FORMAT JSON) EXECUTE plan_probe{f'({nulls})' if arity else ''}"))[0][
            "Plan"
        ]
    finally:
        pg.run("RESET plan_cache_mode")
        pg.run("DEALLOCATE plan_probe")


def nested_plans(
    pg: pg8000.native.Connection, stmt: Statement, params: Params, *, generic: bool
) -> list[dict[str, Any]]:
    """Run the statement for real (rolled back) with auto_explain logging every nested statement's
    plan to this client; the plans of the statements inside the functions it calls."""
    pg.notices.clear()
    pg.run("BEGIN")
    try:
        pg.run("SET LOCAL auto_explain.log_min_duration = 0")
        pg.run("SET LOCAL auto_explain.log_nested_statements = on")
        pg.run("SET LOCAL auto_explain.log_format = json")
        pg.run("SET LOCAL auto_explain.log_level = notice")
        pg.run("SET LOCAL client_min_messages = notice")
        if generic:
            pg.run("SET LOCAL plan_cache_mode = force_generic_plan")
        pg.run(stmt.sql, **params)
    finally:
        pg.run("ROLLBACK")
    plans = []
    for notice in list(pg.notices):
        message = notice.get(b"M", notice.get("M", b""))
        text = message.decode() if isinstance(message, bytes) else str(message)
        if "plan:" in text:
            plans.append(json.loads(text.split("plan:", 1)[1])["Plan"])
    return plans


@dataclass
class Finding:
    where: str
    how: str
    scans: list[str]
    sql: str

    def __str__(self) -> str:
        return f"{self.where} [{self.how}]: {'; '.join(self.scans)}\n    {' '.join(self.sql.split())[:300]}"


@dataclass(frozen=True)
class Database:
    functions: set[str]  # our plpgsql and SQL functions: a statement calling one is run to see inside
    indexes: dict[str, Index]  # the watched tables' indexes


def check(
    pg: pg8000.native.Connection, db: Database, where: str, stmt: Statement, params: Params
) -> list[Finding]:
    findings = []
    plans = [("custom", custom_plan(pg, stmt, params))]
    if stmt.prepare:
        plans.append(("generic", generic_plan(pg, stmt, params)))
    if any(re.search(rf"\b{f}\s*\(", stmt.sql) for f in db.functions):
        modes = (False, True) if stmt.prepare else (False,)
        for generic in modes:
            label = "inside its functions, " + ("generic" if generic else "custom")
            plans += [(label, p) for p in nested_plans(pg, stmt, params, generic=generic)]
    for how, plan in plans:
        if scans := full_scans(plan, db.indexes):
            findings.append(Finding(where, how, scans, stmt.sql))
    return findings


@pytest.fixture(scope="session")
def db(pg: pg8000.native.Connection) -> Database:
    pg.run("LOAD 'auto_explain'")
    functions = pg.run(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "JOIN pg_language l ON l.oid = p.prolang WHERE n.nspname = 'public' AND l.lanname IN ('plpgsql', 'sql')"
    )
    indexes = pg.run(
        "SELECT ic.relname, t.relname, a.attname, i.indpred IS NOT NULL FROM pg_index i "
        "JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid "
        "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[0] "
        "WHERE t.relname = ANY(CAST(:tables AS text[])) AND t.relnamespace = 'public'::regnamespace",
        tables=sorted(WATCHED),
    )
    return Database({r[0] for r in functions}, {r[0]: Index(r[1], r[2], r[3]) for r in indexes})


# --- the tests --------------------------------------------------------------------------------------


def test_every_statement_and_inline_site_has_parameters_or_a_reason() -> None:
    statements = set(module_statements())
    sites = {s for s in inline_sql_sites() if not _runner(s)}
    calls = set(_calls())
    missing = sorted((statements | sites) - set(STATEMENTS) - calls - set(FULL_SCANS))
    assert not missing, (
        "Statements without parameters in tests/test_plans.py (add them to STATEMENTS or CALLS, or, for a "
        f"maintenance-only full scan, a reason to FULL_SCANS): {missing}"
    )
    stale = sorted((set(STATEMENTS) | calls | set(FULL_SCANS)) - statements - sites)
    assert not stale, f"Entries naming no statement or function of common/: {stale}"
    assert not (set(STATEMENTS) | calls) & set(FULL_SCANS)


def test_no_request_path_statement_scans_jobs_lessons_or_users(
    pg: pg8000.native.Connection, app_conn: Connection, d: SimpleNamespace, db: Database
) -> None:
    findings: list[Finding] = []
    statements = module_statements()
    for name, param_sets in STATEMENTS.items():
        for params in param_sets(d):
            findings += check(pg, db, name, statements[name], params)
    for name, cases in _calls().items():
        for i, case in enumerate(cases):
            recorder = Recorder(app_conn)
            case(cast(Connection, recorder), d)
            explained = [(s, p) for kind, s, p in recorder.seen if kind == "execute" or _reads(s.sql)]
            assert explained, f"{name} case {i} ran no statement"
            for stmt, params in explained:
                findings += check(pg, db, f"{name} (case {i})", stmt, params)
    assert not findings, "Whole-table reads on the request path:\n" + "\n".join(map(str, findings))


def _reads(sql: str) -> bool:
    return sql.lstrip().split(None, 1)[0].upper() in ("SELECT", "WITH", "UPDATE", "INSERT", "DELETE")


def test_the_quota_count_is_index_only(
    pg: pg8000.native.Connection, d: SimpleNamespace, db: Database
) -> None:
    """Both counts of job_usage (the daily quota and the active jobs) answer from an index alone:
    as list_lessons reads them, and inside insert_limited_job (create_job), custom and generic."""
    statements = module_statements()
    usage, create = (
        statements["common.accounts.users._USAGE"],
        statements["common.jobs.transitions._CREATE_FOR_USER"],
    )
    params = {
        "user_id": d.heavy,
        "job_kind": "lesson",
        "key": uuid.uuid4().hex,
        "request": _LESSON_REQUEST,
        "max_attempts": 5,
        "traceparent": None,
        **_limits(),
    }
    plans = {
        "list_lessons' usage": [
            custom_plan(pg, usage, {"user_id": d.heavy, "job_kind": "lesson", "now": None})
        ],
        "create, custom": nested_plans(pg, create, params, generic=False),
        "create, generic": nested_plans(pg, create, params, generic=True),
    }
    for how, found in plans.items():
        scans = {id(n): n for p in found for n in _count_scans(p)}.values()
        # The daily count and the live count, index-only; and the jobs of the user's calls in
        # flight (a handful, by primary key: a canceled lesson still spending counts as active).
        assert len(scans) == 3, (how, "expected the daily, the live and the in-flight count", found)
        assert {(n["Node Type"], n.get("Index Name")) for n in scans} == {
            ("Index Only Scan", "jobs_user_kind_created_idx"),
            ("Index Only Scan", "jobs_user_kind_live_idx"),
            ("Index Scan", "jobs_pkey"),
        }, how


def _count_scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Scans of jobs under an Aggregate: the counts (not the key probe or the insert)."""
    return [
        m
        for n in _nodes(plan)
        if n["Node Type"] == "Aggregate"
        for m in _nodes(n)
        if m.get("Relation Name") == "jobs"
    ]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT id FROM jobs WHERE request_json ->> 'job_kind' = :k", "Seq Scan on jobs"),
        # The replay lookup as it was (issue 28): the unique index, read whole.
        (
            "SELECT id FROM jobs WHERE user_id IS NOT DISTINCT FROM CAST(:u AS text) AND job_kind = :k AND idempotency_key = :key",
            "Index Scan of all of jobs_idempotency_uq on jobs",
        ),
    ],
)
def test_the_check_catches_an_unindexed_predicate(
    pg: pg8000.native.Connection, db: Database, sql: str, expected: str
) -> None:
    """The rule reads real plans: an unindexed predicate on jobs is found and named."""
    (finding,) = check(
        pg, db, "example", Statement(sql), {"k": "lesson", "u": volume.HEAVY_USER, "key": "k1"}
    )
    assert finding.scans == [expected] and finding.where == "example"

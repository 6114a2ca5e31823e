"""The dashboard in a real browser (Debian's chromium via Playwright), as an operator uses it: a
lesson that really failed (one of its sections out of attempts) followed from the overview through
Failures to its page, retried, and watched to `done` without a reload; a bulk retry from the jobs
list; a lesson's progress bar moving while its sections run; no console error on the way. Every page
is saved under tests/screenshots/ (listed at the end of the run).

Dev auth (any operator) on a dashboard wired to a real process_job with local dispatch and the
planning failure generator (devtools/generators.py), three attempts per job.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.browser import CHROMIUM, CHROMIUM_ARGS, need_chromium, screenshot
from tests.factories import job_row, make_failed_job, make_job, make_user
from tests.support import FunctionServer, Stack, StackFactory, base_env, lesson_body

GENERATOR = {"DYLEN_LESSON_GENERATOR": "devtools.generators:fanout", "DYLEN_JOB_MAX_ATTEMPTS": "3"}


@pytest.fixture(scope="module")
def stack(make_stack: StackFactory) -> Stack:
    return make_stack(**GENERATOR, THREADS="10", DYLEN_LOCAL_DISPATCH_WORKERS="10")


@pytest.fixture(scope="module")
def dashboard(database_url: str, logs_dir: Path, stack: Stack) -> Iterator[str]:
    env = base_env(database_url, DYLEN_PROCESS_JOB_URL=stack.url("process_job") + "/", **GENERATOR)
    server = FunctionServer("dashboard", env, logs_dir).start()
    yield server.url
    server.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A tab that records console errors and accepts the cancel confirmation; none may occur."""
    tab = browser.new_page(viewport={"width": 1360, "height": 900})
    problems: list[str] = []
    tab.on(
        "console",
        lambda m: problems.append(f"{m.text} {m.location.get('url')}") if m.type == "error" else None,
    )
    tab.on("pageerror", lambda e: problems.append(str(e)))
    tab.on("dialog", lambda d: d.accept())
    yield tab
    assert problems == []


def _create(stack: Stack, user: str, topic: str, depth: str = "detailed") -> str:
    created = stack.create(user, lesson_body(topic, depth=depth))
    assert created.status_code == 202, created.text
    return str(created.json()["job_id"])


def test_a_failed_lesson_from_the_overview_to_a_retry_to_done(
    page: Any, dashboard: str, stack: Stack, db: sa.Engine
) -> None:
    from playwright.sync_api import expect

    user = f"browser-{uuid.uuid4().hex[:8]}"
    job_id = _create(stack, user, "fail3-section:1 Glaciers")  # section 1 fails all 3 attempts
    assert stack.wait_for(user, job_id, timeout=60)["status"] == "error"

    page.goto(dashboard + "/")
    expect(page.locator("#chart polyline")).to_have_count(3)
    screenshot(page, "overview")
    page.click("nav >> text=Failures")
    page.click("a[href='failures?code=section_failed']")
    screenshot(page, "failures")
    page.click(f"a[href='job?id={job_id}']")
    expect(page.locator("#status")).to_have_text("error")
    expect(page.locator("#sections tbody tr")).to_have_count(6)
    expect(page.locator("#sections tbody tr").nth(1)).to_contain_text("error")
    screenshot(page, "job-error")
    page.locator("#sections tbody tr").nth(1).locator("a").click()  # the failed section
    expect(page.locator("#attempts tbody tr")).to_have_count(3)
    page.locator("#attempts details").first.click()  # the raw error, for operators
    expect(page.locator("#attempts pre").first).to_contain_text("section 1 model is down")
    screenshot(page, "section-error")
    page.go_back()

    page.click("#retry")
    expect(page.locator(".notice")).to_contain_text("Retried")
    page.evaluate("window.notReloaded = true")
    # The page updates itself: the status and the sections become done with no reload.
    expect(page.locator("#status")).to_have_text("done", timeout=30_000)
    expect(page.locator("#progress")).to_have_attribute("value", "6")
    assert page.evaluate("window.notReloaded") is True
    screenshot(page, "job-done")
    with db.connect() as conn:
        assert job_row(conn, job_id)["status"] == "done"


def test_a_bulk_retry_and_a_bulk_cancel_from_the_jobs_list_ask_once(
    browser: Any, page: Any, dashboard: str, db: sa.Engine
) -> None:
    from playwright.sync_api import expect

    user = f"bulk-{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        ids = {make_failed_job(conn, user_id=user, topic=f"Tides {n}") for n in range(3)}
    page.goto(f"{dashboard}/jobs?user={user}")
    expect(page.locator("#job-rows tr")).to_have_count(3)
    expect(page.locator("#bulk-retry")).to_be_disabled()
    page.check("#pick-all")
    expect(page.locator("#picked")).to_have_text("3 selected")
    screenshot(page, "jobs-selected")
    page.click("#bulk-retry")
    expect(page.locator("h1")).to_have_text("Retry 3 job(s)?")
    screenshot(page, "bulk-confirm")
    page.click("#confirm")
    expect(page.locator("h1")).to_have_text("Retried 3 of 3 job(s)")
    screenshot(page, "bulk-retried")
    page.goto(f"{dashboard}/jobs?user={user}")
    expect(page.locator("#job-rows .badge.done")).to_have_count(3, timeout=30_000)  # live, no reload
    with db.connect() as conn:
        assert {job_row(conn, i)["status"] for i in ids} == {"done"}

    # and a bulk cancel of two queued jobs (nothing dispatched them)
    waiting = f"cancel-{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        queued = {
            make_job(conn, user_id=make_user(conn, waiting), payload={"topic": "Comets"}) for _ in range(2)
        }
    page.goto(f"{dashboard}/jobs?user={waiting}")
    page.check("#pick-all")
    page.click("#bulk-cancel")
    expect(page.locator("h1")).to_have_text("Cancel 2 job(s)?")
    page.click("#confirm")
    expect(page.locator("h1")).to_have_text("Canceled 2 of 2 job(s)")
    screenshot(page, "bulk-canceled")
    with db.connect() as conn:
        assert {job_row(conn, i)["status"] for i in queued} == {"canceled"}
    page.goto(f"{dashboard}/retry-group?code=generator_failed")
    screenshot(page, "retry-group")
    lost = browser.new_page(viewport={"width": 1360, "height": 900})  # its console reports the 404
    lost.goto(f"{dashboard}/job?id={uuid.uuid4()}")
    expect(lost.locator("h1")).to_have_text("404 Not found")
    screenshot(lost, "error-404")


def test_a_lessons_progress_bar_moves_without_a_reload(page: Any, dashboard: str, stack: Stack) -> None:
    from playwright.sync_api import expect

    user = f"progress-{uuid.uuid4().hex[:8]}"
    job_id = _create(stack, user, "stagger:1.5 Volcanoes")  # section i takes 1.5 * (i + 1) s
    page.goto(f"{dashboard}/jobs?user={user}")
    expect(page.locator("#job-rows progress")).to_have_count(1, timeout=15_000)
    screenshot(page, "jobs-live")
    page.click(f"a[href='job?id={job_id}']")
    page.evaluate("window.notReloaded = true")
    seen: set[int] = set()
    for _ in range(200):
        value = (
            page.locator("#progress").get_attribute("value") if page.locator("#progress").count() else None
        )
        if value is not None:
            if 0 < int(value) < 6 and not any(0 < v < 6 for v in seen):
                screenshot(page, "job-running")
            seen.add(int(value))
        if page.locator("#status").inner_text() == "done":
            break
        page.wait_for_timeout(250)
    expect(page.locator("#status")).to_have_text("done")
    seen.add(int(page.locator("#progress").get_attribute("value") or 0))
    assert page.evaluate("window.notReloaded") is True
    assert len({v for v in seen if 0 < v < 6}) >= 2 and 6 in seen, seen  # it moved in steps
    for name in ("queue", "usage", "users"):
        page.goto(f"{dashboard}/{name}")
        screenshot(page, name)
    page.goto(f"{dashboard}/queue?window=24h")
    expect(page.locator(".chart svg")).to_have_count(2)
    screenshot(page, "queue-24h")
    page.goto(f"{dashboard}/jobs")
    screenshot(page, "jobs")

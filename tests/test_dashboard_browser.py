"""The dashboard in a real browser (headless Chromium via Playwright): open the overview, follow a
failure to its job, press Retry and watch the job become `done`, with no console error on the way.
A screenshot of each page goes to tests/screenshots/ (git-ignored) for a person to look at.

Dev auth (any operator) on a dashboard wired to a real process_job with local dispatch, so the retry
really runs the built-in generator.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.factories import job_row, make_failed_job
from tests.support import ROOT, FunctionServer, Stack, base_env
from tests.test_dev_gateway import CHROMIUM, CHROMIUM_ARGS

SCREENSHOTS = ROOT / "tests" / "screenshots"


@pytest.fixture(scope="module")
def dashboard(database_url: str, logs_dir: Path, stack: Stack) -> Iterator[str]:
    env = base_env(database_url, DYLEN_PROCESS_JOB_URL=stack.url("process_job") + "/")
    server = FunctionServer("dashboard", env, logs_dir).start()
    yield server.url
    server.stop()


def test_overview_to_failure_to_retry_to_done(dashboard: str, db: sa.Engine) -> None:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install chromium`; .ci/run does)"
        )
    from playwright.sync_api import expect, sync_playwright

    code = f"browser_{uuid.uuid4().hex[:6]}"
    user = f"browser-{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        job_id = make_failed_job(conn, user_id=user, code=code, topic="Glaciers")
    SCREENSHOTS.mkdir(exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda m: problems.append(f"{m.text} {m.location.get('url')}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("dialog", lambda d: d.accept())
            page.goto(dashboard + "/")
            expect(page.locator("#chart polyline")).to_have_count(3)
            page.screenshot(path=str(SCREENSHOTS / "overview.png"), full_page=True)
            page.click("nav >> text=Failures")
            page.click(f"text={code}")
            page.screenshot(path=str(SCREENSHOTS / "failures.png"), full_page=True)
            page.click(f"a[href='job?id={job_id}']")
            expect(page.locator("#status")).to_have_text("error")
            page.screenshot(path=str(SCREENSHOTS / "job-error.png"), full_page=True)
            page.click("#retry")
            expect(page.locator(".notice")).to_contain_text("Retried")
            for _ in range(40):  # process_job runs it in the background: reload until it is done
                if page.locator("#status").inner_text() == "done":
                    break
                page.wait_for_timeout(250)
                page.reload()
            expect(page.locator("#status")).to_have_text("done")
            page.screenshot(path=str(SCREENSHOTS / "job-done.png"), full_page=True)
            for name in ("jobs", "users"):
                page.goto(f"{dashboard}/{name}")
                page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
            page.goto(f"{dashboard}/retry-group?code={code}")
            page.screenshot(path=str(SCREENSHOTS / "confirm.png"), full_page=True)
        finally:
            browser.close()
    with db.connect() as conn:
        assert job_row(conn, job_id)["status"] == "done"
    assert problems == []

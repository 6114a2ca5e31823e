"""Browser tests' support: Debian's chromium under Playwright, and the screenshots they leave for a
person to look at (tests/screenshots/, git-ignored), listed at the end of the test run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = ROOT / "tests" / "screenshots"
TAKEN: list[Path] = []  # read by tests/conftest.py's terminal summary


def need_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install chromium`; .ci/run does)"
        )


def screenshot(page: Any, name: str) -> Path:
    """A full-page PNG of what the browser shows now, as tests/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if path not in TAKEN:
        TAKEN.append(path)
    return path

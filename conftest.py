"""Root conftest: every test starts from a known environment, whatever the developer's shell holds."""

from __future__ import annotations

import os

import pytest

_KEEP = ("DYLEN_TEST_DATABASE_URL", "DYLEN_SOAK_JOBS", "DYLEN_SOAK_SEED")
_PREFIXES = ("DYLEN_", "CLOUD_TASKS_", "GOOGLE_", "FIREBASE_", "GEMINI_")
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def _scrub(environ: os._Environ[str] | dict[str, str]) -> None:
    for key in list(environ):
        upper = key.upper()
        if key in _KEEP:
            continue
        if upper.startswith(_PREFIXES) or upper in _PROXIES:
            del environ[key]
    # Never read a developer's .env during tests.
    environ["DYLEN_ENV_FILE"] = os.devnull


_scrub(os.environ)


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process tests see settings built from the scrubbed environment plus their own changes."""
    from common.platform.config import reset_settings

    reset_settings()
    yield
    reset_settings()

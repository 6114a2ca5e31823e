"""Configuration fails loudly, naming the variable, for every wrong value."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from common.accounts.settings import tier_settings
from common.jobs.settings import job_settings
from common.lessons.settings import lesson_settings
from common.platform.config import load_settings
from common.platform.errors import ConfigError

DEV = {"DYLEN_AUTH_MODE": "dev"}


def load_every_section(env: Mapping[str, str]) -> None:
    """What a cold start reads: the platform's settings and each package's own."""
    load_settings(env)
    for section in (job_settings, tier_settings, lesson_settings):
        section.load(env)


def test_defaults_match_the_design() -> None:
    s = load_settings(DEV)
    assert (s.db_pool_size, s.db_max_overflow) == (5, 2)
    assert s.task_provider == "local-http"
    assert s.base_url == "http://localhost:8080"
    assert s.process_job_url == "http://localhost:8080/process_job"
    jobs = job_settings.load(DEV)
    assert jobs.auto_process is True
    assert (jobs.max_attempts, jobs.timeout_seconds, jobs.rescue_after_seconds) == (5, 600, 300)
    tiers = tier_settings.load(DEV)
    assert tiers.history_limits == {"free": 3, "starter": 20, "plus": 50, "pro": 80}
    assert tiers.daily_jobs == {"free": 10, "starter": 50, "plus": 200, "pro": 500}
    assert tiers.active_jobs == {"free": 2, "starter": 5, "plus": 10, "pro": 20}
    assert lesson_settings.load(DEV).generator is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DYLEN_DB_POOL_SIZE": "zero"}, "DYLEN_DB_POOL_SIZE"),
        ({"DYLEN_DB_POOL_SIZE": "0"}, "DYLEN_DB_POOL_SIZE"),
        ({"DYLEN_JOBS_AUTO_PROCESS": "maybe"}, "DYLEN_JOBS_AUTO_PROCESS"),
        ({"DYLEN_TASK_SERVICE_PROVIDER": "sqs"}, "DYLEN_TASK_SERVICE_PROVIDER"),
        ({"DYLEN_AUTH_MODE": "none"}, "DYLEN_AUTH_MODE"),
        ({"DYLEN_BASE_URL": "localhost:8080"}, "DYLEN_BASE_URL"),
        # Sent as is in Location headers (common.platform.http skips Werkzeug's per-response IRI encoding).
        ({"DYLEN_BASE_URL": "https://lecons.exemple.fr/élève"}, "DYLEN_BASE_URL"),
        ({"DYLEN_BASE_URL": "https://jobs.example.com/a b"}, "DYLEN_BASE_URL"),
        ({"DYLEN_PROCESS_JOB_URL": "https://bücher.example/process_job"}, "DYLEN_PROCESS_JOB_URL"),
        ({"DYLEN_JOB_MAX_ATTEMPTS": "0"}, "DYLEN_JOB_MAX_ATTEMPTS"),
        ({"DYLEN_TIER_HISTORY_LIMITS": "pro=80"}, "DYLEN_TIER_HISTORY_LIMITS"),
        ({"DYLEN_TIER_HISTORY_LIMITS": "free=x"}, "DYLEN_TIER_HISTORY_LIMITS"),
        ({"DYLEN_TIER_DAILY_JOBS": "free=ten"}, "DYLEN_TIER_DAILY_JOBS"),
        ({"DYLEN_TIER_DAILY_JOBS": "pro=500"}, "DYLEN_TIER_DAILY_JOBS"),
        ({"DYLEN_TIER_ACTIVE_JOBS": "free=-1"}, "DYLEN_TIER_ACTIVE_JOBS"),
        ({"DYLEN_TIER_ACTIVE_JOBS": "free"}, "DYLEN_TIER_ACTIVE_JOBS"),
        ({"DYLEN_LESSON_GENERATOR": "just_a_module"}, "DYLEN_LESSON_GENERATOR"),
        ({"DYLEN_DATABASE_URL": "mysql://x"}, "DYLEN_DATABASE_URL"),
        ({"DYLEN_DATABASE_URL": "postgresql://db/x?sslmode=on"}, "DYLEN_DATABASE_URL"),
        ({"DYLEN_TASK_SERVICE_PROVIDER": "gcp"}, "DYLEN_CLOUD_TASKS_QUEUE_PATH"),
        ({"DYLEN_CLOUD_SQL_INSTANCE": "p:r:i", "DYLEN_DB_NAME": "d"}, "DYLEN_DB_USER"),
        (
            {"DYLEN_CLOUD_SQL_INSTANCE": "p:r:i", "DYLEN_DB_USER": "u", "DYLEN_DB_NAME": "d"},
            "DYLEN_DB_PASSWORD",
        ),
        ({"DYLEN_CLOUD_SQL_INSTANCE": "instance-only"}, "DYLEN_CLOUD_SQL_INSTANCE"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_every_section({**DEV, **env})


def test_firebase_mode_needs_a_project() -> None:
    with pytest.raises(ConfigError, match="DYLEN_FIREBASE_PROJECT_ID"):
        load_settings({})


def test_dotenv_fills_only_unset_variables(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# local\nexport DYLEN_DB_POOL_SIZE=9\nDYLEN_JOB_MAX_ATTEMPTS='7'\nDYLEN_AUTH_MODE=dev\n"
    )
    s = load_settings({"DYLEN_JOB_MAX_ATTEMPTS": "2"}, dotenv=env_file)
    jobs = job_settings.load({"DYLEN_JOB_MAX_ATTEMPTS": "2"}, dotenv=env_file)
    assert (s.db_pool_size, jobs.max_attempts) == (9, 2)


def test_malformed_dotenv_line_is_reported_with_its_line(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("DYLEN_AUTH_MODE=dev\nnot a pair\n")
    with pytest.raises(ConfigError, match=r"\.env:2"):
        load_settings({}, dotenv=env_file)


def test_settings_are_frozen() -> None:
    s = load_settings(DEV)
    with pytest.raises(AttributeError):
        s.db_pool_size = 10  # type: ignore[misc]
    with pytest.raises(AttributeError):
        job_settings.load(DEV).max_attempts = 10  # type: ignore[misc]


def test_secret_is_not_in_repr() -> None:
    assert "hunter2" not in repr(load_settings({**DEV, "DYLEN_TASK_SECRET": "hunter2"}))


@pytest.mark.parametrize(
    ("function", "variable", "value"),
    [
        ("create_job", "DYLEN_DB_POOL_SIZE", "-3"),  # the platform's
        ("create_job", "DYLEN_JOB_MAX_ATTEMPTS", "0"),  # the job system's
        ("create_job", "DYLEN_TIER_DAILY_JOBS", "pro=1"),  # the tiers'
        ("process_job", "DYLEN_LESSON_GENERATOR", "no_colon"),  # the lessons', through the kinds
        ("process_job", "DYLEN_LESSON_GENERATOR", "gemini"),  # Gemini without credentials
        ("get_job", "DYLEN_MODEL_LIMITS", "gemini-2.5-flash=rpm:0"),  # the models' (get_job's usage)
    ],
)
def test_a_function_refuses_to_start_with_a_bad_config(function: str, variable: str, value: str) -> None:
    import subprocess
    import sys

    from tests.support import ROOT

    result = subprocess.run(
        [sys.executable, "-c", f"import runpy; runpy.run_path('functions/{function}/main.py')"],
        env={
            "PYTHONPATH": str(ROOT),
            "DYLEN_AUTH_MODE": "dev",
            "DYLEN_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",  # never reached
            variable: value,
            "DYLEN_ENV_FILE": "/dev/null",
            "PATH": "/usr/bin:/bin",
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("dylen: configuration error: ") and variable in line

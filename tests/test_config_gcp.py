"""Start-up guards of the production path: each refuses to start with a message naming the variable."""

from __future__ import annotations

import pytest

from common.platform.config import load_settings
from common.platform.errors import ConfigError

GCP = {
    "DYLEN_AUTH_MODE": "firebase",
    "DYLEN_FIREBASE_PROJECT_ID": "dylen-prod",
    "DYLEN_TASK_SERVICE_PROVIDER": "gcp",
    "DYLEN_CLOUD_TASKS_QUEUE_PATH": "projects/dylen-prod/locations/europe-west1/queues/dylen-jobs",
    "DYLEN_PROCESS_JOB_URL": "https://europe-west1-dylen-prod.cloudfunctions.net/process_job",
    "DYLEN_TASKS_INVOKER_SA": "dylen-tasks@dylen-prod.iam.gserviceaccount.com",
}
CLOUD_SQL = {
    "DYLEN_CLOUD_SQL_INSTANCE": "dylen-prod:europe-west1:dylen",
    "DYLEN_DB_NAME": "dylen",
}


def test_a_complete_production_configuration_loads() -> None:
    s = load_settings(
        {**GCP, **CLOUD_SQL, "DYLEN_DB_USER": "dylen-runtime@dylen-prod.iam", "DYLEN_DB_IAM_AUTH": "true"}
    )
    assert s.task_provider == "gcp" and s.uses_cloud_sql and s.db_iam_auth
    assert s.oidc_audience == GCP["DYLEN_PROCESS_JOB_URL"]
    assert s.tasks_allowed_sas == (GCP["DYLEN_TASKS_INVOKER_SA"],)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"DYLEN_CLOUD_TASKS_QUEUE_PATH": ""}, "DYLEN_CLOUD_TASKS_QUEUE_PATH"),
        ({"DYLEN_PROCESS_JOB_URL": ""}, "DYLEN_PROCESS_JOB_URL"),  # the localhost default is refused
        ({"DYLEN_PROCESS_JOB_URL": "http://process-job.example.test"}, "DYLEN_PROCESS_JOB_URL"),
        ({"DYLEN_TASKS_INVOKER_SA": ""}, "DYLEN_TASKS_INVOKER_SA"),
        ({"DYLEN_AUTH_MODE": "dev"}, "DYLEN_AUTH_MODE=dev"),
    ],
)
def test_gcp_provider_guards(change: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings({**GCP, **change})


def test_dev_auth_is_allowed_against_an_emulator() -> None:
    s = load_settings(
        {
            **GCP,
            "DYLEN_AUTH_MODE": "dev",
            "CLOUD_TASKS_EMULATOR_HOST": "127.0.0.1:8123",
            "DYLEN_PROCESS_JOB_URL": "",
        }
    )
    assert s.auth_mode == "dev" and s.process_job_url == "http://localhost:8080/process_job"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({**CLOUD_SQL, "DYLEN_DB_IAM_AUTH": "true"}, "DYLEN_DB_USER is required when DYLEN_DB_IAM_AUTH=true"),
        (
            {
                **CLOUD_SQL,
                "DYLEN_DB_IAM_AUTH": "true",
                "DYLEN_DB_USER": "rt@dylen-prod.iam.gserviceaccount.com",
            },
            "DYLEN_DB_USER for IAM auth",
        ),
        (
            {"DYLEN_DATABASE_URL": "postgresql://db/x", "DYLEN_DB_IAM_AUTH": "true", "DYLEN_DB_USER": "u"},
            "DYLEN_CLOUD_SQL_INSTANCE",
        ),
        ({**CLOUD_SQL, "DYLEN_DB_IAM_AUTH": "sometimes", "DYLEN_DB_USER": "u"}, "DYLEN_DB_IAM_AUTH"),
        (
            {**CLOUD_SQL, "DYLEN_DB_USER": "u", "DYLEN_DATABASE_URL": "postgresql://db/x"},
            "DYLEN_DATABASE_URL",
        ),
    ],
)
def test_cloud_sql_guards(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings({"DYLEN_AUTH_MODE": "dev", **env})


def test_password_is_not_needed_with_iam_auth() -> None:
    s = load_settings(
        {"DYLEN_AUTH_MODE": "dev", **CLOUD_SQL, "DYLEN_DB_IAM_AUTH": "true", "DYLEN_DB_USER": "u"}
    )
    assert s.db_password is None and s.db_iam_auth

"""deploy.sh: what it runs, in which order, how it fails, and that what it stages runs on its own.

Nothing here reaches Google. A stand-in `gcloud` (tests/fake_gcloud.py) sits on PATH: it records
every call, keeps the project's state between runs (so a second deployment meets what the first
made), refuses what gcloud refuses, and fails a call the way gcloud does when a test asks it to
(permission denied, an organisation policy's refusal, not found, IAM still propagating). The dry run
must call nothing at all. The staged functions run under functions-framework on loopback against
the test database, from their build folder alone, as Cloud Build would package them; the migration
job's container command runs the real migration against the test PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from common.accounts.settings import tier_settings
from common.jobs.settings import job_settings
from common.models.settings import model_settings
from common.platform.config import load_settings
from common.platform.telemetry import telemetry_settings
from devtools import deploy_checks
from tests.support import ROOT, FunctionServer, base_env, lesson_body, session, stop_all

PROJECT, REGION = "dylen-prod", "europe-west1"
INSTANCE = f"{PROJECT}:{REGION}:dylen"
BASE_ARGS = ("--project", PROJECT, "--region", REGION, "--sql-instance", INSTANCE)


def _sa(name: str, project: str = PROJECT) -> str:
    return f"{name}@{project}.iam.gserviceaccount.com"


API_SA, WORKER_SA, CRON_SA, DASHBOARD_SA = (
    _sa(n) for n in ("dylen-api", "dylen-worker", "dylen-cron", "dylen-dashboard")
)
MIGRATE_SA, BUILD_SA = _sa("dylen-migrate"), _sa("dylen-build")
INVOKER_SA, SCHEDULER_SA = _sa("dylen-tasks"), _sa("dylen-scheduler")
RUNTIME_SAS = (API_SA, WORKER_SA, CRON_SA, DASHBOARD_SA)
BASE_URL = f"https://{REGION}-{PROJECT}.cloudfunctions.net"
TASK_CALLED = {"process_job": INVOKER_SA, "archive_lessons": SCHEDULER_SA, "rescue_jobs": SCHEDULER_SA}
RUNS_AS = {
    "process_job": WORKER_SA,
    "archive_lessons": CRON_SA,
    "rescue_jobs": CRON_SA,
    "dashboard": DASHBOARD_SA,
}
OPERATORS = ("ops@example.com", "oncall@example.com")  # the dashboard's invokers (IAM) and allow list
READY_INSTANCE: dict[str, Any] = {
    "name": "dylen",
    "state": "RUNNABLE",
    "databaseVersion": "POSTGRES_15",
    "settings": {
        "databaseFlags": [
            {"name": "max_connections", "value": "150"},
            {"name": "cloudsql.iam_authentication", "value": "on"},
        ],
        "ipConfiguration": {
            "ipv4Enabled": True,
            "privateNetwork": "projects/dylen-prod/global/networks/default",
        },
    },
}
DOMAIN_RESTRICTED = {"spec": {"rules": [{"values": {"allowedValues": ["is:C0abc123"]}}]}}
# gcloud verbs that change nothing: all that --check and a dry run may use.
READ_ONLY = re.compile(r"^(config get-value |logging read |(\S+ ){1,3}(describe|list|get-iam-policy) )")


def _functions(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "functions").iterdir() if (p / "main.py").is_file())


def _user_functions(root: Path = ROOT) -> list[str]:
    return [n for n in _functions(root) if n not in TASK_CALLED and n != "dashboard"]


# --- the stand-in gcloud ----------------------------------------------------------------------------


def _fake_gcloud(
    tmp_path: Path,
    *,
    config: dict[str, str] | None = None,
    instance: dict[str, Any] | None = READY_INSTANCE,
    fail: list[dict[str, Any]] | None = None,
    org_policies: dict[str, Any] | None = None,
    logs: list[str] | None = None,
    secret_version: str = "1",
) -> Path:
    """Install tests/fake_gcloud.py as tmp_path/bin/gcloud, recording into tmp_path/calls. `fail`
    rules: {"match": regex on the command line, "error": permission|orgpolicy|notfound|propagation|
    literal text, "times": how many times (default always)}."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    shutil.copy2(ROOT / "tests" / "fake_gcloud.py", fake_bin / "fake_gcloud.py")
    (fake_bin / "gcloud").write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S {shlex.quote(str(fake_bin / "fake_gcloud.py"))} "$@"\n'
    )
    (fake_bin / "gcloud").chmod(0o755)
    spec = {
        "calls": str(tmp_path / "calls"),
        "config": config or {},
        "instance": instance,
        "fail": fail or [],
        "org_policies": org_policies or {},
        "logs": logs or [],
        "secret_version": secret_version,
    }
    (fake_bin / "spec.json").write_text(json.dumps(spec))
    return fake_bin


def _respec(fake_bin: Path, **changes: Any) -> None:
    spec = json.loads((fake_bin / "spec.json").read_text())
    spec.update(changes)
    (fake_bin / "spec.json").write_text(json.dumps(spec))


def _state(fake_bin: Path) -> dict[str, Any]:
    return json.loads((fake_bin / "state.json").read_text())


def _set_state(fake_bin: Path, state: dict[str, Any]) -> None:
    (fake_bin / "state.json").write_text(json.dumps(state))


def _deploy(tmp_path: Path, *args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(cwd / "deploy.sh"), "--build-dir", str(tmp_path / "build"), *args],
        env={"HOME": str(tmp_path), "DYLEN_DEPLOY_RETRY_SECONDS": "0", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _run(tmp_path: Path, fake_bin: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return _deploy(tmp_path, *args, PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", **env)


def _calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def _plan(stdout: str) -> list[list[str]]:
    """The commands a run printed (`+ cmd`), without the comments describes carry."""
    return [
        shlex.split(re.sub(r"  # .*$", "", line[2:])) for line in stdout.splitlines() if line.startswith("+ ")
    ]


def _find(commands: list[list[str]], *prefix: str) -> list[list[str]]:
    return [c for c in commands if c[: len(prefix)] == list(prefix)]


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _env_vars(command: list[str]) -> dict[str, str]:
    raw = _flag(command, "--set-env-vars")
    assert raw.startswith("^|^")
    return dict(pair.split("=", 1) for pair in raw[3:].split("|"))


def _index(calls: list[str], prefix: str) -> int:
    return next(i for i, c in enumerate(calls) if c.startswith(prefix))


def _changes(calls: list[str]) -> list[str]:
    return [c for c in calls if not READ_ONLY.match(c + " ")]


# --- static ----------------------------------------------------------------------------------------


def test_deploy_sh_is_valid_bash_and_shellcheck_clean_where_available() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "deploy.sh")], check=True)
    first = (ROOT / "deploy.sh").read_text().splitlines()[:10]
    assert first[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in first
    if shutil.which("shellcheck"):  # a developer tool, not a test dependency; CI may lack it
        result = subprocess.run(["shellcheck", str(ROOT / "deploy.sh")], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


# --- the dry run -------------------------------------------------------------------------------------


MODEL_LIMITS = "gemini-2.5-flash=rpm:1000,tpm:2000000,concurrency:50; gemini-2.5-pro=rpm:100"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """deploy.sh --dry-run on a copy of the repository that also has the scheduler-called functions
    (other branches add them; the script must deploy whatever folders exist)."""
    tree = tmp_path_factory.mktemp("repo")
    for name in ("deploy.sh", "requirements.txt"):
        shutil.copy2(ROOT / name, tree / name)
    for folder in ("common", "functions", "migrations", "devtools"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for extra in ("archive_lessons", "rescue_jobs"):
        (tree / "functions" / extra).mkdir(exist_ok=True)
        (tree / "functions" / extra / "main.py").touch()
    home = tmp_path_factory.mktemp("home")
    fake_bin = _fake_gcloud(home)
    result = _deploy(
        home,
        "--dry-run",
        "--region",
        REGION,  # from a flag ...
        "--sql-instance",
        INSTANCE,
        cwd=tree,
        PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        DYLEN_GCP_PROJECT=PROJECT,  # ... and from the environment
        DYLEN_JOB_MAX_ATTEMPTS="7",
        DYLEN_JOB_TIMEOUT_SECONDS="900",
        DYLEN_TIER_HISTORY_LIMITS="free=3,pro=80",
        DYLEN_TIER_DAILY_TOKENS="free=50000,pro=9000000",
        DYLEN_TIER_CONCURRENT_CALLS="free=1,pro=32",
        DYLEN_DASHBOARD_OPERATORS=", ".join(OPERATORS),
        DYLEN_MODEL_LIMITS=MODEL_LIMITS,
    )
    assert result.returncode == 0, result.stderr
    return {
        "tree": tree,
        "commands": _plan(result.stdout),
        "calls": home / "calls",
        "build": home / "build",
        "stdout": result.stdout,
    }


def test_dry_run_runs_nothing(dry_run: dict[str, Any]) -> None:
    assert not dry_run["calls"].exists(), "the dry run called gcloud"
    assert not dry_run["build"].exists(), "the dry run staged files"
    assert dry_run["commands"], dry_run["stdout"]


def test_dry_run_deploys_every_function_folder_as_its_roles_identity(dry_run: dict[str, Any]) -> None:
    commands = dry_run["commands"]
    names = _functions(dry_run["tree"])
    build = dry_run["build"]
    assert {"archive_lessons", "rescue_jobs", "process_job", "create_job"} <= set(names)
    for name in names:
        (deploy,) = _find(commands, "gcloud", "functions", "deploy", name)
        for flag in ("--gen2", "--trigger-http"):
            assert flag in deploy
        assert _flag(deploy, "--runtime") == "python312"
        assert _flag(deploy, "--entry-point") == name
        assert _flag(deploy, "--source") == f"{build}/{name}"
        assert _flag(deploy, "--service-account") == RUNS_AS.get(name, API_SA)
        assert _flag(deploy, "--build-service-account") == f"projects/{PROJECT}/serviceAccounts/{BUILD_SA}"
        assert _flag(deploy, "--update-labels") == "managed-by=dylen-deploy"
        assert _flag(deploy, "--region") == REGION and _flag(deploy, "--project") == PROJECT
        if name in TASK_CALLED or name == "dashboard":
            assert "--no-allow-unauthenticated" in deploy and "--allow-unauthenticated" not in deploy
        else:
            assert "--allow-unauthenticated" in deploy and "--no-allow-unauthenticated" not in deploy
        assert not any(c.startswith("DYLEN_DB_PASSWORD") for c in deploy)  # IAM auth: no secret
        # Staged first: main.py, a copy of common/, requirements, .gcloudignore.
        assert ["cp", "-R", f"{dry_run['tree']}/common", f"{build}/{name}/common"] in commands
        assert ["cp", f"{dry_run['tree']}/functions/{name}/main.py", f"{build}/{name}/main.py"] in commands
        assert ["cp", f"{dry_run['tree']}/requirements.txt", f"{build}/{name}/requirements.txt"] in commands
        assert f"+ write {build}/{name}/.gcloudignore" in dry_run["stdout"]
    (process,) = _find(commands, "gcloud", "functions", "deploy", "process_job")
    assert _flag(process, "--timeout") == "900s"  # the request outlives no dispatch deadline


def test_dry_run_env_vars_are_a_valid_production_configuration(dry_run: dict[str, Any]) -> None:
    for name, account in (("create_job", API_SA), ("process_job", WORKER_SA), ("rescue_jobs", CRON_SA)):
        (deploy,) = _find(dry_run["commands"], "gcloud", "functions", "deploy", name)
        env = _env_vars(deploy)
        assert env["DYLEN_TASK_SERVICE_PROVIDER"] == "gcp"
        assert (
            env["DYLEN_CLOUD_TASKS_QUEUE_PATH"] == f"projects/{PROJECT}/locations/{REGION}/queues/dylen-jobs"
        )
        assert env["DYLEN_PROCESS_JOB_URL"] == f"{BASE_URL}/process_job"
        assert env["DYLEN_TASKS_INVOKER_SA"] == INVOKER_SA
        assert env["DYLEN_TASKS_ALLOWED_SA"] == f"{INVOKER_SA},{SCHEDULER_SA}"
        assert env["DYLEN_TIER_HISTORY_LIMITS"] == "free=3,pro=80"  # commas survive the ^|^ delimiter
        tiers = tier_settings.load({**env, "DYLEN_ENV_FILE": os.devnull})
        assert (tiers.daily_tokens["pro"], tiers.concurrent_calls["free"]) == (9000000, 1)
        assert model_settings.load({**env, "DYLEN_ENV_FILE": os.devnull}).limits["gemini-2.5-pro"].rpm == 100
        # The same guards that run at cold start accept what deploy.sh sets.
        settings = load_settings({**env, "DYLEN_ENV_FILE": os.devnull})
        jobs = job_settings.load({**env, "DYLEN_ENV_FILE": os.devnull})
        assert jobs.max_attempts == 7 and jobs.timeout_seconds == 900
        assert settings.cloud_sql_instance == INSTANCE and settings.db_iam_auth
        assert settings.db_ip_type == "public"
        # Each role logs in as its own service account's IAM database user.
        assert settings.db_user == account.removesuffix(".gserviceaccount.com")
        assert settings.auth_mode == "firebase" and settings.firebase_project_id == PROJECT
        # Traces and metrics go to the deployment's project, checked as at cold start.
        traced = telemetry_settings.load({**env, "DYLEN_ENV_FILE": os.devnull})
        assert (traced.mode, traced.project) == ("gcp", PROJECT)


@pytest.mark.parametrize(("asked", "given"), [("7200", "1800"), ("5", "15")])
def test_the_job_timeout_is_clamped_to_what_a_cloud_tasks_http_task_may_run(
    tmp_path: Path, asked: str, given: str
) -> None:
    fake_bin = _fake_gcloud(tmp_path)
    result = _run(tmp_path, fake_bin, "--dry-run", *BASE_ARGS, DYLEN_JOB_TIMEOUT_SECONDS=asked)
    assert result.returncode == 0, result.stderr
    assert f"DYLEN_JOB_TIMEOUT_SECONDS={asked} is outside" in result.stderr
    (process,) = _find(_plan(result.stdout), "gcloud", "functions", "deploy", "process_job")
    # The lease (the job's timeout) and the request's life are one and the same
    assert _env_vars(process)["DYLEN_JOB_TIMEOUT_SECONDS"] == given
    assert _flag(process, "--timeout") == f"{given}s"


def test_dry_run_creates_the_queue_with_retry_config_and_rate_limits(dry_run: dict[str, Any]) -> None:
    commands = dry_run["commands"]
    assert _find(commands, "gcloud", "tasks", "queues", "describe", "dylen-jobs")  # create-or-update
    (create,) = _find(commands, "gcloud", "tasks", "queues", "create", "dylen-jobs")
    assert _flag(create, "--location") == REGION
    # The queue's retries are the crash net, not the job's (7 attempts, its own backoff)
    assert _flag(create, "--max-attempts") == "20"
    assert _flag(create, "--min-backoff") == "10s" and _flag(create, "--max-backoff") == "300s"
    assert _flag(create, "--max-doublings") == "4"
    assert _flag(create, "--max-dispatches-per-second") == "10"
    assert _flag(create, "--max-concurrent-dispatches") == "20"


def test_dry_run_gives_each_identity_only_what_it_needs(dry_run: dict[str, Any]) -> None:
    commands = dry_run["commands"]
    accounts = (*RUNTIME_SAS, MIGRATE_SA, BUILD_SA, INVOKER_SA, SCHEDULER_SA)
    for account in accounts:
        assert _find(commands, "gcloud", "iam", "service-accounts", "describe", account)
        assert _find(commands, "gcloud", "iam", "service-accounts", "create", account.split("@")[0])
    project_roles: dict[str, set[str]] = {}
    for c in _find(commands, "gcloud", "projects", "add-iam-policy-binding", PROJECT):
        project_roles.setdefault(_flag(c, "--member"), set()).add(_flag(c, "--role"))
    database = {"roles/cloudsql.client", "roles/cloudsql.instanceUser"}
    telemetry = {"roles/cloudtrace.agent", "roles/monitoring.metricWriter"}
    assert project_roles == {
        **{f"serviceAccount:{a}": database | telemetry for a in RUNTIME_SAS},
        f"serviceAccount:{MIGRATE_SA}": database,
        f"serviceAccount:{BUILD_SA}": {"roles/cloudbuild.builds.builder"},
    }  # no project-wide enqueuer
    enqueuers = _find(commands, "gcloud", "tasks", "queues", "add-iam-policy-binding", "dylen-jobs")
    assert {_flag(c, "--member") for c in enqueuers} == {f"serviceAccount:{a}" for a in RUNTIME_SAS}
    assert {_flag(c, "--role") for c in enqueuers} == {"roles/cloudtasks.enqueuer"}
    act_as = _find(commands, "gcloud", "iam", "service-accounts", "add-iam-policy-binding", INVOKER_SA)
    assert {_flag(c, "--member") for c in act_as} == {f"serviceAccount:{a}" for a in RUNTIME_SAS}
    assert {_flag(c, "--role") for c in act_as} == {"roles/iam.serviceAccountUser"}
    (writer,) = _find(commands, "gcloud", "artifacts", "repositories", "add-iam-policy-binding", "dylen")
    assert _flag(writer, "--member") == f"serviceAccount:{BUILD_SA}"
    invokers = {
        (c[3], _flag(c, "--member"))
        for c in _find(commands, "gcloud", "functions", "add-invoker-policy-binding")
    }
    assert invokers == {(name, f"serviceAccount:{sa}") for name, sa in TASK_CALLED.items()} | {
        ("dashboard", f"user:{email}") for email in OPERATORS
    }
    (dashboard,) = _find(commands, "gcloud", "functions", "deploy", "dashboard")
    settings = load_settings({**_env_vars(dashboard), "DYLEN_ENV_FILE": os.devnull})
    assert settings.dashboard_operators == OPERATORS
    assert settings.dashboard_audiences == (f"{BASE_URL}/dashboard",)
    for account in (*RUNTIME_SAS, MIGRATE_SA):
        user = account.removesuffix(".gserviceaccount.com")
        (sql_user,) = _find(commands, "gcloud", "sql", "users", "create", user)
        assert _flag(sql_user, "--type") == "cloud_iam_service_account"
    # The migration job's user alone may create the schema (PostgreSQL 15+: the owner's rights).
    (assign,) = _find(commands, "gcloud", "sql", "users", "assign-roles")
    assert assign[4] == MIGRATE_SA.removesuffix(".gserviceaccount.com")
    assert _flag(assign, "--database-roles") == "cloudsqlsuperuser"


def test_dry_run_schedules_archive_and_rescue_with_oidc(dry_run: dict[str, Any]) -> None:
    commands = dry_run["commands"]
    expected = {"archive_lessons": "0 1 * * *", "rescue_jobs": "*/5 * * * *"}
    for name, schedule in expected.items():
        assert _find(commands, "gcloud", "scheduler", "jobs", "describe", f"dylen-{name}")
        (create,) = _find(commands, "gcloud", "scheduler", "jobs", "create", "http", f"dylen-{name}")
        assert _flag(create, "--schedule") == schedule
        assert _flag(create, "--time-zone") == "Etc/UTC"
        assert _flag(create, "--uri") == f"{BASE_URL}/{name}"
        assert _flag(create, "--http-method") == "POST"
        assert _flag(create, "--oidc-service-account-email") == SCHEDULER_SA
        assert _flag(create, "--oidc-token-audience") == f"{BASE_URL}/{name}"


@pytest.mark.parametrize("override", [None, "https://tasks-audience.example.test"])
def test_each_task_function_checks_the_audience_its_caller_is_given(
    dry_run: dict[str, Any], override: str | None
) -> None:
    """Settings.task_audience is the one rule; it must name what deploy.sh gives Cloud Scheduler
    (--oidc-token-audience) and Cloud Tasks (dispatch_gcp mints for oidc_audience), with or
    without DYLEN_TASKS_OIDC_AUDIENCE."""
    commands = dry_run["commands"]
    for name in ("archive_lessons", "rescue_jobs", "process_job"):
        (deploy,) = _find(commands, "gcloud", "functions", "deploy", name)
        env = _env_vars(deploy)
        if override:
            env["DYLEN_TASKS_OIDC_AUDIENCE"] = override
        settings = load_settings({**env, "DYLEN_ENV_FILE": os.devnull})
        if name == "process_job":
            minted = settings.oidc_audience  # what dispatch_gcp puts in the Cloud Tasks token
            assert minted == (override or f"{BASE_URL}/process_job")
        else:
            (create,) = _find(commands, "gcloud", "scheduler", "jobs", "create", "http", f"dylen-{name}")
            minted = _flag(create, "--oidc-token-audience")
        assert settings.task_audience(name) == minted


def test_dry_run_migrates_inside_google_cloud_before_any_function(dry_run: dict[str, Any]) -> None:
    commands = dry_run["commands"]
    assert not [c for c in commands if "common.cli" in c or c[0] == "env"]  # nothing from this machine
    (build,) = _find(commands, "gcloud", "builds", "submit")
    image = _flag(build, "--substitutions").removeprefix("_IMAGE=")
    assert re.fullmatch(rf"{REGION}-docker\.pkg\.dev/{PROJECT}/dylen/dylen-migrate:[0-9a-f]{{16}}", image)
    assert _flag(build, "--service-account") == f"projects/{PROJECT}/serviceAccounts/{BUILD_SA}"
    (job,) = _find(commands, "gcloud", "run", "jobs", "deploy", "dylen-migrate")
    assert _flag(job, "--image") == image
    assert _flag(job, "--service-account") == MIGRATE_SA
    assert (_flag(job, "--tasks"), _flag(job, "--max-retries")) == ("1", "0")  # a failure is final
    args = _flag(job, "--args").split(",")
    assert args[:4] == ["migrate", "head", "--wait-for-database", "600"]
    assert args[4::2] == ["--grant-to"] * 4
    assert args[5::2] == [a.removesuffix(".gserviceaccount.com") for a in RUNTIME_SAS]
    # The job's configuration is one the operator command accepts, as its own IAM user.
    settings = load_settings({**_env_vars(job), "DYLEN_ENV_FILE": os.devnull}, serving=False)
    assert settings.cloud_sql_instance == INSTANCE and settings.db_iam_auth
    assert settings.db_user == MIGRATE_SA.removesuffix(".gserviceaccount.com")
    order = [" ".join(c) for c in commands]
    execute = _index(order, "gcloud run jobs execute")
    assert _index(order, "gcloud sql databases create") < _index(order, "gcloud sql users create") < execute
    assert _index(order, "gcloud builds submit") < _index(order, "gcloud run jobs deploy") < execute
    assert execute < _index(order, "gcloud functions deploy")
    (enable,) = _find(commands, "gcloud", "services", "enable")
    assert "secretmanager.googleapis.com" not in enable  # IAM database auth: no secret to read


@pytest.mark.parametrize(
    ("name", "threads", "pool", "overflow", "concurrency", "max_instances"),
    [
        ("create_job", "2", "2", "2", "8", "5"),
        ("get_job", "2", "2", "2", "8", "3"),
        ("process_job", "4", "4", "2", "4", "5"),
        ("rescue_jobs", "1", "1", "1", "1", "1"),
    ],
)
def test_dry_run_applies_the_instance_settings(
    dry_run: dict[str, Any],
    name: str,
    threads: str,
    pool: str,
    overflow: str,
    concurrency: str,
    max_instances: str,
) -> None:
    (deploy,) = _find(dry_run["commands"], "gcloud", "functions", "deploy", name)
    env = _env_vars(deploy)
    assert (env["THREADS"], env["DYLEN_DB_POOL_SIZE"], env["DYLEN_DB_MAX_OVERFLOW"]) == (
        threads,
        pool,
        overflow,
    )
    assert (_flag(deploy, "--concurrency"), _flag(deploy, "--max-instances")) == (concurrency, max_instances)
    assert _flag(deploy, "--cpu") == "1"  # Cloud Run refuses a concurrency above 1 with less
    load_settings({**env, "DYLEN_ENV_FILE": os.devnull})  # the pool settings pass the start-up guards


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "--project (or DYLEN_GCP_PROJECT) is required"),
        (["--project", PROJECT], {}, "--region (or DYLEN_GCP_REGION) is required"),
        (["--project", PROJECT, "--region", REGION], {}, "--sql-instance (or DYLEN_CLOUD_SQL_INSTANCE)"),
        (
            ["--project", PROJECT, "--region", REGION, "--sql-instance", "dylen"],
            {},
            "PROJECT:REGION:INSTANCE",
        ),
        (["--project"], {}, "--project needs a value"),
        (["--colour", "blue"], {}, "unknown option '--colour'"),
        ([], {"DYLEN_JOB_MAX_ATTEMPTS": "many"}, "DYLEN_JOB_MAX_ATTEMPTS"),
        (["--db-ip-type", "private"], {}, "--db-ip-type private needs --vpc-connector"),
        (["--db-ip-type", "vpc"], {}, "--db-ip-type must be public, private or psc"),
        (
            ["--public-access", "everyone"],
            {},
            "--public-access must be auto, all-users or no-invoker-iam-check",
        ),
        ([*BASE_ARGS, "--db-user", "me"], {}, "--db-user is for password auth"),
        (
            ["--db-password-secret-version", "3"],
            {},
            "--db-password-secret-version needs --db-password-secret",
        ),
        (["--check"], {}, "--dry-run, --check and --stage-only exclude each other"),
    ],
)
def test_missing_or_bad_settings_fail_clearly(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    # A gcloud with nothing configured, so the developer's own `gcloud config` cannot fill the gaps.
    fake_bin = _fake_gcloud(tmp_path, config={})
    result = _run(tmp_path, fake_bin, "--dry-run", *args, **env)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert not _changes(_calls(tmp_path))


def test_project_and_region_default_to_gclouds_configuration(tmp_path: Path) -> None:
    fake_bin = _fake_gcloud(tmp_path, config={"project": "cfg-project", "functions/region": "asia-east1"})
    result = _run(tmp_path, fake_bin, "--dry-run", "--sql-instance", "cfg-project:asia-east1:dylen")
    assert result.returncode == 0, result.stderr
    assert "(project cfg-project: from gcloud config)" in result.stdout
    (deploy,) = _find(_plan(result.stdout), "gcloud", "functions", "deploy", "create_job")
    assert _flag(deploy, "--project") == "cfg-project" and _flag(deploy, "--region") == "asia-east1"
    # Reading gcloud's local configuration is all the dry run did.
    assert _calls(tmp_path) == ["config get-value project", "config get-value functions/region"]
    # A flag or variable still wins over gcloud's configuration, which is then not read at all.
    (tmp_path / "calls").unlink()
    result = _run(
        tmp_path,
        fake_bin,
        "--dry-run",
        "--project",
        PROJECT,
        "--sql-instance",
        INSTANCE,
        DYLEN_GCP_REGION=REGION,
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "calls").exists()


# --- a real run, against the stand-in ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A dry run, then a real run on a project where nothing exists yet, then a second real run."""
    tmp = tmp_path_factory.mktemp("fresh")
    fake_bin = _fake_gcloud(tmp)
    dry = _run(tmp, fake_bin, "--dry-run", *BASE_ARGS)
    assert dry.returncode == 0, dry.stderr
    assert not _calls(tmp)
    first = _run(tmp, fake_bin, *BASE_ARGS)
    assert first.returncode == 0, first.stderr
    first_calls = _calls(tmp)
    state_after_first = _state(fake_bin)
    (tmp / "calls").unlink()
    second = _run(tmp, fake_bin, *BASE_ARGS)
    assert second.returncode == 0, second.stderr
    return {
        "tmp": tmp,
        "bin": fake_bin,
        "dry": dry,
        "first": first,
        "first_calls": first_calls,
        "state_after_first": state_after_first,
        "second": second,
        "second_calls": _calls(tmp),
    }


def test_the_dry_run_prints_exactly_what_the_real_run_runs(fresh: dict[str, Any]) -> None:
    dry_plan, real_plan = _plan(fresh["dry"].stdout), _plan(fresh["first"].stdout)
    assert dry_plan == real_plan
    # ... and what the real run printed is what it ran: its gcloud lines, in order, are the calls.
    assert [" ".join(c[1:]) for c in real_plan if c[0] == "gcloud"] == fresh["first_calls"]


def test_a_first_run_creates_everything_in_order(fresh: dict[str, Any]) -> None:
    calls = fresh["first_calls"]
    steps = [
        "services enable",
        "sql instances describe dylen --project dylen-prod",  # preflight: reads only
        "org-policies describe iam.allowedPolicyMemberDomains",
        "iam service-accounts create dylen-api",
        "projects add-iam-policy-binding dylen-prod --member serviceAccount:dylen-api",
        "artifacts repositories create dylen",
        "sql databases create dylen",
        "sql users create dylen-api@dylen-prod.iam",
        "sql users assign-roles dylen-migrate@dylen-prod.iam",
        "tasks queues create dylen-jobs",
        "tasks queues add-iam-policy-binding dylen-jobs",
        "builds submit",
        "run jobs deploy dylen-migrate",
        "run jobs execute dylen-migrate",
        "functions deploy",
        "functions add-invoker-policy-binding",
        "scheduler jobs create http dylen-archive_lessons",
    ]
    positions = [_index(calls, step) for step in steps]
    assert positions == sorted(positions), list(zip(steps, positions, strict=True))
    # Every account exists before anything is bound to it (a fresh account's bindings would fail).
    last_account = max(i for i, c in enumerate(calls) if c.startswith("iam service-accounts create"))
    assert last_account < _index(calls, "projects add-iam-policy-binding")
    deployed = sorted(c.split()[2] for c in calls if c.startswith("functions deploy "))
    assert deployed == _functions(ROOT)
    assert sorted(p.name for p in (fresh["tmp"] / "build").iterdir()) == sorted(
        [*_functions(ROOT), "dylen-migrate", "deploy-record.txt"]
    )  # staged for real this time
    record = (fresh["tmp"] / "build" / "deploy-record.txt").read_text()
    assert "public_access=all-users" in record and "migration_image=europe-west1-docker.pkg.dev/" in record


def test_a_second_run_creates_nothing_and_ships_the_new_version(fresh: dict[str, Any]) -> None:
    calls = fresh["second_calls"]
    assert [c for c in calls if re.search(r" (create|submit)( |$)", c)] == []
    assert any(c.startswith("tasks queues update dylen-jobs") for c in calls)
    assert any(c.startswith("run jobs execute dylen-migrate") for c in calls)  # migrations run every time
    assert sorted(c.split()[2] for c in calls if c.startswith("functions deploy ")) == _functions(ROOT)
    # The same project as after the first run: nothing bound twice, nothing new.
    after = _state(fresh["bin"])
    before = fresh["state_after_first"]
    assert sorted(map(tuple, after["bindings"])) == sorted(map(tuple, before["bindings"]))
    assert sorted(after["present"]) == sorted(before["present"])
    assert [m for r, m, _ in after["bindings"] if m == "allUsers"] == ["allUsers"] * len(_user_functions())


def test_stage_only_stages_the_migration_job_with_its_image_recipe(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "deploy.sh"), "--stage-only", "--build-dir", str(tmp_path)],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    stage = tmp_path / "dylen-migrate"
    dockerfile = (stage / "Dockerfile").read_text()
    assert "FROM python:3.12-slim" in dockerfile  # the functions' runtime
    assert "COPY migrations ./migrations" in dockerfile and "COPY common ./common" in dockerfile
    assert "logging: CLOUD_LOGGING_ONLY" in (stage / "cloudbuild.yaml").read_text()
    versions = sorted(p.name for p in (stage / "migrations" / "versions").glob("*.py"))
    assert versions == sorted(p.name for p in (ROOT / "migrations" / "versions").glob("*.py"))
    assert not list(stage.rglob("__pycache__"))


# --- failures: each one's message, and nothing half deployed ----------------------------------------


def test_a_describe_that_fails_for_another_reason_than_not_found_stops_the_run(tmp_path: Path) -> None:
    """`exists()` must not read every error as "absent": a permission error would send the run on
    to create what may well exist."""
    fake_bin = _fake_gcloud(
        tmp_path, fail=[{"match": "^iam service-accounts describe dylen-worker", "error": "permission"}]
    )
    result = _run(tmp_path, fake_bin, *BASE_ARGS)
    assert result.returncode == 2
    assert "cannot tell whether it exists" in result.stderr and "PERMISSION_DENIED" in result.stderr
    calls = _calls(tmp_path)
    assert not any(c.startswith("iam service-accounts create dylen-worker") for c in calls)
    assert calls[-1].startswith("iam service-accounts describe dylen-worker")  # nothing after it


def test_the_preflight_stops_before_any_change_when_the_instance_lacks_iam_authentication(
    tmp_path: Path,
) -> None:
    instance = json.loads(json.dumps(READY_INSTANCE))
    instance["settings"]["databaseFlags"] = [{"name": "max_connections", "value": "150"}]
    fake_bin = _fake_gcloud(tmp_path, instance=instance)
    result = _run(tmp_path, fake_bin, *BASE_ARGS)
    assert result.returncode == 2
    assert "does not have cloudsql.iam_authentication=on" in result.stderr, result.stderr
    assert "--database-flags cloudsql.iam_authentication=on,<every flag it already has>" in result.stderr
    assert _changes(_calls(tmp_path)) == [_calls(tmp_path)[0]]  # only `services enable`


@pytest.mark.parametrize(
    ("instance", "args", "message"),
    [
        (None, (), "cannot read Cloud SQL instance dylen in project dylen-prod"),
        (
            {
                **READY_INSTANCE,
                "settings": {**READY_INSTANCE["settings"], "ipConfiguration": {"ipv4Enabled": False}},
            },
            (),
            "has no public IP: use --db-ip-type private with --vpc-connector",
        ),
        (
            {
                **READY_INSTANCE,
                "settings": {**READY_INSTANCE["settings"], "ipConfiguration": {"ipv4Enabled": True}},
            },
            ("--db-ip-type", "private", "--vpc-connector", "dylen-vpc"),
            "has no private IP",
        ),
    ],
)
def test_the_preflight_names_what_the_instance_lacks(
    tmp_path: Path, instance: dict[str, Any] | None, args: tuple[str, ...], message: str
) -> None:
    fake_bin = _fake_gcloud(tmp_path, instance=instance)
    result = _run(tmp_path, fake_bin, *BASE_ARGS, *args)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert len(_changes(_calls(tmp_path))) == 1  # `services enable` only


def test_a_private_ip_instance_is_reached_over_the_vpc_connector(tmp_path: Path) -> None:
    fake_bin = _fake_gcloud(tmp_path)
    result = _run(tmp_path, fake_bin, *BASE_ARGS, "--db-ip-type", "private", "--vpc-connector", "dylen-vpc")
    assert result.returncode == 0, result.stderr
    plan = _plan(result.stdout)
    (job,) = _find(plan, "gcloud", "run", "jobs", "deploy")
    assert (
        _flag(job, "--vpc-connector") == "dylen-vpc" and _flag(job, "--vpc-egress") == "private-ranges-only"
    )
    assert _env_vars(job)["DYLEN_DB_IP_TYPE"] == "private"
    for deploy in _find(plan, "gcloud", "functions", "deploy"):
        assert _flag(deploy, "--vpc-connector") == "dylen-vpc"
        assert _flag(deploy, "--egress-settings") == "private-ranges-only"
        assert load_settings({**_env_vars(deploy), "DYLEN_ENV_FILE": os.devnull}).db_ip_type == "private"
    assert "vpcaccess.googleapis.com" in _find(plan, "gcloud", "services", "enable")[0]


def test_bindings_refused_while_iam_propagates_are_retried_bounded(tmp_path: Path) -> None:
    rule = {"match": "^projects add-iam-policy-binding .*dylen-api", "error": "propagation", "what": API_SA}
    fake_bin = _fake_gcloud(tmp_path, fail=[{**rule, "times": 2}])
    result = _run(tmp_path, fake_bin, *BASE_ARGS)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("refused while IAM propagates; retrying") == 2
    assert f"Service account {API_SA} does not exist" in result.stderr  # gcloud's own error shown

    # Past the bound: the run stops there, names the step, and deploys nothing.
    other = tmp_path / "again"
    other.mkdir()
    fake_bin = _fake_gcloud(other, fail=[rule])
    result = _run(other, fake_bin, *BASE_ARGS, DYLEN_DEPLOY_RETRIES="3")
    assert result.returncode == 2
    assert "still failing after 3 attempts" in result.stderr
    assert "this step failed" in result.stderr and "Nothing after it ran" in result.stderr
    calls = _calls(other)
    assert (
        sum(
            c.startswith("projects add-iam-policy-binding dylen-prod --member serviceAccount:dylen-api")
            for c in calls
        )
        == 3
    )
    assert not any(
        c.startswith(("functions deploy", "run jobs", "builds submit", "sql databases create")) for c in calls
    )


def test_a_permission_just_granted_is_waited_for_only_in_a_run_that_created_identities(
    tmp_path: Path,
) -> None:
    """The build account's builder role can take minutes to apply: a first run retries the build,
    a later run (nothing new) fails at once with the permission error."""
    rule = {"match": "^builds submit", "error": "permission", "what": "storage.objects.get", "times": 1}
    fake_bin = _fake_gcloud(tmp_path, fail=[rule])
    result = _run(tmp_path, fake_bin, *BASE_ARGS)
    assert result.returncode == 0, result.stderr
    assert "attempt 1 of 8 refused while IAM propagates" in result.stderr
    # A later run, whose image changed (so it builds again), with everything already there.
    _respec(fake_bin, fail=[{**rule, "times": None}])
    state = _state(fake_bin)
    state["present"] = [k for k in state["present"] if not k.startswith("image:")]
    _set_state(fake_bin, state)
    (tmp_path / "calls").unlink()
    result = _run(tmp_path, fake_bin, *BASE_ARGS)
    assert result.returncode == 2
    assert "PERMISSION_DENIED" in result.stderr and "retrying" not in result.stderr
    assert not any(c.startswith(("run jobs", "functions deploy")) for c in _calls(tmp_path))


def test_a_failed_migration_fails_the_deploy_with_its_own_error_and_deploys_no_function(
    tmp_path: Path,
) -> None:
    logs = [
        "Traceback (most recent call last):",
        '  File "/app/common/cli.py", line 40, in migrate',
        'error: migration failed: ProgrammingError: relation "jobs" already exists',
    ]
    fake_bin = _fake_gcloud(
        tmp_path,
        fail=[{"match": "^run jobs execute", "error": "The execution failed: 1 task failed."}],
        logs=logs,
    )
    result = _run(tmp_path, fake_bin, *BASE_ARGS)
    assert result.returncode == 2
    assert 'error: migration failed: ProgrammingError: relation "jobs" already exists' in result.stderr
    assert result.stderr.index("Traceback") < result.stderr.index("error: migration failed")  # in order
    assert "No function was deployed" in result.stderr
    calls = _calls(tmp_path)
    assert any(c.startswith("logging read") and "dylen-migrate" in c for c in calls)
    assert not any(c.startswith("functions deploy") for c in calls)


def test_a_function_that_fails_to_deploy_stops_the_run_there_without_retrying(tmp_path: Path) -> None:
    fake_bin = _fake_gcloud(
        tmp_path,
        fail=[{"match": "^functions deploy get_job", "error": "OperationError: Build failed: pip install"}],
    )
    result = _run(tmp_path, fake_bin, *BASE_ARGS)
    assert result.returncode == 2
    assert "deploying get_job failed" in result.stderr and "Build failed: pip install" in result.stderr
    assert "retrying" not in result.stderr  # not a propagation error: no point repeating a build
    deployed = [c.split()[2] for c in _calls(tmp_path) if c.startswith("functions deploy")]
    names = _functions(ROOT)
    assert deployed == names[: names.index("get_job") + 1]
    assert not any(c.startswith(("functions add-invoker", "scheduler jobs create")) for c in _calls(tmp_path))


# --- public functions where the organisation restricts sharing --------------------------------------


def test_domain_restricted_sharing_makes_the_public_functions_public_without_allusers(tmp_path: Path) -> None:
    fake_bin = _fake_gcloud(tmp_path, org_policies={"iam.allowedPolicyMemberDomains": DOMAIN_RESTRICTED})
    result = _run(tmp_path, fake_bin, *BASE_ARGS)
    assert result.returncode == 0, result.stderr
    assert "Cloud Run's invoker IAM check off instead" in result.stdout
    plan = _plan(result.stdout)
    for name in _user_functions():
        (deploy,) = _find(plan, "gcloud", "functions", "deploy", name)
        assert "--no-allow-unauthenticated" in deploy and "--allow-unauthenticated" not in deploy
    opened = _find(plan, "gcloud", "run", "services", "update")
    assert sorted(c[4] for c in opened) == sorted(n.replace("_", "-") for n in _user_functions())
    assert all("--no-invoker-iam-check" in c for c in opened)
    state = _state(fake_bin)
    assert not [b for b in state["bindings"] if b[1] == "allUsers"]
    assert sorted(state["invoker_check_off"]) == sorted(n.replace("_", "-") for n in _user_functions())
    # Only the public ones: the task functions still check their callers.
    assert "process-job" not in state["invoker_check_off"]


@pytest.mark.parametrize(
    ("policies", "args", "message"),
    [
        (
            {"iam.allowedPolicyMemberDomains": DOMAIN_RESTRICTED},
            ("--public-access", "all-users"),
            "Use --public-access no-invoker-iam-check",
        ),
        (
            {
                "iam.allowedPolicyMemberDomains": DOMAIN_RESTRICTED,
                "run.managed.requireInvokerIam": {"spec": {"rules": [{"enforce": True}]}},
            },
            (),
            "run.managed.requireInvokerIam forbids turning Cloud Run's invoker IAM check off",
        ),
    ],
)
def test_public_functions_that_cannot_be_made_public_stop_the_run_before_any_change(
    tmp_path: Path, policies: dict[str, Any], args: tuple[str, ...], message: str
) -> None:
    fake_bin = _fake_gcloud(tmp_path, org_policies=policies)
    result = _run(tmp_path, fake_bin, *BASE_ARGS, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Nothing was deployed." in result.stderr
    assert len(_changes(_calls(tmp_path))) == 1  # `services enable` only: no account, no function


def test_a_refusal_of_allusers_met_while_deploying_switches_to_the_invoker_check_off(tmp_path: Path) -> None:
    """When the policy cannot be read beforehand, the refusal itself is detected: the function is
    deployed but its allUsers binding refused, so it and the rest get the invoker check off."""
    fake_bin = _fake_gcloud(
        tmp_path,
        org_policies={
            c: "denied" for c in ("iam.allowedPolicyMemberDomains", "iam.managed.allowedPolicyMembers")
        },
        fail=[{"match": "^functions deploy .* --allow-unauthenticated", "error": "orgpolicy"}],
    )
    result = _run(tmp_path, fake_bin, *BASE_ARGS)
    assert result.returncode == 0, result.stderr
    assert "could not read the organisation policy" in result.stdout
    assert "the organisation refuses allUsers" in result.stdout
    calls = _calls(tmp_path)
    first_public = _user_functions()[0]
    assert sum("--allow-unauthenticated" in c for c in calls if c.startswith("functions deploy")) == 1
    assert any(
        c.startswith(f"functions deploy {first_public}") and "--allow-unauthenticated" in c for c in calls
    )
    assert sorted(_state(fake_bin)["invoker_check_off"]) == sorted(
        n.replace("_", "-") for n in _user_functions()
    )


# --- secrets, prune, check ------------------------------------------------------------------------------


def test_password_auth_pins_the_secrets_latest_version_and_records_it(tmp_path: Path) -> None:
    fake_bin = _fake_gcloud(tmp_path, secret_version="7")
    result = _run(tmp_path, fake_bin, *BASE_ARGS, "--db-password-secret", "dylen-db-password")
    assert result.returncode == 0, result.stderr
    plan = _plan(result.stdout)
    assert "secretmanager.googleapis.com" in _find(plan, "gcloud", "services", "enable")[0]
    for deploy in [
        *_find(plan, "gcloud", "functions", "deploy"),
        *_find(plan, "gcloud", "run", "jobs", "deploy"),
    ]:
        assert _flag(deploy, "--set-secrets") == "DYLEN_DB_PASSWORD=dylen-db-password:7"
        assert (
            _env_vars(deploy)["DYLEN_DB_USER"] == "dylen"
            and _env_vars(deploy)["DYLEN_DB_IAM_AUTH"] == "false"
        )
    readers = _find(plan, "gcloud", "secrets", "add-iam-policy-binding", "dylen-db-password")
    assert {_flag(c, "--member") for c in readers} == {
        f"serviceAccount:{a}" for a in (*RUNTIME_SAS, MIGRATE_SA)
    }
    assert not _find(plan, "gcloud", "sql", "users", "create")  # the password user is the operator's
    (job,) = _find(plan, "gcloud", "run", "jobs", "deploy")
    assert "--grant-to" not in _flag(job, "--args")  # one user for all: it owns what it creates
    assert "db_password_secret=dylen-db-password:7" in (tmp_path / "build" / "deploy-record.txt").read_text()
    # A version given is used as is, without asking for the latest.
    (tmp_path / "calls").unlink()
    result = _run(
        tmp_path,
        fake_bin,
        "--dry-run",
        *BASE_ARGS,
        "--db-password-secret",
        "s",
        "--db-password-secret-version",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert "DYLEN_DB_PASSWORD=s:3" in result.stdout and "versions describe" not in result.stdout


def test_prune_removes_only_what_the_repository_no_longer_has(tmp_path: Path) -> None:
    fake_bin = _fake_gcloud(tmp_path)
    operators = {"DYLEN_DASHBOARD_OPERATORS": "a@example.com,b@example.com"}
    assert _run(tmp_path, fake_bin, *BASE_ARGS, **operators).returncode == 0
    # Left over from older versions: an invoker, a scheduler job, a function of a removed folder; and
    # things that are not ours (no dylen- prefix, no label).
    state = _state(fake_bin)
    state["bindings"].append(
        ["run:process-job", "serviceAccount:old@dylen-prod.iam.gserviceaccount.com", "roles/run.invoker"]
    )
    state["present"] += [
        "schedule:dylen-old_job",
        "schedule:someone-elses",
        "function:old_function",
        "function:not_ours",
    ]
    state["labels"] |= {"old_function": "managed-by=dylen-deploy", "not_ours": None}
    _set_state(fake_bin, state)
    fewer = {"DYLEN_DASHBOARD_OPERATORS": "a@example.com"}

    (tmp_path / "calls").unlink()
    result = _run(tmp_path, fake_bin, *BASE_ARGS, **fewer)
    assert result.returncode == 0, result.stderr
    assert not [c for c in _calls(tmp_path) if "remove-invoker" in c or " delete " in c]

    dry = _run(tmp_path, fake_bin, "--dry-run", "--prune", *BASE_ARGS, **fewer)
    assert dry.returncode == 0, dry.stderr
    assert "gcloud scheduler jobs list" in dry.stdout and "gcloud functions list" in dry.stdout
    assert "gcloud run services get-iam-policy process-job" in dry.stdout

    (tmp_path / "calls").unlink()
    result = _run(tmp_path, fake_bin, "--prune", *BASE_ARGS, **fewer)
    assert result.returncode == 0, result.stderr
    removed = [c for c in _calls(tmp_path) if "remove-invoker" in c or " delete " in c]
    assert sorted(removed) == sorted(
        [
            f"functions remove-invoker-policy-binding process_job --region {REGION} --member serviceAccount:old@dylen-prod.iam.gserviceaccount.com --project {PROJECT}",
            f"functions remove-invoker-policy-binding dashboard --region {REGION} --member user:b@example.com --project {PROJECT}",
            f"scheduler jobs delete dylen-old_job --location {REGION} --quiet --project {PROJECT}",
            f"functions delete old_function --region {REGION} --quiet --project {PROJECT}",
        ]
    )
    present = _state(fake_bin)["present"]
    assert {"schedule:someone-elses", "function:not_ours", "schedule:dylen-rescue_jobs"} <= set(present)


def test_check_names_what_is_missing_and_changes_nothing(tmp_path: Path) -> None:
    fake_bin = _fake_gcloud(
        tmp_path, fail=[{"match": "^iam service-accounts describe dylen-cron", "error": "permission"}]
    )
    result = _run(tmp_path, fake_bin, "--check", *BASE_ARGS)
    assert result.returncode == 1, result.stderr
    assert f"MISSING  cannot tell whether service account {CRON_SA} exists: ERROR:" in result.stdout
    assert "PERMISSION_DENIED" in result.stdout
    assert "MISSING  API cloudtasks.googleapis.com is not enabled (a deploy enables it)" in result.stdout
    assert f"MISSING  service account {API_SA} (a deploy creates it)" in result.stdout
    assert f"MISSING  {WORKER_SA} lacks roles/cloudsql.instanceUser" in result.stdout
    assert "MISSING  queue dylen-jobs in europe-west1 (a deploy creates it)" in result.stdout
    assert "ok       instance dylen can serve" in result.stdout
    assert "ok       public access: all-users" in result.stdout
    assert _calls(tmp_path) and _changes(_calls(tmp_path)) == []

    # After a deployment nothing is missing.
    _respec(fake_bin, fail=[])
    assert _run(tmp_path, fake_bin, *BASE_ARGS).returncode == 0
    (tmp_path / "calls").unlink()
    result = _run(tmp_path, fake_bin, "--check", *BASE_ARGS)
    assert result.returncode == 0, result.stdout
    assert "MISSING" not in result.stdout and "== Nothing missing" in result.stdout
    assert _changes(_calls(tmp_path)) == []

    # Then someone turns the flag off and the settings drift: --check says so.
    instance = json.loads(json.dumps(READY_INSTANCE))
    instance["settings"]["databaseFlags"] = []
    _respec(fake_bin, instance=instance, org_policies={"iam.allowedPolicyMemberDomains": DOMAIN_RESTRICTED})
    result = _run(tmp_path, fake_bin, "--check", *BASE_ARGS, DYLEN_QUEUE_MAX_ATTEMPTS="9")
    assert result.returncode == 1
    assert "does not have cloudsql.iam_authentication=on" in result.stdout
    assert "MISSING  queue --max-attempts is 20, deploy.sh sets 9" in result.stdout
    assert "ok       public access: no-invoker-iam-check" in result.stdout


# --- deploy_checks: reading gcloud's JSON ------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "domains", "members", "invoker", "expected"),
    [
        ("auto", {}, {}, {}, "all-users"),
        ("auto", {"spec": {"rules": [{"allowAll": True}]}}, {}, {}, "all-users"),
        ("auto", DOMAIN_RESTRICTED, {}, {}, "no-invoker-iam-check"),
        ("auto", {"spec": {"rules": [{"denyAll": True}]}}, {}, {}, "no-invoker-iam-check"),
        ("auto", {}, {"spec": {"rules": [{"enforce": True}]}}, {}, "no-invoker-iam-check"),
        (
            "auto",
            {},
            {"spec": {"rules": [{"enforce": True, "parameters": {"allowedMemberSubjects": ["allUsers"]}}]}},
            {},
            "all-users",
        ),
        ("auto", None, {}, {}, "all-users"),  # unreadable: deploy.sh detects a refusal while deploying
        ("no-invoker-iam-check", {}, {}, {}, "no-invoker-iam-check"),
        ("all-users", {}, {}, {"spec": {"rules": [{"enforce": True}]}}, "all-users"),
    ],
)
def test_deploy_checks_reads_the_organisation_policies(
    requested: str, domains: Any, members: Any, invoker: Any, expected: str
) -> None:
    assert deploy_checks.public_access(requested, domains, members, invoker)[0] == expected


def test_deploy_checks_reads_instances_and_queues() -> None:
    assert deploy_checks.instance_problems(READY_INSTANCE, iam_auth=True, ip_type="public") == []
    stopped = {**READY_INSTANCE, "state": "SUSPENDED", "databaseVersion": "MYSQL_8_0"}
    problems = deploy_checks.instance_problems(stopped, iam_auth=False, ip_type="psc")
    assert [p.split(" is ")[-1].split(" does not")[0] for p in problems] == [
        "SUSPENDED, not RUNNABLE",
        "MYSQL_8_0, not PostgreSQL",
        "Cloud SQL instance dylen",
    ]
    queue = {
        "state": "PAUSED",
        "retryConfig": {"maxAttempts": 5, "minBackoff": "10s", "maxBackoff": "300.000s", "maxDoublings": 4},
        "rateLimits": {"maxDispatchesPerSecond": 10.0, "maxConcurrentDispatches": 20},
    }
    expected = {
        "max-attempts": "5",
        "min-backoff": "10s",
        "max-backoff": "300s",
        "max-doublings": "4",
        "max-dispatches-per-second": "10",
        "max-concurrent-dispatches": "20",
    }
    assert deploy_checks.queue_problems(queue, expected) == [
        "queue is PAUSED, not RUNNING: tasks wait (gcloud tasks queues resume)"
    ]
    assert deploy_checks.queue_problems({**queue, "state": "RUNNING"}, {**expected, "max-attempts": "7"}) == [
        "queue --max-attempts is 5, deploy.sh sets 7"
    ]


# --- the migration job's command, on the test PostgreSQL ---------------------------------------------


def test_the_migration_jobs_command_migrates_and_grants_as_cloud_sql_would_allow(
    tmp_path: Path, pg_admin_url: str
) -> None:
    """The staged job folder and its container command (Dockerfile ENTRYPOINT + the job's --args),
    run on the test PostgreSQL the way Cloud SQL sets it up: the database owned by a group role
    (cloudsqlsuperuser), the job's IAM user a member of it (`gcloud sql users assign-roles`), the
    functions' IAM users ordinary roles. PostgreSQL 15+ lets only the owner's members create in
    schema public: the job migrates, then lets the functions' users read and write."""
    project = f"p{uuid.uuid4().hex[:8]}"  # role names are server-wide: unique to this run
    fake_bin = _fake_gcloud(tmp_path)
    dry = _run(
        tmp_path,
        fake_bin,
        "--dry-run",
        "--project",
        project,
        "--region",
        REGION,
        "--sql-instance",
        f"{project}:{REGION}:dylen",
    )
    assert dry.returncode == 0, dry.stderr
    (job,) = _find(_plan(dry.stdout), "gcloud", "run", "jobs", "deploy")
    staged = subprocess.run(
        ["bash", str(ROOT / "deploy.sh"), "--stage-only", "--build-dir", str(tmp_path / "stage")],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert staged.returncode == 0, staged.stderr
    stage = tmp_path / "stage" / "dylen-migrate"
    entrypoint = next(
        json.loads(line.removeprefix("ENTRYPOINT "))
        for line in (stage / "Dockerfile").read_text().splitlines()
        if line.startswith("ENTRYPOINT ")
    )
    assert entrypoint[0] == "python"
    command = [sys.executable, *entrypoint[1:], *_flag(job, "--args").split(",")]
    migrator = _env_vars(job)["DYLEN_DB_USER"]
    runtime_users = command[command.index("--grant-to") + 1 :: 2]
    assert migrator == f"dylen-migrate@{project}.iam" and f"dylen-api@{project}.iam" in runtime_users

    owner, database, stranger = f"cloudsqlsuperuser_{project}", f"db_{project}", f"stranger@{project}.iam"
    admin_url = sa.engine.make_url(pg_admin_url).set(drivername="postgresql+pg8000")
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    roles = [owner, migrator, stranger, *runtime_users]
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{owner}" NOLOGIN'))
        conn.execute(sa.text(f'CREATE DATABASE "{database}" OWNER "{owner}"'))
        conn.execute(sa.text(f'CREATE ROLE "{migrator}" LOGIN IN ROLE "{owner}"'))
        for user in (stranger, *runtime_users):
            conn.execute(sa.text(f'CREATE ROLE "{user}" LOGIN'))
    db_url = admin_url.set(database=database)

    def job_as(user: str) -> subprocess.CompletedProcess[str]:
        url = db_url.set(username=user).render_as_string(hide_password=False).replace("+pg8000", "")
        env = {"PATH": os.environ["PATH"], "DYLEN_ENV_FILE": os.devnull, "DYLEN_DATABASE_URL": url}
        return subprocess.run(command, cwd=stage, env=env, capture_output=True, text=True, timeout=120)

    try:
        # Anyone else is refused by PostgreSQL itself, and the job says so and why.
        refused = job_as(stranger)
        assert refused.returncode == 1
        assert "permission denied for schema public" in refused.stderr
        assert "hint: the migrating user needs CREATE on schema public" in refused.stderr
        for _ in range(2):  # a deployment runs it every time: the second run changes nothing
            result = job_as(migrator)
            assert result.returncode == 0, result.stderr
            assert "migrated to head" in result.stdout
        for user in runtime_users:
            assert (
                f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{user}"'
                in result.stdout
            )
        api = sa.create_engine(db_url.set(username=runtime_users[0]), isolation_level="AUTOCOMMIT")
        with api.connect() as conn:
            conn.execute(sa.text("INSERT INTO users (id) VALUES ('u1')"))
            assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 0
            conn.execute(sa.text("CREATE TEMPORARY TABLE scratch (id int)"))  # the archiver's
            with pytest.raises(sa.exc.DBAPIError, match="permission denied"):
                conn.execute(sa.text("CREATE TABLE t (id int)"))  # the schema is the migrations' alone
            with pytest.raises(sa.exc.DBAPIError, match="permission denied"):
                conn.execute(sa.text("UPDATE alembic_version SET version_num = 'x'"))
        api.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            for role in reversed(roles):
                conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


def test_the_migration_job_waits_for_the_database_bounded_and_says_why(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "DYLEN_ENV_FILE": os.devnull,
        "DYLEN_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",  # nothing listens on port 9
    }
    result = subprocess.run(
        [sys.executable, "-m", "common.cli", "migrate", "--wait-for-database", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "database not reachable yet (attempt 1; a new identity's IAM roles take minutes" in result.stderr
    assert "error: the database did not let us in within 1s" in result.stderr
    assert "last error: ConnectionRefusedError" in result.stderr


# --- the staged functions run from their folder alone ------------------------------------------------


class StagedServer(FunctionServer):
    """A function started from its build folder alone: cwd = the folder, the repository not importable."""

    def __init__(self, stage: Path, env: dict[str, str], log_dir: Path) -> None:
        super().__init__(stage.name, env, log_dir)
        self.stage = stage

    def start(self, *, wait: bool = True) -> StagedServer:
        assert "PYTHONPATH" not in self.env
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "functions_framework",
                "--target",
                self.name,
                "--source",
                "main.py",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env={**self.env, "PYTHONUNBUFFERED": "1"},
            cwd=self.stage,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self


@pytest.fixture(scope="module")
def staged(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, logs_dir: Path
) -> Iterator[dict[str, StagedServer]]:
    build = tmp_path_factory.mktemp("build")
    result = subprocess.run(
        ["bash", str(ROOT / "deploy.sh"), "--stage-only", "--build-dir", str(build)],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    env = base_env(database_url, DYLEN_JOBS_AUTO_PROCESS="false")
    servers = {name: StagedServer(build / name, env, logs_dir).start(wait=False) for name in _functions(ROOT)}
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        stop_all(servers.values())


def test_staged_folders_hold_a_real_copy_of_common(staged: dict[str, StagedServer]) -> None:
    assert set(staged) == set(_functions(ROOT))
    for name, server in staged.items():
        stage = server.stage
        assert (stage / "main.py").read_bytes() == (ROOT / "functions" / name / "main.py").read_bytes()
        assert (stage / "requirements.txt").read_bytes() == (ROOT / "requirements.txt").read_bytes()
        assert "__pycache__/" in (stage / ".gcloudignore").read_text()
        common = stage / "common"
        assert common.is_dir() and not common.is_symlink()
        assert not any(p.is_symlink() for p in common.rglob("*"))
        assert (common / "platform" / "http.py").read_bytes() == (
            ROOT / "common" / "platform" / "http.py"
        ).read_bytes()


def test_staged_code_is_the_code_that_runs(staged: dict[str, StagedServer]) -> None:
    stage = staged["get_job"].stage
    result = subprocess.run(
        [sys.executable, "-c", "import common; print(common.__file__)"],
        cwd=stage,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(stage)


def test_every_staged_function_answers_from_its_folder_alone(staged: dict[str, StagedServer]) -> None:
    http = session()
    http.headers["Connection"] = "close"
    for name, server in staged.items():
        response = http.request("PATCH", server.url + "/", timeout=30)
        assert response.status_code == 405, (name, response.text, server.log()[-2000:])
        assert response.headers["Content-Type"] == "application/problem+json"


def test_staged_functions_reach_the_database(staged: dict[str, StagedServer]) -> None:
    http = session()
    http.headers["Connection"] = "close"
    user = {"X-Dylen-User": f"stage-{uuid.uuid4().hex[:8]}"}
    created = http.post(staged["create_job"].url + "/", json=lesson_body("Staged"), headers=user, timeout=30)
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]
    assert (
        http.get(f"{staged['get_job'].url}/{job_id}", headers=user, timeout=30).json()["status"] == "queued"
    )
    assert http.get(f"{staged['get_job'].url}/{uuid.uuid4()}", headers=user, timeout=30).status_code == 404
    assert http.post(staged["process_job"].url + "/", json={"job_id": job_id}, timeout=30).status_code == 401


def test_the_deployment_guide_covers_every_option_and_identity_and_stays_in_the_repository() -> None:
    guide = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    help_text = subprocess.run(
        ["bash", str(ROOT / "deploy.sh"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    options = set(re.findall(r"^  (--[a-z-]+)", help_text, flags=re.MULTILINE)) - {"--help"}
    assert len(options) > 15
    assert [o for o in sorted(options) if f"`{o}" not in guide] == []
    for account in (
        "dylen-api",
        "dylen-worker",
        "dylen-cron",
        "dylen-dashboard",
        "dylen-migrate",
        "dylen-build",
    ):
        assert f"| `{account}` |" in guide
    assert not re.search(r"\]\((https?:)?//", guide)  # no link out of the repository


# --- the connection budget ---------------------------------------------------------------------------

# The defaults of RUNTIME_SETTINGS: create_job 5x(2+2), process_job 5x(4+2), archive_lessons and
# rescue_jobs 1x(1+1), dashboard 2x(2+1), and get_job, get_lesson, list_lessons, cancel_job 3x(2+2).
DEFAULT_CONNECTIONS = 5 * 4 + 5 * 6 + 2 * (1 * 2) + 2 * 3 + 4 * (3 * 4)


@pytest.mark.parametrize(
    ("flags", "tier", "limit", "origin"),
    [
        ([{"name": "max_connections", "value": "150"}], "db-custom-1-3840", 150, "Cloud SQL instance dylen"),
        ([], "db-custom-1-3840", 100, "tier db-custom-1-3840's default"),
        ([], "db-custom-2-7680", 400, "tier db-custom-2-7680's default"),
        ([], "db-f1-micro", 25, "tier db-f1-micro's default"),
        ([], "db-perf-optimized-N-8", None, "tier db-perf-optimized-N-8's default"),
    ],
)
def test_the_instances_max_connections_is_its_flag_else_its_tiers_default(
    flags: list[dict[str, str]], tier: str, limit: int | None, origin: str
) -> None:
    instance = {"name": "dylen", "settings": {"tier": tier, "databaseFlags": flags}}
    found, said = deploy_checks.connection_limit(instance)
    assert found == limit and origin in said


def test_a_real_run_refuses_more_connections_than_the_instance_allows_before_changing_anything(
    tmp_path: Path,
) -> None:
    # Given an instance of 100 connections (the defaults need 108 plus a reserve of 10)
    instance = json.loads(json.dumps(READY_INSTANCE))
    instance["settings"]["databaseFlags"][0]["value"] = "100"
    fake_bin = _fake_gcloud(tmp_path, instance=instance)
    result = _run(tmp_path, fake_bin, *BASE_ARGS)
    # Then the deploy stops in its preflight, naming the numbers to change, and nothing was created
    assert result.returncode != 0
    assert f"may open {DEFAULT_CONNECTIONS} database connections" in result.stderr, result.stderr
    assert "max_connections 100 minus DYLEN_DB_RESERVED_CONNECTIONS 10" in result.stderr
    assert "create_job 5x(2+2)" in result.stderr and "RUNTIME_SETTINGS" in result.stderr
    assert not [c for c in _calls(tmp_path) if not READ_ONLY.match(c) and not c.startswith("services enable")]


def test_a_dry_run_checks_the_budget_against_dylen_db_max_connections(tmp_path: Path) -> None:
    fake_bin = _fake_gcloud(tmp_path)
    fits = _run(
        tmp_path, fake_bin, "--dry-run", *BASE_ARGS, DYLEN_DB_MAX_CONNECTIONS=str(DEFAULT_CONNECTIONS + 10)
    )
    assert fits.returncode == 0, fits.stderr
    assert f"at most {DEFAULT_CONNECTIONS} of the {DEFAULT_CONNECTIONS}" in fits.stdout
    over = _run(
        tmp_path,
        fake_bin,
        "--dry-run",
        *BASE_ARGS,
        DYLEN_DB_MAX_CONNECTIONS=str(DEFAULT_CONNECTIONS + 10),
        DYLEN_DB_RESERVED_CONNECTIONS="11",
    )
    assert over.returncode != 0
    assert f"more than the {DEFAULT_CONNECTIONS - 1} that DYLEN_DB_MAX_CONNECTIONS allows" in over.stderr
    unchecked = _run(tmp_path, fake_bin, "--dry-run", *BASE_ARGS)
    assert unchecked.returncode == 0 and f"at most {DEFAULT_CONNECTIONS} connections" in unchecked.stdout

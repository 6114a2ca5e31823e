"""deploy.sh: its dry run names every resource it would create, and its staged folders run on their own.

Nothing here reaches Google: the dry run must run no command at all (a recording `gcloud` on PATH
proves it), and the staged functions run under functions-framework on loopback against the test
database, from their build folder alone, as Cloud Build would package them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.jobs.settings import job_settings
from common.platform.config import load_settings
from tests.support import ROOT, FunctionServer, base_env, lesson_body, session, stop_all

PROJECT, REGION = "dylen-prod", "europe-west1"
INSTANCE = f"{PROJECT}:{REGION}:dylen"
RUNTIME_SA = f"dylen-runtime@{PROJECT}.iam.gserviceaccount.com"
INVOKER_SA = f"dylen-tasks@{PROJECT}.iam.gserviceaccount.com"
SCHEDULER_SA = f"dylen-scheduler@{PROJECT}.iam.gserviceaccount.com"
BASE_URL = f"https://{REGION}-{PROJECT}.cloudfunctions.net"
TASK_CALLED = {"process_job": INVOKER_SA, "archive_lessons": SCHEDULER_SA, "rescue_jobs": SCHEDULER_SA}
OPERATORS = ("ops@example.com", "oncall@example.com")  # the dashboard's invokers (IAM) and allow list


def _functions(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "functions").iterdir() if (p / "main.py").is_file())


def test_deploy_sh_is_valid_bash_and_shellcheck_clean_where_available() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "deploy.sh")], check=True)
    first = (ROOT / "deploy.sh").read_text().splitlines()[:10]
    assert first[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in first
    if shutil.which("shellcheck"):  # a developer tool, not a test dependency; CI may lack it
        result = subprocess.run(["shellcheck", str(ROOT / "deploy.sh")], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """deploy.sh --dry-run on a copy of the repository that also has the scheduler-called functions
    (other branches add them; the script must deploy whatever folders exist)."""
    tree = tmp_path_factory.mktemp("repo")
    for name in ("deploy.sh", "requirements.txt"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "common", tree / "common", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "functions", tree / "functions", ignore=shutil.ignore_patterns("__pycache__"))
    for extra in ("archive_lessons", "rescue_jobs"):
        (tree / "functions" / extra).mkdir(exist_ok=True)
        (tree / "functions" / extra / "main.py").touch()
    fake_bin = tmp_path_factory.mktemp("bin")
    calls = fake_bin / "calls"
    (fake_bin / "gcloud").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    (fake_bin / "gcloud").chmod(0o755)
    env = {
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "DYLEN_GCP_PROJECT": PROJECT,  # from the environment ...
        "DYLEN_JOB_MAX_ATTEMPTS": "7",
        "DYLEN_JOB_TIMEOUT_SECONDS": "900",
        "DYLEN_TIER_HISTORY_LIMITS": "free=3,pro=80",
        "DYLEN_DASHBOARD_OPERATORS": ", ".join(OPERATORS),
    }
    result = subprocess.run(
        # ... and from flags
        ["bash", "deploy.sh", "--dry-run", "--region", REGION, "--sql-instance", INSTANCE],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    return {"tree": tree, "commands": commands, "calls": calls, "stdout": result.stdout}


def _find(commands: list[list[str]], *prefix: str) -> list[list[str]]:
    return [c for c in commands if c[: len(prefix)] == list(prefix)]


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_dry_run_runs_nothing(dry_run: dict[str, Any]) -> None:
    assert not dry_run["calls"].exists(), "the dry run called gcloud"
    assert not (dry_run["tree"] / "build").exists(), "the dry run staged files"
    assert dry_run["commands"], dry_run["stdout"]


def test_dry_run_deploys_every_function_folder(dry_run: dict[str, Any]) -> None:
    commands = dry_run["commands"]
    names = _functions(dry_run["tree"])
    assert {"archive_lessons", "rescue_jobs", "process_job", "create_job"} <= set(names)
    for name in names:
        (deploy,) = _find(commands, "gcloud", "functions", "deploy", name)
        for flag in ("--gen2", "--trigger-http"):
            assert flag in deploy
        assert _flag(deploy, "--runtime") == "python312"
        assert _flag(deploy, "--entry-point") == name
        assert _flag(deploy, "--source") == f"build/{name}"
        assert _flag(deploy, "--service-account") == RUNTIME_SA
        assert _flag(deploy, "--region") == REGION and _flag(deploy, "--project") == PROJECT
        if name in TASK_CALLED or name == "dashboard":
            assert "--no-allow-unauthenticated" in deploy and "--allow-unauthenticated" not in deploy
        else:
            assert "--allow-unauthenticated" in deploy and "--no-allow-unauthenticated" not in deploy
        # Staged first: main.py, a copy of common/, requirements, .gcloudignore.
        assert ["cp", "-R", f"{dry_run['tree']}/common", f"build/{name}/common"] in commands
        assert ["cp", f"{dry_run['tree']}/functions/{name}/main.py", f"build/{name}/main.py"] in commands
        assert ["cp", f"{dry_run['tree']}/requirements.txt", f"build/{name}/requirements.txt"] in commands
        assert f"+ write build/{name}/.gcloudignore" in dry_run["stdout"]
    (process,) = _find(commands, "gcloud", "functions", "deploy", "process_job")
    assert _flag(process, "--timeout") == "900s"  # the request outlives no dispatch deadline


def _env_vars(command: list[str]) -> dict[str, str]:
    raw = _flag(command, "--set-env-vars")
    assert raw.startswith("^|^")
    return dict(pair.split("=", 1) for pair in raw[3:].split("|"))


def test_dry_run_env_vars_are_a_valid_production_configuration(dry_run: dict[str, Any]) -> None:
    (deploy,) = _find(dry_run["commands"], "gcloud", "functions", "deploy", "create_job")
    env = _env_vars(deploy)
    assert env["DYLEN_TASK_SERVICE_PROVIDER"] == "gcp"
    assert env["DYLEN_CLOUD_TASKS_QUEUE_PATH"] == f"projects/{PROJECT}/locations/{REGION}/queues/dylen-jobs"
    assert env["DYLEN_PROCESS_JOB_URL"] == f"{BASE_URL}/process_job"
    assert env["DYLEN_TASKS_INVOKER_SA"] == INVOKER_SA
    assert env["DYLEN_TASKS_ALLOWED_SA"] == f"{INVOKER_SA},{SCHEDULER_SA}"
    assert env["DYLEN_TIER_HISTORY_LIMITS"] == "free=3,pro=80"  # commas survive the ^|^ delimiter
    # The same guards that run at cold start accept what deploy.sh sets.
    settings = load_settings({**env, "DYLEN_ENV_FILE": os.devnull})
    jobs = job_settings.load({**env, "DYLEN_ENV_FILE": os.devnull})
    assert jobs.max_attempts == 7 and jobs.timeout_seconds == 900
    assert settings.cloud_sql_instance == INSTANCE and settings.db_iam_auth
    assert settings.db_user == f"dylen-runtime@{PROJECT}.iam"
    assert settings.auth_mode == "firebase" and settings.firebase_project_id == PROJECT


def test_dry_run_creates_the_queue_with_retry_config_and_rate_limits(dry_run: dict[str, Any]) -> None:
    commands = dry_run["commands"]
    assert _find(commands, "gcloud", "tasks", "queues", "describe", "dylen-jobs")  # create-or-update
    (create,) = _find(commands, "gcloud", "tasks", "queues", "create", "dylen-jobs")
    assert _flag(create, "--location") == REGION
    assert _flag(create, "--max-attempts") == "7"
    assert _flag(create, "--min-backoff") == "10s" and _flag(create, "--max-backoff") == "300s"
    assert _flag(create, "--max-doublings") == "4"
    assert _flag(create, "--max-dispatches-per-second") == "10"
    assert _flag(create, "--max-concurrent-dispatches") == "20"


def test_dry_run_creates_service_accounts_and_iam_bindings(dry_run: dict[str, Any]) -> None:
    commands = dry_run["commands"]
    for sa in ("dylen-runtime", "dylen-tasks", "dylen-scheduler"):
        assert _find(
            commands,
            "gcloud",
            "iam",
            "service-accounts",
            "describe",
            f"{sa}@{PROJECT}.iam.gserviceaccount.com",
        )
        assert _find(commands, "gcloud", "iam", "service-accounts", "create", sa)
    project_roles = {
        _flag(c, "--role")
        for c in _find(commands, "gcloud", "projects", "add-iam-policy-binding", PROJECT)
        if _flag(c, "--member") == f"serviceAccount:{RUNTIME_SA}"
    }
    assert {
        "roles/cloudtasks.enqueuer",
        "roles/cloudsql.client",
        "roles/cloudsql.instanceUser",
    } <= project_roles
    (act_as,) = _find(commands, "gcloud", "iam", "service-accounts", "add-iam-policy-binding", INVOKER_SA)
    assert _flag(act_as, "--member") == f"serviceAccount:{RUNTIME_SA}"
    assert _flag(act_as, "--role") == "roles/iam.serviceAccountUser"
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
    (sql_user,) = _find(commands, "gcloud", "sql", "users", "create", f"dylen-runtime@{PROJECT}.iam")
    assert _flag(sql_user, "--type") == "cloud_iam_service_account"


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


def test_dry_run_runs_the_migrations_with_the_cloud_sql_settings(dry_run: dict[str, Any]) -> None:
    (migrate,) = [
        c for c in dry_run["commands"] if c[0] == "env" and c[-3:] == ["-m", "common.cli", "migrate"]
    ]
    env = dict(arg.split("=", 1) for arg in migrate[1:-3] if "=" in arg)
    assert env["DYLEN_CLOUD_SQL_INSTANCE"] == INSTANCE
    assert env["DYLEN_DB_IAM_AUTH"] == "true" and env["DYLEN_DB_USER"] == f"dylen-runtime@{PROJECT}.iam"


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
    ],
)
def test_missing_or_bad_settings_fail_clearly(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    # A gcloud with nothing configured, so the developer's own `gcloud config` cannot fill the gaps.
    fake_bin = _fake_gcloud(tmp_path, config={})
    result = subprocess.run(
        ["bash", str(ROOT / "deploy.sh"), "--dry-run", *args],
        env={"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


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


@pytest.mark.parametrize("existing", [False, True])
def test_a_real_run_creates_what_is_missing_and_updates_what_exists(tmp_path: Path, existing: bool) -> None:
    """Run for real against a recording stand-in `gcloud` (Google cannot be reached here) whose
    `describe` answers "absent" on a first deployment and "present" on the second."""
    calls = tmp_path / "calls"
    fake_bin = _fake_gcloud(tmp_path, existing=existing)
    build = tmp_path / "build"
    result = subprocess.run(
        [
            "bash",
            str(ROOT / "deploy.sh"),
            "--project",
            PROJECT,
            "--region",
            REGION,
            "--sql-instance",
            INSTANCE,
            "--build-dir",
            str(build),
            "--skip-migrations",
        ],
        env={"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    ran = calls.read_text().splitlines()
    creates = [c for c in ran if " create " in f" {c} "]
    updates = [c for c in ran if " update " in f" {c} "]
    if existing:
        assert creates == []
        assert any(c.startswith("tasks queues update dylen-jobs") for c in updates)
    else:
        assert updates == []
        assert any(c.startswith("tasks queues create dylen-jobs") for c in creates)
        assert sum(c.startswith("iam service-accounts create") for c in creates) == 3
    deployed = sorted(c.split()[2] for c in ran if c.startswith("functions deploy "))
    assert deployed == _functions(ROOT)
    assert any(c.startswith("sql instances describe dylen --project dylen-prod") for c in ran)
    assert (f"sql databases create dylen --instance dylen --project {PROJECT}" in ran) is not existing
    assert sorted(p.name for p in build.iterdir()) == _functions(ROOT)  # staged for real this time


@pytest.mark.parametrize(
    ("name", "threads", "pool", "overflow", "concurrency", "max_instances"),
    [
        ("create_job", "2", "2", "2", "8", "5"),
        ("get_job", "2", "2", "2", "8", "3"),
        ("process_job", "4", "4", "2", "4", "5"),
        ("rescue_jobs", "1", "1", "1", "1", "1"),
    ],
)
def test_dry_run_applies_the_readmes_instance_settings(
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


def _fake_gcloud(
    tmp_path: Path,
    *,
    existing: bool = False,
    iam_flag: str = "on",
    config: dict[str, str] | None = None,
) -> Path:
    """A recording stand-in for gcloud (Google cannot be reached here), appending each call to
    tmp_path/calls: `describe` answers "absent" or "present" (`existing`), except the Cloud SQL
    instance, which deploy.sh never creates and which reports `cloudsql.iam_authentication` as
    `iam_flag`; `config get-value KEY` prints `config[KEY]` (nothing when unset, as gcloud does)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    config = {} if config is None else config
    lines = ["#!/bin/sh", f'echo "$*" >> {tmp_path / "calls"}']
    lines.append('if [ "$1 $2" = "config get-value" ]; then')
    lines.append('  case "$3" in')
    for key, value in config.items():
        lines.append(f"    {shlex.quote(key)}) echo {shlex.quote(value)} ;;")
    lines.append("    *) echo '(unset)' >&2 ;;")
    lines.append("  esac")
    lines.append("  exit 0")
    lines.append("fi")
    lines.append('if [ "$1 $2 $3" = "sql instances describe" ]; then')
    lines.append(
        f"  printf 'max_connections\\t150\\ncloudsql.iam_authentication\\t%s\\n' {shlex.quote(iam_flag)}"
    )
    lines.append("  exit 0")
    lines.append("fi")
    lines.append('for arg in "$@"; do [ "$arg" = describe ] && exit ' + ("0" if existing else "1") + "; done")
    lines.append("exit 0")
    (fake_bin / "gcloud").write_text("\n".join(lines) + "\n")
    (fake_bin / "gcloud").chmod(0o755)
    return fake_bin


def _deploy(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "deploy.sh"), "--build-dir", str(tmp_path / "build"), *args],
        env={"HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dry_run_creates_the_database_and_grants_schema_rights(dry_run: dict[str, Any]) -> None:
    commands = dry_run["commands"]
    assert _find(commands, "gcloud", "sql", "databases", "describe", "dylen", "--instance", "dylen")
    (create,) = _find(commands, "gcloud", "sql", "databases", "create", "dylen")
    assert _flag(create, "--instance") == "dylen" and _flag(create, "--project") == PROJECT
    (flags,) = _find(commands, "gcloud", "sql", "instances", "describe", "dylen")
    assert "settings.databaseFlags" in _flag(flags, "--flatten")
    (grant,) = [c for c in commands if c[0] == "env" and c[-3:-1] == ["-m", "devtools.grant_schema"]]
    assert grant[-1] == f"dylen-runtime@{PROJECT}.iam"
    assert f"DYLEN_CLOUD_SQL_INSTANCE={INSTANCE}" in grant
    # The database exists (and the IAM user has rights) before anything migrates.
    order = [" ".join(c[:4]) for c in commands]
    assert order.index("gcloud sql databases create") < order.index("gcloud sql users create")
    assert commands.index(grant) < next(i for i, c in enumerate(commands) if c[-1] == "migrate")
    (enable,) = _find(commands, "gcloud", "services", "enable")
    assert "secretmanager.googleapis.com" not in enable  # IAM database auth: no secret to read


def test_password_mode_enables_secret_manager_and_never_prints_the_admin_password(tmp_path: Path) -> None:
    fake_bin = _fake_gcloud(tmp_path)
    result = _deploy(
        tmp_path,
        "--dry-run",
        "--project",
        PROJECT,
        "--region",
        REGION,
        "--sql-instance",
        INSTANCE,
        "--db-password-secret",
        "dylen-db-password",
        PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        DYLEN_DB_ADMIN_PASSWORD="admin-s3cret",
    )
    assert result.returncode == 0, result.stderr
    assert "admin-s3cret" not in result.stdout + result.stderr
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    (enable,) = _find(commands, "gcloud", "services", "enable")
    assert "secretmanager.googleapis.com" in enable
    assert not _find(commands, "gcloud", "sql", "instances", "describe")  # no IAM auth, no flag needed
    (grant,) = [c for c in commands if c[0] == "env" and c[-3:-1] == ["-m", "devtools.grant_schema"]]
    assert grant[-1] == "dylen"
    assert not (tmp_path / "calls").exists(), "the dry run called gcloud"


def test_project_and_region_default_to_gclouds_configuration(tmp_path: Path) -> None:
    fake_bin = _fake_gcloud(tmp_path, config={"project": "cfg-project", "functions/region": "asia-east1"})
    result = _deploy(
        tmp_path,
        "--dry-run",
        "--sql-instance",
        "cfg-project:asia-east1:dylen",
        PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
    )
    assert result.returncode == 0, result.stderr
    assert "(project cfg-project: from gcloud config)" in result.stdout
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    (deploy,) = _find(commands, "gcloud", "functions", "deploy", "create_job")
    assert _flag(deploy, "--project") == "cfg-project" and _flag(deploy, "--region") == "asia-east1"
    # Reading gcloud's local configuration is all the dry run did.
    assert (tmp_path / "calls").read_text().splitlines() == [
        "config get-value project",
        "config get-value functions/region",
    ]
    # A flag or variable still wins over gcloud's configuration, which is then not read at all.
    (tmp_path / "calls").unlink()
    result = _deploy(
        tmp_path,
        "--dry-run",
        "--project",
        PROJECT,
        "--sql-instance",
        INSTANCE,
        PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        DYLEN_GCP_REGION=REGION,
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "calls").exists()


def test_a_real_run_stops_when_the_instance_lacks_iam_authentication(tmp_path: Path) -> None:
    fake_bin = _fake_gcloud(tmp_path, existing=True, iam_flag="off")
    result = _deploy(
        tmp_path,
        "--project",
        PROJECT,
        "--region",
        REGION,
        "--sql-instance",
        INSTANCE,
        "--skip-migrations",
        PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
    )
    assert result.returncode == 2
    assert "does not have cloudsql.iam_authentication=on" in result.stderr, result.stderr
    ran = (tmp_path / "calls").read_text().splitlines()
    assert not [
        c for c in ran if c.startswith(("functions deploy", "sql databases create", "sql users create"))
    ]


def test_grant_schema_lets_an_ordinary_user_migrate(pg_admin_url: str) -> None:
    """The grant deploy.sh runs as the built-in postgres user, on a real server: without it an
    ordinary user (as Cloud SQL IAM users are) cannot create a table in public on PostgreSQL 15+."""
    import sqlalchemy as sa

    name = f"grant_{uuid.uuid4().hex[:8]}"
    role = f"{name}@proj.iam"  # Cloud SQL IAM user names need quoting
    admin_url = sa.engine.make_url(pg_admin_url).set(drivername="postgresql+pg8000")
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
    db_url = admin_url.set(database=name)
    try:
        with sa.create_engine(db_url, isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(sa.text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))  # PostgreSQL 15's default
        user_engine = sa.create_engine(db_url.set(username=role), isolation_level="AUTOCOMMIT")
        with user_engine.connect() as conn, pytest.raises(sa.exc.DBAPIError, match="permission denied"):
            conn.execute(sa.text("CREATE TABLE t (id int)"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("DYLEN_")}
        env["DYLEN_DATABASE_URL"] = db_url.render_as_string(hide_password=False).replace("+pg8000", "")
        for _ in range(2):  # running it again is harmless
            result = subprocess.run(
                [sys.executable, "-m", "devtools.grant_schema", role],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
        assert f'GRANT USAGE, CREATE ON SCHEMA public TO "{role}"' in result.stdout
        with user_engine.connect() as conn:
            conn.execute(sa.text("CREATE TABLE t (id int)"))
        user_engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


def _fake_instance_gcloud(tmp_path: Path, *, flags: dict[str, str], tier: str) -> Path:
    """A recording stand-in gcloud whose Cloud SQL instance has these database flags and tier
    (IAM authentication on); every other describe answers "absent"."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    flag_lines = "".join(
        f"{name}\\t{value}\\n" for name, value in {**flags, "cloudsql.iam_authentication": "on"}.items()
    )
    (fake_bin / "gcloud").write_text(
        "\n".join(
            [
                "#!/bin/sh",
                f'echo "$*" >> {tmp_path / "calls"}',
                'if [ "$1 $2 $3" = "sql instances describe" ]; then',
                '  case "$*" in',
                f"    *settings.tier*) echo {shlex.quote(tier)} ;;",
                f"    *) printf {shlex.quote(flag_lines)} ;;",
                "  esac",
                "  exit 0",
                "fi",
                'for arg in "$@"; do [ "$arg" = describe ] && exit 1; done',
                "exit 0",
                "",
            ]
        )
    )
    (fake_bin / "gcloud").chmod(0o755)
    return fake_bin


# The defaults: create_job 5x(2+2), process_job 5x(4+2), archive_lessons and rescue_jobs 1x(1+1),
# dashboard 2x(2+1), and get_job, get_lesson, list_lessons, cancel_job 3x(2+2) each.
DEFAULT_CONNECTIONS = 5 * 4 + 5 * 6 + 2 * (1 * 2) + 2 * 3 + 4 * (3 * 4)


@pytest.mark.parametrize(
    ("flags", "tier", "refused", "allows"),
    [
        ({"max_connections": "150"}, "db-custom-2-7680", False, "Cloud SQL instance dylen allows"),
        ({"max_connections": "100"}, "db-custom-8-30720", True, "max_connections 100 minus"),
        ({}, "db-custom-1-3840", True, "tier db-custom-1-3840's default"),  # 100 by default
        ({}, "db-custom-2-7680", False, "tier db-custom-2-7680's default"),  # 400 by default
    ],
)
def test_a_real_run_refuses_more_connections_than_the_instance_allows(
    tmp_path: Path, flags: dict[str, str], tier: str, refused: bool, allows: str
) -> None:
    fake_bin = _fake_instance_gcloud(tmp_path, flags=flags, tier=tier)
    result = _deploy(
        tmp_path,
        "--project",
        PROJECT,
        "--region",
        REGION,
        "--sql-instance",
        INSTANCE,
        "--skip-migrations",
        PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
    )
    ran = (tmp_path / "calls").read_text().splitlines()
    deployed = [c for c in ran if c.startswith("functions deploy")]
    if refused:
        assert result.returncode == 2, result.stdout
        assert f"may open {DEFAULT_CONNECTIONS} database connections" in result.stderr, result.stderr
        assert allows in result.stderr and "RUNTIME_SETTINGS" in result.stderr
        assert "create_job 5x(2+2)" in result.stderr and "process_job 5x(4+2)" in result.stderr
        assert deployed == [], "nothing is deployed past a refused budget"
    else:
        assert result.returncode == 0, result.stderr
        assert f"at most {DEFAULT_CONNECTIONS} of the" in result.stdout and allows in result.stdout
        assert len(deployed) == len(_functions(ROOT))


def test_the_budget_counts_what_runtime_settings_say_and_the_reserve(tmp_path: Path) -> None:
    """A dry run reads no instance: DYLEN_DB_MAX_CONNECTIONS is what it checks against."""
    fake_bin = _fake_gcloud(tmp_path)
    common_args = ["--dry-run", "--project", PROJECT, "--region", REGION, "--sql-instance", INSTANCE]
    path = f"{fake_bin}{os.pathsep}{os.environ['PATH']}"
    fits = _deploy(tmp_path, *common_args, PATH=path, DYLEN_DB_MAX_CONNECTIONS=str(DEFAULT_CONNECTIONS + 10))
    assert fits.returncode == 0, fits.stderr
    over = _deploy(
        tmp_path,
        *common_args,
        PATH=path,
        DYLEN_DB_MAX_CONNECTIONS=str(DEFAULT_CONNECTIONS + 10),
        DYLEN_DB_RESERVED_CONNECTIONS="11",
    )
    assert over.returncode == 2
    assert f"more than the {DEFAULT_CONNECTIONS - 1} that DYLEN_DB_MAX_CONNECTIONS allows" in over.stderr
    unchecked = _deploy(tmp_path, *common_args, PATH=path)
    assert unchecked.returncode == 0 and f"at most {DEFAULT_CONNECTIONS} connections" in unchecked.stdout
    assert not (tmp_path / "calls").exists(), "the dry run called gcloud"

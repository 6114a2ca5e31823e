"""Configuration: read once from the environment (plus an optional `.env`) into a frozen object.

A wrong value raises ConfigError naming the variable, so a misconfigured instance fails at cold start
instead of on its first request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from common.platform.env import Reader, environment, reset_sections
from common.platform.errors import ConfigError

PROVIDERS = ("local-http", "gcp")
AUTH_MODES = ("firebase", "dev")
# How the Cloud SQL connector reaches the instance: its public IP, its private IP (needs VPC egress:
# deploy.sh's --vpc-connector), or Private Service Connect.
DB_IP_TYPES = ("public", "private", "psc")
FIREBASE_CERTS_URL = (
    "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com"
)
GOOGLE_OIDC_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"


def parse_operators(raw: str, name: str = "DYLEN_DASHBOARD_OPERATORS") -> tuple[str, ...]:
    """Comma-separated e-mails, compared case-insensitively (Google spells an address as typed)."""
    emails = []
    for part in raw.split(","):
        email = part.strip()
        if not email:
            continue
        local, at, domain = email.partition("@")
        if not (
            at and local and "." in domain and "@" not in domain and email.isprintable() and " " not in email
        ):
            raise ConfigError(f"{name}: expected comma-separated e-mail addresses, got {email!r}")
        emails.append(email.lower())
    return tuple(dict.fromkeys(emails))


# libpq's sslmode values, accepted in DYLEN_DATABASE_URL (common.platform.db maps them to pg8000).
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class DatabaseTarget:
    """Where DYLEN_DATABASE_URL points."""

    host: str | None
    port: int
    database: str | None
    user: str | None
    password: str | None = field(repr=False)
    sslmode: str | None
    unix_sock: str | None = None


def parse_database_url(url: str) -> DatabaseTarget:
    """A postgresql:// URL (the `+pg8000` driver suffix is accepted) with libpq's `sslmode`, or
    pg8000's `unix_sock` for a Unix socket (`postgresql://user@/db?unix_sock=/cloudsql/.../.s.PGSQL.5432`).
    The one check of that variable: load_settings runs it at cold start, the pool reads its result."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgresql+pg8000"):
        raise ConfigError(
            f"DYLEN_DATABASE_URL must be a postgresql:// URL, got one starting {parts.scheme!r}"
        )
    query = parse_qs(parts.query)
    modes = query.get("sslmode")
    mode = modes[-1] if modes else None
    if mode is not None and mode not in SSL_MODES:
        raise ConfigError(f"DYLEN_DATABASE_URL: sslmode must be one of {', '.join(SSL_MODES)}, got {mode!r}")
    try:
        port = parts.port or 5432
    except ValueError:
        raise ConfigError("DYLEN_DATABASE_URL has a port that is not a number from 0 to 65535") from None
    return DatabaseTarget(
        host=parts.hostname,
        port=port,
        database=unquote(parts.path.lstrip("/")) or None,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        sslmode=mode,
        unix_sock=query["unix_sock"][-1] if "unix_sock" in query else None,
    )


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    cloud_sql_instance: str | None
    db_user: str | None
    db_name: str | None
    db_password: str | None = field(repr=False)
    db_iam_auth: bool
    db_pool_size: int
    db_max_overflow: int
    db_connect_timeout_seconds: float
    db_read_timeout_seconds: float
    task_provider: str
    base_url: str
    process_job_url: str
    cloud_tasks_queue_path: str | None
    cloud_tasks_emulator_host: str | None
    tasks_invoker_sa: str | None
    tasks_oidc_audience: str | None
    tasks_allowed_sas: tuple[str, ...]
    firebase_certs_url: str
    google_oidc_certs_url: str
    task_secret: str | None = field(repr=False)
    auth_mode: str
    firebase_project_id: str | None
    firebase_auth_emulator_host: str | None
    dashboard_operators: tuple[str, ...] = ()
    dashboard_audiences: tuple[str, ...] = ()
    db_ip_type: str = "public"

    @property
    def uses_cloud_sql(self) -> bool:
        return self.cloud_sql_instance is not None

    @property
    def oidc_audience(self) -> str:
        """The audience of the Cloud Tasks OIDC tokens we mint (dispatch_gcp) for process_job."""
        return self.tasks_oidc_audience or self.process_job_url

    def task_audience(self, function: str) -> str:
        """The OIDC audience every task function checks: the one rule for all of them.

        process_job is called by Cloud Tasks with tokens we mint for `oidc_audience`
        (DYLEN_TASKS_OIDC_AUDIENCE overrides it). The scheduled functions are called by Cloud
        Scheduler, whose tokens deploy.sh mints for the function's own URL, `{base_url}/<name>`;
        DYLEN_TASKS_OIDC_AUDIENCE is not theirs, so it does not apply to them.
        """
        if function == "process_job":
            return self.oidc_audience
        return f"{self.base_url}/{function}"


def load_settings(
    env: Mapping[str, str] | None = None, *, dotenv: Path | None = None, serving: bool = True
) -> Settings:
    """Build Settings from `env` (default: os.environ) with `.env` filling unset variables.

    `serving=False` (operator tools: migrate, jobs, users) skips the checks of who may call the
    functions (user and task auth), which those tools never use."""
    r = Reader(environment(env, dotenv=dotenv))

    base_url = r.url("DYLEN_BASE_URL", "http://localhost:8080")
    assert base_url is not None
    process_job_url = r.url("DYLEN_PROCESS_JOB_URL", f"{base_url}/process_job")
    assert process_job_url is not None

    settings = Settings(
        database_url=r.text("DYLEN_DATABASE_URL"),
        cloud_sql_instance=r.text("DYLEN_CLOUD_SQL_INSTANCE"),
        db_user=r.text("DYLEN_DB_USER"),
        db_name=r.text("DYLEN_DB_NAME"),
        db_password=r.text("DYLEN_DB_PASSWORD"),
        db_iam_auth=r.boolean("DYLEN_DB_IAM_AUTH", False),
        db_ip_type=r.choice("DYLEN_DB_IP_TYPE", "public", DB_IP_TYPES),
        db_pool_size=r.integer("DYLEN_DB_POOL_SIZE", 5, minimum=1, maximum=100),
        db_max_overflow=r.integer("DYLEN_DB_MAX_OVERFLOW", 2, minimum=0, maximum=100),
        db_connect_timeout_seconds=r.number("DYLEN_DB_CONNECT_TIMEOUT_SECONDS", 5.0, minimum=0.1),
        db_read_timeout_seconds=r.number("DYLEN_DB_READ_TIMEOUT_SECONDS", 30.0, minimum=0.1),
        task_provider=r.choice("DYLEN_TASK_SERVICE_PROVIDER", "local-http", PROVIDERS),
        base_url=base_url,
        process_job_url=process_job_url,
        cloud_tasks_queue_path=r.text("DYLEN_CLOUD_TASKS_QUEUE_PATH"),
        cloud_tasks_emulator_host=r.text("CLOUD_TASKS_EMULATOR_HOST"),
        tasks_invoker_sa=r.text("DYLEN_TASKS_INVOKER_SA"),
        tasks_oidc_audience=r.text("DYLEN_TASKS_OIDC_AUDIENCE"),
        tasks_allowed_sas=tuple(
            sa.strip()
            for sa in (r.text("DYLEN_TASKS_ALLOWED_SA") or r.text("DYLEN_TASKS_INVOKER_SA") or "").split(",")
            if sa.strip()
        ),
        # Overridable for tests and emulators only; production uses Google's published keys.
        firebase_certs_url=r.url("DYLEN_FIREBASE_CERTS_URL", FIREBASE_CERTS_URL) or FIREBASE_CERTS_URL,
        google_oidc_certs_url=r.url("DYLEN_GOOGLE_OIDC_CERTS_URL", GOOGLE_OIDC_CERTS_URL)
        or GOOGLE_OIDC_CERTS_URL,
        task_secret=r.text("DYLEN_TASK_SECRET"),
        auth_mode=r.choice("DYLEN_AUTH_MODE", "firebase", AUTH_MODES),
        firebase_project_id=r.text("DYLEN_FIREBASE_PROJECT_ID"),
        # The Firebase Admin SDK's variable: accept the Auth emulator's unsigned tokens (local only).
        firebase_auth_emulator_host=r.text("FIREBASE_AUTH_EMULATOR_HOST"),
        dashboard_operators=parse_operators(r.text("DYLEN_DASHBOARD_OPERATORS") or ""),
        dashboard_audiences=tuple(
            a.strip()
            for a in (r.text("DYLEN_DASHBOARD_AUDIENCE") or f"{base_url}/dashboard").split(",")
            if a.strip()
        ),
    )
    _check_combinations(settings)
    if serving:
        _check_serving(settings)
    return settings


def _check_combinations(s: Settings) -> None:
    if s.cloud_sql_instance and s.cloud_sql_instance.count(":") != 2:
        raise ConfigError(
            f"DYLEN_CLOUD_SQL_INSTANCE must be project:region:instance, got {s.cloud_sql_instance!r}"
        )
    if s.cloud_sql_instance and s.database_url:
        raise ConfigError("Set DYLEN_DATABASE_URL or DYLEN_CLOUD_SQL_INSTANCE, not both")
    if s.database_url:
        parse_database_url(s.database_url)
    if s.db_iam_auth:
        # IAM database auth logs in as a named IAM principal; only the connector can mint its token.
        if not s.db_user:
            raise ConfigError(
                "DYLEN_DB_USER is required when DYLEN_DB_IAM_AUTH=true "
                "(the IAM database user, e.g. dylen-runtime@PROJECT.iam)"
            )
        if s.db_user.endswith(".gserviceaccount.com"):
            raise ConfigError(
                "DYLEN_DB_USER for IAM auth is the service account email without "
                f"'.gserviceaccount.com', got {s.db_user!r}"
            )
        if not s.cloud_sql_instance:
            raise ConfigError(
                "DYLEN_DB_IAM_AUTH=true needs DYLEN_CLOUD_SQL_INSTANCE (the Cloud SQL connector)"
            )
    if s.cloud_sql_instance:
        if not s.db_user:
            raise ConfigError("DYLEN_DB_USER is required with DYLEN_CLOUD_SQL_INSTANCE")
        if not s.db_name:
            raise ConfigError("DYLEN_DB_NAME is required with DYLEN_CLOUD_SQL_INSTANCE")
        if not s.db_iam_auth and not s.db_password:
            raise ConfigError(
                "DYLEN_DB_PASSWORD is required with DYLEN_CLOUD_SQL_INSTANCE unless DYLEN_DB_IAM_AUTH=true"
            )
    if s.task_provider == "gcp":
        if not s.cloud_tasks_queue_path:
            raise ConfigError(
                "DYLEN_CLOUD_TASKS_QUEUE_PATH is required when DYLEN_TASK_SERVICE_PROVIDER=gcp "
                "(projects/<p>/locations/<l>/queues/<q>)"
            )
        if not s.cloud_tasks_emulator_host and not s.process_job_url.startswith("https://"):
            raise ConfigError(
                "DYLEN_PROCESS_JOB_URL must be the deployed https:// process_job URL when "
                f"DYLEN_TASK_SERVICE_PROVIDER=gcp (Cloud Tasks sends OIDC only over https), "
                f"got {s.process_job_url!r}"
            )
        if not s.cloud_tasks_emulator_host and not s.tasks_invoker_sa:
            raise ConfigError(
                "DYLEN_TASKS_INVOKER_SA is required when DYLEN_TASK_SERVICE_PROVIDER=gcp targets real "
                "Cloud Tasks (process_job accepts only OIDC tokens of that service account)"
            )


def _check_serving(s: Settings) -> None:
    real_cloud_tasks = s.task_provider == "gcp" and not s.cloud_tasks_emulator_host
    if s.auth_mode == "dev" and real_cloud_tasks:
        raise ConfigError(
            "DYLEN_AUTH_MODE=dev is refused with real Cloud Tasks "
            "(DYLEN_TASK_SERVICE_PROVIDER=gcp without CLOUD_TASKS_EMULATOR_HOST)"
        )
    if s.firebase_auth_emulator_host and real_cloud_tasks:
        raise ConfigError(
            "FIREBASE_AUTH_EMULATOR_HOST is refused with real Cloud Tasks: the emulator's tokens are "
            "unsigned (DYLEN_TASK_SERVICE_PROVIDER=gcp without CLOUD_TASKS_EMULATOR_HOST)"
        )
    if s.auth_mode == "firebase" and not s.firebase_project_id:
        raise ConfigError("DYLEN_FIREBASE_PROJECT_ID is required when DYLEN_AUTH_MODE=firebase")


_serving = True


def for_tools() -> None:
    """Operator tools call this before anything reads the settings: they need no auth settings."""
    global _serving
    _serving = False
    reset_settings()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, loaded on first use."""
    return load_settings(serving=_serving)


def reset_settings() -> None:
    """Forget the cached settings (tests that change the environment in-process)."""
    get_settings.cache_clear()
    reset_sections()

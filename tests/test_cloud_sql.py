"""The engine's Cloud SQL path, through a stand-in for google.cloud.sql.connector.Connector.

The real connector needs Google's Cloud SQL Admin API and an instance, neither reachable here, so the
stand-in records what the engine asks of it and hands back a real pg8000 connection to the test
database: the engine then runs real queries through the connector path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.platform.config import load_settings
from common.platform.db import connect as db_connect
from common.platform.db import pool as common_db
from tests.support import ROOT

INSTANCE = "dylen-prod:europe-west1:dylen"

# Written into a file so the subprocess test imports the same stand-in.
STAND_IN = '''
import json, os
import pg8000.dbapi
import sqlalchemy as sa

def _record(entry):
    with open(os.environ["STAND_IN_RECORD"], "a") as f:
        f.write(json.dumps(entry, default=str) + "\\n")


class StandInConnector:
    """Records the engine's requests; connects to the real test database instead of Cloud SQL."""

    def __init__(self, **kwargs):
        _record({"init": kwargs})

    def connect(self, instance, driver, **kwargs):
        _record({"connect": [instance, driver], "kwargs": kwargs})
        url = sa.engine.make_url(os.environ["STAND_IN_DATABASE_URL"])
        return pg8000.dbapi.connect(
            user=url.username, password=url.password, host=url.host, port=url.port or 5432,
            database=url.database, application_name=kwargs.get("application_name"),
            startup_params=kwargs.get("startup_params"),
        )

    def close(self):
        _record({"close": True})
'''


@pytest.fixture
def stand_in(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "connector_stand_in.py").write_text(STAND_IN)
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("STAND_IN_RECORD", str(record))
    monkeypatch.setenv("STAND_IN_DATABASE_URL", database_url)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield record


def _entries(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.mark.parametrize("iam", [True, False])
def test_engine_asks_the_connector_for_instance_driver_user_db_and_auth_mode(
    stand_in: Path, monkeypatch: pytest.MonkeyPatch, iam: bool
) -> None:
    import google.cloud.sql.connector as connector_module
    from connector_stand_in import StandInConnector  # type: ignore[import-not-found]

    monkeypatch.setattr(connector_module, "Connector", StandInConnector)
    monkeypatch.setattr(db_connect, "_connector", None)
    monkeypatch.setattr(db_connect.atexit, "register", lambda fn: fn)  # the subprocess test covers exit
    env = {"DYLEN_AUTH_MODE": "dev", "DYLEN_CLOUD_SQL_INSTANCE": INSTANCE, "DYLEN_DB_NAME": "dylen"}
    if iam:
        env |= {"DYLEN_DB_IAM_AUTH": "true", "DYLEN_DB_USER": "dylen-runtime@dylen-prod.iam"}
    else:
        env |= {"DYLEN_DB_USER": "dylen", "DYLEN_DB_PASSWORD": "s3cret"}
    pool = common_db.build_pool(load_settings(env))
    record = pool.acquire()
    try:
        # The connector's socket is out of our reach: the server bounds statements instead.
        assert common_db.Connection(pool, record).execute("SHOW statement_timeout").scalar() == "30s"
    finally:
        pool.release(record)
        pool.invalidate_all()
    init, connect = _entries(stand_in)[:2]
    assert init["init"]["refresh_strategy"] == "lazy"
    assert connect["connect"] == [INSTANCE, "pg8000"]
    expected: dict[str, Any] = {
        "user": env["DYLEN_DB_USER"],
        "db": "dylen",
        "enable_iam_auth": iam,
        "application_name": "dylen",
        "startup_params": {"statement_timeout": "30000"},
    }
    if not iam:
        expected["password"] = "s3cret"  # a password only without IAM auth
    assert connect["kwargs"] == expected


@pytest.mark.parametrize(("ip_type", "expected"), [(None, "PUBLIC"), ("private", "PRIVATE"), ("psc", "PSC")])
def test_the_connector_reaches_the_instance_by_the_configured_ip_type(
    stand_in: Path, monkeypatch: pytest.MonkeyPatch, ip_type: str | None, expected: str
) -> None:
    """An instance with only a private IP is reached over VPC egress (deploy.sh --db-ip-type private)."""
    import google.cloud.sql.connector as connector_module
    from connector_stand_in import StandInConnector  # type: ignore[import-not-found]
    from google.cloud.sql.connector import IPTypes

    monkeypatch.setattr(connector_module, "Connector", StandInConnector)
    monkeypatch.setattr(db_connect, "_connector", None)
    monkeypatch.setattr(db_connect.atexit, "register", lambda fn: fn)
    env = {
        "DYLEN_AUTH_MODE": "dev",
        "DYLEN_CLOUD_SQL_INSTANCE": INSTANCE,
        "DYLEN_DB_NAME": "dylen",
        "DYLEN_DB_IAM_AUTH": "true",
        "DYLEN_DB_USER": "dylen-api@dylen-prod.iam",
    }
    if ip_type:
        env["DYLEN_DB_IP_TYPE"] = ip_type
    db_connect.connect_function(load_settings(env), read_timeout=None)
    (init,) = _entries(stand_in)
    assert init["init"]["ip_type"] == str(IPTypes[expected])


def test_an_unknown_ip_type_fails_at_start_naming_the_variable() -> None:
    from common.platform.errors import ConfigError

    with pytest.raises(ConfigError, match="DYLEN_DB_IP_TYPE must be one of public, private, psc"):
        load_settings({"DYLEN_AUTH_MODE": "dev", "DYLEN_DB_IP_TYPE": "vpc"})


def test_the_connector_is_created_lazily_once_and_closed_at_exit(stand_in: Path, database_url: str) -> None:
    script = (
        "import google.cloud.sql.connector as m, connector_stand_in as s\n"
        "m.Connector = s.StandInConnector\n"
        "from common.platform.db import transaction\n"
        "for _ in range(3):\n"
        "    with transaction() as conn:\n"
        "        assert conn.execute('SELECT count(*) FROM jobs').scalar() >= 0\n"
        "print('ok')\n"
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{stand_in.parent}",
        "DYLEN_ENV_FILE": os.devnull,
        "DYLEN_AUTH_MODE": "dev",
        "DYLEN_CLOUD_SQL_INSTANCE": INSTANCE,
        "DYLEN_DB_NAME": "dylen",
        "DYLEN_DB_USER": "dylen-runtime@dylen-prod.iam",
        "DYLEN_DB_IAM_AUTH": "true",
        "STAND_IN_RECORD": str(stand_in),
        "STAND_IN_DATABASE_URL": database_url,
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    entries = _entries(stand_in)
    assert sum("init" in e for e in entries) == 1  # one connector per process
    assert entries[-1] == {"close": True}  # closed by atexit after the last use

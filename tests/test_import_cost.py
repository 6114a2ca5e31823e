"""Cold start pays only for what the configuration uses: google-cloud-tasks and the Cloud SQL connector
stay out of `sys.modules` until a gcp dispatch or a Cloud SQL connection needs them, google-genai
(~0.4 s) until process_job makes its first Gemini call, OpenTelemetry until DYLEN_TELEMETRY turns it
on, and no function imports SQLAlchemy (~0.3 s of CPU; it is for migrations only, see
common/db.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.support import ROOT, free_port

HEAVY = ("google.cloud.tasks_v2", "google.cloud.sql.connector", "sqlalchemy", "google.genai", "opentelemetry")
FUNCTIONS = sorted(p.name for p in (ROOT / "functions").iterdir() if (p / "main.py").is_file())


def _run(script: str, **env: str) -> Any:
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "DYLEN_ENV_FILE": os.devnull,
        "DYLEN_AUTH_MODE": "dev",
        "DYLEN_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",  # never connected to
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_no_function_imports_tasks_the_connector_sqlalchemy_or_opentelemetry_under_local_configuration() -> (
    None
):
    script = (
        "import json, runpy, sys\n"
        f"heavy, names = {HEAVY!r}, {FUNCTIONS!r}\n"
        "loaded = {}\n"
        "for name in names:\n"
        "    runpy.run_path(f'functions/{name}/main.py')\n"
        "    loaded[name] = [m for m in heavy if m in sys.modules]\n"
        "print(json.dumps(loaded))\n"
    )
    loaded = _run(script)
    assert set(loaded) == set(FUNCTIONS) and "create_job" in loaded and "process_job" in loaded
    assert loaded == {name: [] for name in FUNCTIONS}


def test_only_process_job_imports_google_genai_and_only_at_its_first_gemini_call() -> None:
    script = (
        "import json, runpy, sys\n"
        f"names = {FUNCTIONS!r}\n"
        "seen = {}\n"
        "for name in names:\n"
        "    runpy.run_path(f'functions/{name}/main.py')\n"
        "    seen[name] = 'google.genai' in sys.modules\n"
        "from common.lessons.kind import get_generator\n"
        "from common.lessons import gemini\n"
        "seen['generator is gemini'] = get_generator() is gemini\n"
        "seen['after choosing it'] = 'google.genai' in sys.modules\n"
        "gemini.client()\n"  # what the first call builds; nothing listens at the base URL
        "seen['at the first call'] = 'google.genai' in sys.modules\n"
        "print(json.dumps(seen))\n"
    )
    seen = _run(
        script,
        DYLEN_LESSON_GENERATOR="gemini",
        GEMINI_API_KEY="unused",
        DYLEN_GEMINI_BASE_URL=f"http://127.0.0.1:{free_port()}",
    )
    assert seen == {
        **{name: False for name in FUNCTIONS},
        "generator is gemini": True,
        "after choosing it": False,
        "at the first call": True,
    }


def test_create_job_under_gcp_imports_the_tasks_client_on_first_dispatch_only() -> None:
    script = (
        "import json, runpy, sys, uuid\n"
        "from datetime import UTC, datetime\n"
        "seen = {}\n"
        "runpy.run_path('functions/create_job/main.py')\n"
        "seen['import'] = 'google.cloud.tasks_v2' in sys.modules\n"
        "from common.jobs.dispatch import dispatch_job, get_dispatcher\n"
        "get_dispatcher()\n"
        "seen['dispatcher'] = 'google.cloud.tasks_v2' in sys.modules\n"
        "from common.jobs.model import Job\n"
        "now = datetime.now(UTC)\n"
        "job = Job.queued(id=uuid.uuid4(), user_id='u', job_kind='lesson', idempotency_key='k',\n"
        "                 request_json={}, max_attempts=5, now=now)\n"
        "seen['dispatched'] = dispatch_job(job)\n"  # nothing listens: fails, but has loaded the client
        "seen['after'] = 'google.cloud.tasks_v2' in sys.modules\n"
        "seen['connector'] = 'google.cloud.sql.connector' in sys.modules\n"
        "print(json.dumps(seen))\n"
    )
    seen = _run(
        script,
        DYLEN_TASK_SERVICE_PROVIDER="gcp",
        CLOUD_TASKS_EMULATOR_HOST=f"127.0.0.1:{free_port()}",
        DYLEN_CLOUD_TASKS_QUEUE_PATH="projects/p/locations/l/queues/q",
    )
    assert seen == {
        "import": False,
        "dispatcher": False,
        "dispatched": False,
        "after": True,
        "connector": False,
    }


def test_every_function_hides_its_import_time_objects_from_the_cyclic_gc() -> None:
    # The first full collection would otherwise walk them all holding the GIL (~35 ms here).
    script = (
        "import gc, json, runpy\n"
        f"names = {FUNCTIONS!r}\n"
        "frozen = {}\n"
        "for name in names:\n"
        "    gc.unfreeze()\n"
        "    runpy.run_path(f'functions/{name}/main.py')\n"
        "    frozen[name] = gc.get_freeze_count()\n"
        "    frozen[name] = frozen[name] > 0.8 * (frozen[name] + len(gc.get_objects()))\n"
        "print(json.dumps(frozen))\n"
    )
    assert _run(script) == {name: True for name in FUNCTIONS}


def test_telemetry_loads_the_sdk_at_cold_start_and_the_google_exporters_on_their_first_export(
    tmp_path: Any,
) -> None:
    # The SDK in the cold start (Cloud Run's start-up CPU boost), not on a request; the Google
    # exporters (~350 ms of imports) on their first export, which a process that served nothing
    # never reaches.
    script = (
        "import json, runpy, sys\n"
        "runpy.run_path('functions/create_job/main.py')\n"
        "names = ('opentelemetry.sdk.trace', 'opentelemetry.sdk.metrics',\n"
        "         'opentelemetry.exporter.cloud_trace', 'opentelemetry.exporter.cloud_monitoring')\n"
        "print(json.dumps([n in sys.modules for n in names]))\n"
    )
    assert _run(script, DYLEN_TELEMETRY="file", DYLEN_TELEMETRY_DIR=str(tmp_path)) == [
        True,
        True,
        False,
        False,
    ]
    assert _run(script, DYLEN_TELEMETRY="gcp", GOOGLE_CLOUD_PROJECT="p") == [True, True, False, False]
    assert list(tmp_path.iterdir()) == []  # nothing recorded, nothing written

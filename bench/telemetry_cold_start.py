"""What telemetry adds to a function's cold start: create_job's main.py imported and cold-started
(`cold_start()`: settings, kinds, and with telemetry on the SDK and its exporters) in a fresh
interpreter, with DYLEN_TELEMETRY off, file and gcp, in alternating rounds so that the shared
machine's drift hits each alike. Serves nothing, so the gcp exporters never connect anywhere.

    PYTHONPATH=. .venv/bin/python -m bench.telemetry_cold_start [--rounds 9]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = (
    "import time; t = time.perf_counter(); import runpy; "
    "runpy.run_path('functions/create_job/main.py'); print(time.perf_counter() - t)"
)


def once(mode: str, directory: str) -> float:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "DYLEN_ENV_FILE": os.devnull,
        "DYLEN_AUTH_MODE": "dev",
        "DYLEN_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",  # never connected to
        "DYLEN_TELEMETRY": mode,
        "DYLEN_TELEMETRY_DIR": directory,
        "GOOGLE_CLOUD_PROJECT": "bench",
    }
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {"off": [], "file": [], "gcp": []}
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(args.rounds):
            for mode in samples:
                samples[mode].append(once(mode, directory))
    off = statistics.median(samples["off"])
    result = {
        mode: {
            "median_ms": round(statistics.median(v) * 1000, 1),
            "added_ms": round((statistics.median(v) - off) * 1000, 1),
        }
        for mode, v in samples.items()
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How long one full cyclic-GC collection stops a warm function process (it holds the GIL, so every
request in flight waits), with the import-time objects frozen as common.platform.http.cold_start leaves them,
and unfrozen. No database needed: the imports are what the collector would walk.

    PYTHONPATH=. .venv/bin/python -m bench.gc_pause [function]
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time

from tests.support import ROOT


def _full_collection_ms(repeat: int = 7) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        gc.collect()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "create_job"
    os.environ.update(DYLEN_ENV_FILE=os.devnull, DYLEN_AUTH_MODE="dev", DYLEN_LOG_LEVEL="WARNING")
    os.environ.setdefault("DYLEN_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/none")  # never used
    import functions_framework

    functions_framework.create_app(name, str(ROOT / "functions" / name / "main.py"))
    frozen_objects = gc.get_freeze_count()
    frozen = _full_collection_ms()
    gc.unfreeze()
    tracked = len(gc.get_objects())
    unfrozen = _full_collection_ms()
    print(
        json.dumps(
            {
                "function": name,
                "objects_frozen_at_cold_start": frozen_objects,
                "objects_tracked_unfrozen": tracked,
                "full_collection_ms_frozen": round(frozen, 2),
                "full_collection_ms_unfrozen": round(unfrozen, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

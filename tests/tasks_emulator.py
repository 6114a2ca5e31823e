"""The `gcloud-tasks-emulator` server (from PyPI) as a subprocess on a free loopback port.

It lives in its own venv (`make tasks-emulator`, a dependency of `make test`) because it pins an older
protobuf than the app's google-cloud-tasks. It delivers HTTP tasks to the URL in the task itself, so
process_job on a loopback port receives them as it would from Cloud Tasks. Tests talk to it on
127.0.0.1 only; the emulator itself has no bind-address option and listens on [::].
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support import ROOT, free_port

EMULATOR_BIN = ROOT / ".venv-tasks-emulator" / "bin" / "gcloud-tasks-emulator"
QUEUE_PATH = "projects/dylen-test/locations/local/queues/jobs"


class TasksEmulator:
    def __init__(self, log_dir: Path, *, queue_path: str = QUEUE_PATH) -> None:
        if not EMULATOR_BIN.exists():
            raise RuntimeError(f"{EMULATOR_BIN} is missing: run `make tasks-emulator` (make test does)")
        self.queue_path = queue_path
        self.port = free_port()
        self.log_path = log_dir / f"tasks-emulator-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> TasksEmulator:
        # A clean environment: no proxy variables (it delivers with urllib, which honours them).
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        env["PYTHONWARNINGS"] = "ignore"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(EMULATOR_BIN), "start", "--port", str(self.port), "--default-queue", self.queue_path],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tasks emulator exited at start-up:\n{self.log()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tasks emulator not listening after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

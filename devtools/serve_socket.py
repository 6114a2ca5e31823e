"""Run functions-framework on a listening socket that the parent already bound.

    python -m devtools.serve_socket FD <functions-framework arguments>

`make run` binds every function's port itself (so a port is known free, or chosen by the OS, before
anything starts) and hands the socket down. functions-framework serves with gunicorn, which takes
inherited sockets through systemd's socket-activation variables (LISTEN_FDS, LISTEN_PID, sockets
from fd 3; see gunicorn's "Systemd" deployment docs) and then binds nothing itself. This process
moves the socket to fd 3, sets the variables for its own pid and execs functions-framework in place,
so the pid the parent holds is gunicorn's master.
"""

from __future__ import annotations

import os
import sys

LISTEN_FDS_START = 3  # sd_listen_fds(3): the first passed socket is fd 3


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[1].isdigit():
        raise SystemExit("usage: python -m devtools.serve_socket FD <functions-framework arguments>")
    fd = int(argv[1])
    if fd != LISTEN_FDS_START:
        os.dup2(fd, LISTEN_FDS_START)  # the duplicate is inheritable across exec
        os.close(fd)
    else:
        os.set_inheritable(fd, True)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
    os.execv(sys.executable, [sys.executable, "-m", "functions_framework", *argv[2:]])


if __name__ == "__main__":
    main(sys.argv)

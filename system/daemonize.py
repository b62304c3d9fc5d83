"""``-daemonize``: detach from the terminal once the VM is set up, the way QEMU does.

The command forks before anything else runs (no threads exist yet, so forking is safe). The original
process waits on a pipe and exits with status 0 when the daemon reports that the VM is set up -- after
the pid file and the monitors exist, so a management tool that sees the command return can read the pid
file and connect at once -- or with status 1 when the daemon fails first (the daemon has printed the
error on the still-inherited stderr). The daemon starts a new session (``setsid``), forks once more so it
can never regain a controlling terminal, sets QEMU's umask (027), keeps its working directory, and when
set up points stdin, stdout and stderr at ``/dev/null``.
"""

from __future__ import annotations

import os
import signal
import sys

READY = b"\0"


class Daemon:
    """The daemon's end of the start-up pipe."""

    def __init__(self, pipe_fd: int) -> None:
        self._fd = pipe_fd

    def ready(self) -> None:
        """The VM is set up: release the waiting parent (status 0) and let go of the terminal."""
        if self._fd < 0:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        null = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        os.close(null)
        os.write(self._fd, READY)
        self.close()

    def close(self) -> None:
        """Set-up failed (or is over): the parent sees the pipe close; without READY it exits 1."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def daemonize() -> Daemon:
    """Fork; the original process never returns (it exits with the daemon's start-up status)."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    if os.fork() > 0:
        os.close(write_fd)
        status = _wait_for_daemon(read_fd)
        os._exit(status)
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the session leader goes; the daemon can never acquire a controlling terminal
    os.umask(0o027)
    for signum in (signal.SIGTSTP, signal.SIGTTOU, signal.SIGTTIN):
        signal.signal(signum, signal.SIG_IGN)
    return Daemon(write_fd)


def _wait_for_daemon(read_fd: int) -> int:
    while True:
        try:
            data = os.read(read_fd, 1)
        except InterruptedError:
            continue
        except KeyboardInterrupt:
            return 1
        return 0 if data == READY else 1

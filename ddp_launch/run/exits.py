"""A worker's exit as the kernel reports it, not as the forkserver relays it.

A worker forked by the warm forkserver is the forkserver's child: multiprocessing's sentinel
for it is a pipe on which the forkserver writes the exit code once it has reaped the worker.
On a machine busy with the dying generation (its peers raising their "connection closed"
errors), the forkserver, a Python process, was measured to pass that on 15-20 ms after the
worker was gone, and the stop then waited for it once more per stopped worker. A pidfd
(Linux 5.3) is readable the moment the process has exited, whoever its parent is, and the
exit code is in /proc/PID/stat while it is a zombie; the forkserver's pipe is the fallback
(no pidfd, or the forkserver reaped it first, and then it writes the code at once).
"""

from __future__ import annotations

import os
import select
import signal
import time
from typing import Any


class WatchedProcess:
    """A started multiprocessing Process, with the group's handle interface (`pid`,
    `sentinel`, `exitcode`, `join`): the sentinel is a pidfd where Linux has them."""

    def __init__(self, process: Any) -> None:
        self.process = process
        self.pid: int | None = process.pid
        self._pidfd = _open_pidfd(process.pid)
        self.sentinel: int = self._pidfd if self._pidfd is not None else process.sentinel
        self._code: int | None = None

    @property
    def exitcode(self) -> int | None:
        if self._code is None:
            code = self.process.exitcode  # the forkserver's word, when it has spoken
            if code is None and self._pidfd is not None and _readable(self._pidfd, 0.0):
                code = _zombie_exit_code(self.pid or 0, self._pidfd)
            if code is not None:
                self._code = code
                self._close()
        return self._code

    def join(self, timeout: float | None = None) -> None:
        if self.exitcode is not None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._pidfd is not None:
            _readable(self._pidfd, timeout)
            if self.exitcode is not None:
                return
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.process.join(left)  # reaped by the forkserver: its word follows at once
        self.exitcode  # noqa: B018  (caches it and closes the pidfd)

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
            # The group waits on `sentinel`: from now on the forkserver's, which says the same.
            self.sentinel = self.process.sentinel

    def __del__(self) -> None:
        if getattr(self, "_pidfd", None) is not None:
            self._close()


def _open_pidfd(pid: int | None) -> int | None:
    if not pid or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:  # a kernel before 5.3, or it is gone already: the forkserver will say
        return None


def _readable(fd: int, timeout: float | None) -> bool:
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(None if timeout is None else max(0, int(timeout * 1000))))


def _zombie_exit_code(pid: int, pidfd: int) -> int | None:
    """The exit code of `pid`, exited but not yet reaped, as multiprocessing gives it
    (negative: the signal that ended it); None when its parent has reaped it already."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        # pidfd_send_signal(0) fails once the process is reaped: the pid is ours still, so
        # the file read before it was our zombie's, not a newcomer's with the same pid.
        signal.pidfd_send_signal(pidfd, 0)
    except (OSError, AttributeError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] != "Z" or len(fields) < 50:
        return None
    return os.waitstatus_to_exitcode(int(fields[49]))  # field 52: the wait status

"""A worker's exit seen through a pidfd (run/exits.py): the code is read from the zombie
before its parent says it, and the parent's word is the fallback once it has reaped it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from ddp_launch.run import exits

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfd on this platform")


class NotReaped:
    """A multiprocessing Process stand-in whose parent never speaks (a busy forkserver):
    the process is this test's own child, left a zombie until `reap`."""

    def __init__(self, code: str) -> None:
        self._popen = subprocess.Popen([sys.executable, "-c", code])
        self.pid = self._popen.pid
        self._r, self._w = os.pipe()
        self.sentinel = self._r  # never readable: the parent has not spoken
        self.reaped: int | None = None

    @property
    def exitcode(self) -> int | None:
        return self.reaped

    def join(self, timeout: float | None = None) -> None:
        try:
            self.reaped = self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def reap(self) -> None:
        if self.reaped is None:
            self.reaped = self._popen.wait(10)

    def __enter__(self) -> NotReaped:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.reaped is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.reap()
        os.close(self._r)
        os.close(self._w)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("code", "expected"), [("raise SystemExit(3)", 3), ("import os; os.kill(os.getpid(), 15)", -15)]
)
def test_the_exit_code_comes_from_the_zombie_before_the_parent_speaks(code, expected):
    with NotReaped(code) as process:
        watched = exits.WatchedProcess(process)
        assert watched.sentinel != process.sentinel  # a pidfd, readable at the exit
        watched.join(10)
        assert watched.exitcode == expected
        assert process.reaped is None, "the code was read without the parent's word"
        assert watched.sentinel == process.sentinel  # the pidfd is closed once the code is known


@pytest.mark.timeout(30)
def test_once_the_parent_has_reaped_it_its_word_is_taken():
    with NotReaped("raise SystemExit(7)") as process:
        watched = exits.WatchedProcess(process)
        assert watched.exitcode is None  # alive, or at least not known to be gone yet
        process.reap()  # the forkserver was first: no zombie is left to read
        watched.join(10)
        assert watched.exitcode == 7


@pytest.mark.timeout(30)
def test_a_live_process_has_no_exit_code_and_join_times_out():
    with NotReaped("import time; time.sleep(60)") as process:
        watched = exits.WatchedProcess(process)
        watched.join(0.05)
        assert watched.exitcode is None
        os.kill(process.pid, signal.SIGKILL)
        watched.join(10)
        assert watched.exitcode == -9

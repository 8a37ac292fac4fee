"""A fork that the dying forkserver failed is asked again with new pipes (launcher._start):
a twin the old forkserver may have forked keeps only the first ones, closed here."""

from __future__ import annotations

import os

import pytest

from ddp_launch import launcher


class FakeProcess:
    def __init__(self, fails: bool) -> None:
        self.fails = fails
        self.started = False

    def start(self) -> None:
        if self.fails:
            raise EOFError  # the forkserver's pipe ended before it said the child's pid
        self.started = True


class Conn:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Attempts:
    """make() for `_start`: each attempt with its own pipes, the first one failing."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.made: list[tuple[FakeProcess, list[Conn], list[int], Conn]] = []
        self.inodes: list[int] = []  # each attempt's pipe

    def __call__(self):
        r, w = os.pipe()
        self.inodes.append(os.fstat(r).st_ino)
        attempt = (FakeProcess(fails=len(self.made) < self.failures), [Conn(), Conn()], [r, w], Conn())
        self.made.append(attempt)
        return attempt

    def closed(self, fd: int, inode: int) -> bool:
        """Whether `fd` no longer refers to the pipe `inode` (closed, or its number reused)."""
        try:
            return os.fstat(fd).st_ino != inode
        except OSError:
            return True

    def close_all(self) -> None:
        for _, _, ours, _ in self.made:
            for fd in ours:
                try:
                    os.close(fd)
                except OSError:
                    pass


def test_the_second_fork_has_new_pipes_and_the_first_ones_are_closed(monkeypatch):
    monkeypatch.setattr(launcher, "_forkserver_dead", lambda timeout_s=10.0: True)
    attempts = Attempts(failures=1)
    try:
        process, ours, extra = launcher._start(attempts)
        (first, first_theirs, first_ours, first_extra), second = attempts.made
        first_pipe, second_pipe = attempts.inodes
        assert process is second[0] and process.started and ours == second[2] and extra is second[3]
        assert all(attempts.closed(fd, first_pipe) for fd in first_ours), "the failed attempt's pipes are left open"
        assert first_extra.closed and all(c.closed for c in first_theirs)
        assert not any(attempts.closed(fd, second_pipe) for fd in ours) and not extra.closed
        assert all(c.closed for c in second[1])  # the child's ends: its own copies now
    finally:
        attempts.close_all()


def test_a_forkserver_that_is_not_dead_or_a_second_failure_raises(monkeypatch):
    monkeypatch.setattr(launcher, "_forkserver_dead", lambda timeout_s=10.0: False)
    attempts = Attempts(failures=1)
    with pytest.raises(EOFError):
        launcher._start(attempts)
    assert len(attempts.made) == 1
    monkeypatch.setattr(launcher, "_forkserver_dead", lambda timeout_s=10.0: True)
    attempts = Attempts(failures=2)
    with pytest.raises(EOFError):
        launcher._start(attempts)
    pipes = [(fd, inode) for (_, _, ours, _), inode in zip(attempts.made, attempts.inodes) for fd in ours]
    assert len(attempts.made) == 2 and all(attempts.closed(fd, inode) for fd, inode in pipes)

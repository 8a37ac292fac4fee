"""Shared fixtures: every test must leave no child process and no thread of its own behind."""

from __future__ import annotations

import threading
import time

import psutil
import pytest

# Every thread the package starts is named so (and is a daemon thread).
PACKAGE_THREAD_PREFIX = "ddp-launch"
THREAD_GRACE_S = 2.0


def _left_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started during the test that are still alive: non-daemon ones, and the package's own."""
    return [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and (not t.daemon or t.name.startswith(PACKAGE_THREAD_PREFIX))
    ]


def _wait_threads(before: set[threading.Thread], grace_s: float) -> list[threading.Thread]:
    """Give the test's threads `grace_s` in all to end; returns those still alive."""
    deadline = time.monotonic() + grace_s
    left = _left_threads(before)
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for t in left:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        left = _left_threads(before)
    return left


@pytest.fixture(autouse=True)
def no_leftovers():
    """Fail a test that leaves child processes, non-daemon threads or the package's threads running."""
    before_threads = set(threading.enumerate())  # the objects: an ident may be reused
    yield
    me = psutil.Process()
    left = []
    for child in me.children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                left.append(child)
        except psutil.NoSuchProcess:
            continue
    for child in left:  # clean up by pid so the next test starts clean, then fail
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)
    assert not left, f"test left processes behind: {[(p.pid, p.name()) for p in left if p.is_running()] or left}"
    threads = _wait_threads(before_threads, THREAD_GRACE_S)
    assert not threads, f"test left threads behind: {threads}"

"""Shared fixtures: every test must leave no child process and no non-daemon thread behind."""

from __future__ import annotations

import threading

import psutil
import pytest


@pytest.fixture(autouse=True)
def no_leftovers():
    """Fail a test that leaves child processes or non-daemon threads running."""
    before_threads = {t.ident for t in threading.enumerate()}
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
    threads = [t for t in threading.enumerate() if t.ident not in before_threads and not t.daemon and t.is_alive()]
    assert not threads, f"test left threads behind: {threads}"

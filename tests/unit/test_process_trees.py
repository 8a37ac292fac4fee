"""Stopping a worker's process tree (run/group.stop_process_trees): every descendant is
found (from the kernel's children lists, or the process table where there are none),
signalled, waited for, and SIGKILLed once the grace is over."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from ddp_launch.run import group

PARENT = """
import signal, subprocess, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def tree(kind: str) -> tuple[subprocess.Popen, int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, kind], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    return parent, int(parent.stdout.readline())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel_lists", [True, False])
def test_the_whole_tree_is_found_and_stopped(monkeypatch, kernel_lists):
    if not kernel_lists:  # a kernel without /proc/PID/task/TID/children: the table is read
        monkeypatch.setattr(group, "_children_from_proc", lambda pid: None)
    parent, child = tree("plain")
    try:
        assert sorted(p.pid for p in group._trees([parent.pid])) == sorted([parent.pid, child])
        group.stop_process_trees([parent.pid], grace_s=5.0)
        assert parent.wait(5) == -15  # SIGTERM was enough
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    finally:
        for pid in (parent.pid, child):
            group.signal_quietly(pid, 9)
        parent.wait(5)


@pytest.mark.timeout(30)
def test_a_process_that_ignores_sigterm_is_killed_after_the_grace():
    parent, child = tree("stubborn")
    try:
        started = time.monotonic()
        group.stop_process_trees([parent.pid], grace_s=0.5)
        assert parent.wait(5) == -9
        assert time.monotonic() - started >= 0.5
    finally:
        for pid in (parent.pid, child):
            group.signal_quietly(pid, 9)
        parent.wait(5)


def test_gone_already_is_fine():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    group.stop_process_trees([int(done.stdout)], grace_s=0.1)
    assert group._trees([int(done.stdout)]) == []

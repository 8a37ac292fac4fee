"""Stopping a worker's process tree (run/group.stop_process_trees): every descendant is
found (from the kernel's children lists, or the process table where there are none),
signalled, waited for, and SIGKILLed once the grace is over."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

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
        _assert_gone([child])
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


LEADER = """
import os, signal, subprocess, sys, time
def on_term(signum, frame):  # installed unless argv[1] is "plain"
    os.write(1, b"term\\n")
    time.sleep(0.3)  # a second SIGTERM would come now, and run this again
    sys.exit(0)
if sys.argv[1] != "plain":
    signal.signal(signal.SIGTERM, on_term)
in_group = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
own_session = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print(in_group.pid, own_session.pid, flush=True)
while True:
    time.sleep(0.01)
"""


@pytest.mark.timeout(30)
def test_a_group_leaders_tree_is_stopped_and_its_handler_runs_once():
    """A worker leads its process group: the group is signalled first, and the descendants in
    a session of their own are found in the tree; nobody gets the signal twice."""
    with _leader("handler") as (leader, kids):
        group.stop_process_trees([leader.pid], grace_s=5.0)
        assert leader.wait(5) == 0  # its handler ended it
        assert leader.stdout.read().split() == ["term"]
        _assert_gone(kids)


@pytest.mark.timeout(30)
def test_a_leader_that_dies_at_once_is_frozen_first_so_its_other_sessions_child_is_found(monkeypatch):
    """Without a handler the leader dies soon after SIGTERM, and a child in a session of its
    own would be orphaned if its tree were read after: it is frozen first, then read, then
    signalled."""
    calls: list[tuple] = []
    read, send = group._trees, group.signal_process_group

    def trees(pids):
        calls.append(("read",))
        return read(pids)

    def to_group(pid, signum):
        calls.append((pid, signal.Signals(signum).name))
        return send(pid, signum)

    monkeypatch.setattr(group, "_trees", trees)
    monkeypatch.setattr(group, "signal_process_group", to_group)
    with _leader("plain") as (leader, kids):
        group.stop_process_trees([leader.pid], grace_s=5.0)
        p = leader.pid
        assert calls == [(p, "SIGSTOP"), ("read",), (p, "SIGTERM"), (p, "SIGCONT")]
        assert leader.wait(5) == -15
        _assert_gone(kids)


@contextlib.contextmanager
def _leader(kind: str) -> Iterator[tuple[subprocess.Popen, list[int]]]:
    """LEADER in a session of its own, and its two children's pids; all killed after."""
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER, kind], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert leader.stdout is not None
    kids = [int(pid) for pid in leader.stdout.readline().split()]
    try:
        yield leader, kids
    finally:
        for pid in (leader.pid, *kids):
            group.signal_quietly(pid, 9)
        leader.wait(5)


def _assert_gone(pids: list[int]) -> None:
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

"""This node's workers of one generation, as one object: started together, watched through
their process sentinels, stopped together. The supervisor (node 0) and the follower (other
nodes) share it, and its signalling is injected, so their tests need no monkeypatching of
`os.kill`: they pass a group whose `kill_trees` and `send` record instead of signalling.

`wait` is the one watch loop's wait: it wakes on a worker's death (within milliseconds,
through its sentinel), on a readable wake-up fd (a signal arrived, the master spoke), or
after `timeout_s`, and drains the fds that woke it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_sentinels
from typing import Protocol, cast

import psutil


class WorkerHandle(Protocol):
    """A started worker process, as the group needs it (torch.multiprocessing's Process)."""

    pid: int | None
    sentinel: int

    @property
    def exitcode(self) -> int | None: ...

    def join(self, timeout: float | None = None) -> None: ...


# start_worker(local_rank, generation, node_rank) -> a started worker whose output is
# attached to the pump.
WorkerStarter = Callable[[int, int, int], WorkerHandle]


class Standbys(Protocol):
    """Workers forked ahead of a restart (the launcher's starter); `start_worker` takes
    one when there is one for the worker it is asked for."""

    def prepare(self, local_rank: int, generation: int, node_rank: int) -> None: ...

    def discard(self) -> None: ...


# kill_trees(pids, grace_s, first_signal): stop these processes and their descendants.
TreeKiller = Callable[[list[int], float, int], None]
# send(pid, signum): one signal to one process; gone or not ours is fine.
Sender = Callable[[int, int], None]


@dataclass(frozen=True)
class Exit:
    rank: int
    pid: int
    exit_code: int  # multiprocessing's: negative for a signal
    at: float = 0.0  # time.time() when it was reaped (within milliseconds of its death)


def stop_process_trees(pids: list[int], grace_s: float, first_signal: int = signal.SIGTERM) -> None:
    """Stop these processes and all their descendants: `first_signal` (and SIGCONT, for a
    stopped one), wait up to `grace_s`, then SIGKILL. Already gone is fine."""
    # Frozen first, one call each: SIGSTOP to the group a worker leads (what it forks, such as
    # DataLoader workers, is in it), or to the process alone where it leads none. A failure's
    # survivors then stop spending the CPU on their "connection closed" errors at once, and
    # a frozen process can neither exit nor fork, so the tree read next is whole: nothing is
    # orphaned before it is found. Read while they ran, it held the signals back 5-40 ms on a
    # machine busy with the dying generation.
    # Not a process that catches the signal (Python always catches SIGINT): a process just
    # continued takes a signal on whichever of its threads runs first, and a Python handler
    # (KeyboardInterrupt) would then wait for the main thread's sleep to end. A signal left
    # to its default action ends the whole process, whichever thread takes it.
    frozen = [pid for pid in pids if not _catches(pid, first_signal)]
    for pid in frozen:
        signal_process_group(pid, signal.SIGSTOP)
    procs = _trees(pids)
    # Every process gets `first_signal` once (a handler must not run twice): with the group
    # its worker leads, or on its own. A frozen one has it pending when SIGCONT wakes it, and
    # ends without running again (continued first, the survivors took the CPU back before the
    # signal came). The others are continued before it too: one stopped by hand or by Ctrl-Z
    # must run to take it.
    groups = {pid for pid in pids if _group_of(pid) == pid}
    alone = [p.pid for p in procs if _group_of(p.pid) not in groups]
    targets: list[tuple[int, Sender]] = [(pgid, signal_process_group) for pgid in groups]
    targets += [(pid, signal_quietly) for pid in alone]
    for pid, send in targets:
        # os.kill, not psutil's send_signal: that one reads /proc first, milliseconds each
        # on a busy machine. The tree was read just now.
        for signum in (
            (first_signal, signal.SIGCONT) if pid in frozen else (signal.SIGCONT, first_signal, signal.SIGCONT)
        ):
            send(pid, signum)
    if not procs:
        return
    alive = _wait_gone(procs, grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _wait_gone(alive, 2.0)


def _trees(pids: list[int]) -> list[psutil.Process]:
    """The processes and all their descendants. A restart waits for this, on a machine busy
    with the dying generation: Linux's per-thread children lists are read where there are
    some (a few small files per process), the whole process table only where not."""
    found: dict[int, psutil.Process] = {}
    todo = list(pids)
    table: dict[int, list[int]] | None = None
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        try:
            found[pid] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        kids = _children_from_proc(pid)
        if kids is None:
            if table is None:
                table = {}
                for p in psutil.process_iter(["ppid"]):
                    table.setdefault(p.info["ppid"], []).append(p.pid)
            kids = table.get(pid, [])
        todo.extend(kids)
    return list(found.values())


def _children_from_proc(pid: int) -> list[int] | None:
    """/proc/PID/task/TID/children of every thread (a child belongs to the thread that
    forked it); None where the kernel has no such file."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None if not os.path.exists(f"/proc/{pid}") else []
    kids: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}/children") and os.path.isdir(f"/proc/{pid}/task/{tid}"):
                return None  # a kernel without CONFIG_PROC_CHILDREN
        except (OSError, ValueError):
            continue
    return kids


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Until every one of `procs` has exited (a zombie has), or `timeout_s`; returns those
    still alive. Polled every 2 ms: these are not our children, so there is nothing to wait
    on, and psutil's own wait backs off to 40 ms between looks, which a restart would pay."""
    deadline = time.monotonic() + timeout_s
    alive = list(procs)
    while True:
        alive = [p for p in alive if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.002)


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def adopted_from(groups: set[int]) -> list[int]:
    """This process's children that are in one of the process groups `groups`: what a dead
    worker (the leader of its group) left behind, reparented to this subreaper."""
    if not groups:
        return []
    return [pid for pid in _children_from_proc(os.getpid()) or [] if _group_of(pid) in groups]


def signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def signal_process_group(pid: int, signum: int) -> None:
    """`signum` to the process group `pid` leads (a worker leads a session of its own, so its
    group holds its children too, e.g. DataLoader workers); to the process alone while it
    is not a group leader yet (just forked)."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        signal_quietly(pid, signum)
    except PermissionError:
        pass


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for `signum` (SigCgt in /proc/PID/status); True
    where that cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class WorkerGroup:
    """One node's workers; see the module docstring.

    Args:
        start_worker: forks one worker for (local_rank, generation, node_rank).
        node_rank: this node's rank (an elastic run's may change at each `start`).
        standbys: forks a generation's workers ahead of it (`prepare`).
        kill_trees: how `stop` ends the workers' process trees.
        send: how a single signal is sent to one worker (stack dumps).
        send_group: how a signal reaches a worker's whole process group (pause/resume).
    """

    def __init__(
        self,
        start_worker: WorkerStarter,
        node_rank: int = 0,
        *,
        kill_trees: TreeKiller = stop_process_trees,
        send: Sender = signal_quietly,
        send_group: Sender = signal_process_group,
        standbys: Standbys | None = None,
    ) -> None:
        self._start_worker = start_worker
        self._standbys = standbys
        self.node_rank = node_rank
        self.nproc = 0
        self._kill_trees = kill_trees
        self._send = send
        self._send_group = send_group
        self.workers: dict[int, WorkerHandle] = {}
        self._reaped: set[int] = set()

    @property
    def first_rank(self) -> int:
        """The global rank of local rank 0 on this node."""
        return self.node_rank * self.nproc

    def start(self, generation: int, nproc: int, node_rank: int | None = None) -> None:
        """Start `nproc` workers for `generation` (the previous ones must be stopped), as
        node `node_rank` when given (else the node rank it had)."""
        self.workers = {}
        self._reaped = set()
        self.nproc = nproc
        if node_rank is not None:
            self.node_rank = node_rank
        for local_rank in range(nproc):
            self.workers[self.first_rank + local_rank] = self._start_worker(local_rank, generation, self.node_rank)

    def prepare(self, generation: int) -> None:
        """Fork `generation`'s workers now (as standbys), so that a restart into it does not
        wait for the forks; nothing without standbys."""
        if self._standbys is not None:
            for local_rank in range(self.nproc):
                self._standbys.prepare(local_rank, generation, self.node_rank)

    def discard_prepared(self) -> None:
        if self._standbys is not None:
            self._standbys.discard()

    @property
    def alive(self) -> dict[int, WorkerHandle]:
        """Workers not yet reaped."""
        return {rank: w for rank, w in self.workers.items() if rank not in self._reaped}

    def wait(self, wake_fds: Sequence[int], timeout_s: float) -> list[Exit]:
        """Block until a worker dies, a wake-up fd is readable, or `timeout_s`; return the
        workers that ended since the last call (each once), in rank order."""
        alive = self.alive
        ready = wait([w.sentinel for w in alive.values()], wake_fds, timeout_s)
        exits = []
        for rank, w in alive.items():
            if w.sentinel in ready or w.exitcode is not None:
                w.join(timeout=1.0)
                self._reaped.add(rank)
                exits.append(Exit(rank, w.pid or 0, w.exitcode if w.exitcode is not None else 255, time.time()))
        return exits

    def live_pids(self) -> list[int]:
        """The pids of the workers that have not exited."""
        return [w.pid for w in self.workers.values() if w.pid and w.exitcode is None]

    def stop(self, grace_s: float, first_signal: int = signal.SIGTERM) -> None:
        """Signal every process of every worker's tree; SIGKILL what remains after the grace.

        A worker that died before leaves its children (DataLoader workers, a subprocess) in
        its process group, adopted by this launcher as the subreaper: they are stopped with
        the rest, so that none of them runs on beside the next generation (a DataLoader worker
        noticed its dead parent 5 s later; torchrun leaves them, measured with torch 2.13)."""
        dead = {w.pid for w in self.workers.values() if w.pid and w.exitcode is not None}
        self._kill_trees([*self.live_pids(), *adopted_from(dead)], grace_s, first_signal)
        for w in self.workers.values():
            w.join(timeout=2.0)

    def signal(self, rank: int, signum: int) -> None:
        w = self.workers.get(rank)
        if w is not None and w.pid and w.exitcode is None:
            self._send(w.pid, signum)

    def is_stopped(self, rank: int) -> bool:
        """Whether the worker is stopped (SIGSTOP, SIGTSTP, a tracer), not merely blocked."""
        w = self.workers.get(rank)
        if w is None or not w.pid or w.exitcode is not None:
            return False
        try:
            return psutil.Process(w.pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
        except psutil.Error:
            return False

    def signal_all(self, signum: int) -> None:
        for pid in self.live_pids():
            self._send(pid, signum)

    def pause(self) -> None:
        """SIGSTOP every worker's process group (Ctrl-Z on the launcher: the whole run pauses)."""
        for pid in self.live_pids():
            self._send_group(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self.live_pids():
            self._send_group(pid, signal.SIGCONT)


def wait(sentinels: Sequence[int], wake_fds: Sequence[int], timeout_s: float) -> set[int]:
    """The watch loops' one wait: until a sentinel or a wake-up fd is ready, or `timeout_s`.
    The wake-up fds that woke it are drained (they must be non-blocking); returns what was
    ready."""
    # Only ints go in, so only ints come out.
    ready = cast(set[int], set(wait_for_sentinels([*sentinels, *wake_fds], timeout=timeout_s)))
    for fd in wake_fds:
        if fd in ready:
            _drain(fd)
    return ready


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, OSError):
        pass

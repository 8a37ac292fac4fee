"""A node other than node 0: its launcher follows the run that node 0's master leads.

Node 0's launcher decides everything that concerns the whole world (a restart, the end of
the run); this one starts its local workers for the generation the master names, reports
how each of them ends, and stops them when the master starts a new generation or ends
the run. It learns both from a WatchRun stream, so a restart reaches every node at once,
without polling.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from ddp_launch.config import RunConfig
from ddp_launch.control.client import MasterClient
from ddp_launch.record import describe_exit
from ddp_launch.registry import RUNNING
from ddp_launch.run.group import WorkerGroup, WorkerStarter
from ddp_launch.run.supervisor import TICK_S

EXIT_MASTER_LOST = 1
_LOST = object()  # pushed by the watch thread when the stream breaks


@dataclass(frozen=True)
class FollowResult:
    exit_code: int
    message: str
    generations: int


class Follower:
    """Runs this node's workers for whatever generation the master says, until the run ends.

    Args:
        config: the run's settings (node_rank > 0).
        client: a connection to node 0's master.
        start_worker: forks one worker for (local_rank, generation).
        wakeup_fd: readable when a signal arrived, or None.
        say: prints one line for the user.
    """

    def __init__(
        self,
        config: RunConfig,
        client: MasterClient,
        start_worker: WorkerStarter,
        wakeup_fd: int | None,
        say: Callable[[str], None],
        group: WorkerGroup | None = None,
    ) -> None:
        self.config = config
        self._client = client
        self.group = group or WorkerGroup(start_worker, config.node_rank * config.nproc_per_node)
        self._wakeup_fd = wakeup_fd
        self._say = say
        self._updates: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)  # the group's wait drains it to the end
        self._pending_signal: int | None = None
        self._stream = None

    def request_stop(self, signum: int) -> None:
        if self._pending_signal is None:
            self._pending_signal = signum

    def run(self) -> FollowResult:
        watcher = threading.Thread(target=self._watch_master, name="ddp-launch-watch", daemon=True)
        watcher.start()
        try:
            return self._follow()
        finally:
            self._stop_group()
            if self._stream is not None:
                self._stream.cancel()
            watcher.join(timeout=5)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _watch_master(self) -> None:
        """Reconnects until the master answers (up to --join-timeout), then follows its stream."""
        deadline: float | None = time.monotonic() + self.config.join_timeout_s
        while True:
            try:
                stream = self._stream = self._client.watch_run(self.config.node_rank)
                for state in stream:
                    self._push(state)
                    deadline = None  # connected once: a later break means the master is gone
                    if state.state != RUNNING:
                        return
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED:
                    return
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self._push((_LOST, f"the master at {self._client.address} refused this node's token"))
                    return
            if deadline is None or time.monotonic() > deadline:
                how = "stopped answering" if deadline is None else "could not be reached"
                self._push((_LOST, f"the master at {self._client.address} {how}"))
                return
            time.sleep(0.5)

    def _push(self, item: object) -> None:
        self._updates.put(item)
        os.write(self._wake_w, b"x")

    def _follow(self) -> FollowResult:
        generation = None
        generations = 0
        wake_fds = [self._wake_r] + ([] if self._wakeup_fd is None else [self._wakeup_fd])
        while True:
            exits = self.group.wait(wake_fds, TICK_S)
            if self._pending_signal is not None:
                self._stop_group(self._pending_signal)
                name = signal.Signals(self._pending_signal).name
                return FollowResult(128 + self._pending_signal, f"stopped by {name}", generations)
            self._report_exits(exits, generation)
            while not self._updates.empty():
                update = self._updates.get()
                if isinstance(update, tuple) and update[0] is _LOST:
                    return FollowResult(EXIT_MASTER_LOST, update[1], generations)
                if update.state != RUNNING:
                    self._stop_group()
                    message = f"the run {update.state}" + (f": {update.message}" if update.message else "")
                    return FollowResult(update.exit_code, message, generations)
                if update.generation != generation:
                    self._stop_group()
                    generation = update.generation
                    generations += 1
                    self.group.start(generation, self.config.nproc_per_node)

    def _report_exits(self, exits: list, generation: int | None) -> None:
        for e in exits:
            if e.exit_code != 0:
                self._say(f"rank {e.rank} failed ({describe_exit(e.exit_code)}); waiting for the master's decision")
            try:
                self._client.report_exit(e.rank, generation or 0, e.exit_code, e.at)
            except grpc.RpcError as err:
                self._say(f"could not report rank {e.rank}'s exit to the master: {err.code().name}")

    def _stop_group(self, first_signal: int = signal.SIGTERM) -> None:
        self.group.stop(self.config.restart.stop_grace_s, first_signal)

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
EXIT_REFUSED = 2  # the master refused this node (another --nproc-per-node, a taken node rank)
_LOST = object()  # pushed by the watch thread: the master is gone for good
_REFUSED = object()  # ... the master refused this node
_BROKEN = object()  # ... the stream broke in an elastic run: stop, then try to rejoin
RETRY_S = 0.5


@dataclass(frozen=True)
class FollowResult:
    exit_code: int
    message: str
    generations: int


class Follower:
    """Runs this node's workers for whatever generation the master says, until the run ends.

    The node joins the run by opening its WatchRun stream and is a member while it is open.
    Each message names this node's rank in the generation (-1: it waits to be admitted), so
    a node rank given at rendezvous, or changed by an elastic run, takes effect at the next
    generation with nothing else to tell.

    Args:
        config: the run's settings (node_rank is not 0: a rank, or NODE_BY_ARRIVAL).
        client: a connection to node 0's master.
        start_worker: forks one worker for (local_rank, generation, node_rank).
        wakeup_fd: readable when a signal arrived, or None.
        say: prints one line for the user.
        agent_id: this launcher's identity in the run's membership.
    """

    def __init__(
        self,
        config: RunConfig,
        client: MasterClient,
        start_worker: WorkerStarter,
        wakeup_fd: int | None,
        say: Callable[[str], None],
        group: WorkerGroup | None = None,
        agent_id: str = "",
    ) -> None:
        self.config = config
        self._client = client
        self.group = group or WorkerGroup(start_worker, max(config.node_rank, 0))
        self._wakeup_fd = wakeup_fd
        self._say = say
        self.agent_id = agent_id or f"{os.uname().nodename}:{os.getpid()}"
        self._updates: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)  # the group's wait drains it to the end
        self._pending_signal: int | None = None
        self._stream = None
        self._closing = False

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
            self._closing = True
            if self._stream is not None:
                self._stream.cancel()
            watcher.join(timeout=5)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _watch_master(self) -> None:
        """Joins the run and follows its stream. Before the first message it retries until
        --join-timeout. When the stream breaks later, a fixed world's node gives up at once
        (its workers' world is gone); an elastic run's node retries (rejoins) until then."""
        address = self._client.address
        deadline: float | None = time.monotonic() + self.config.join_timeout_s
        connected_once = False
        while not self._closing:
            try:
                stream = self._stream = self._client.watch_run(
                    node_rank=self.config.node_rank, agent_id=self.agent_id, nproc_per_node=self.config.nproc_per_node
                )
                for state in stream:
                    self._push(state)
                    deadline, connected_once = None, True
                    if state.state != RUNNING:
                        return
            except grpc.RpcError as e:
                code = e.code()
                if self._closing or code == grpc.StatusCode.CANCELLED:
                    return
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    self._push(
                        (
                            _LOST,
                            f"the master at {address} refused this node's token (without --token-file it comes "
                            "from the endpoint and --rdzv-id: are they the same on every node?)",
                        )
                    )
                    return
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
                    self._push((_REFUSED, f"the master at {address} refused this node: {e.details()}"))
                    return
            if deadline is None:  # the stream broke after it had worked
                if not self.config.elastic:
                    self._push((_LOST, f"the master at {address} stopped answering"))
                    return
                self._push(
                    (
                        _BROKEN,
                        f"lost the master at {address}; rejoining for up to --join-timeout "
                        f"({self.config.join_timeout_s:g} s)",
                    )
                )
                deadline = time.monotonic() + self.config.join_timeout_s
            elif time.monotonic() > deadline:
                how = "could not be rejoined within --join-timeout" if connected_once else "could not be reached"
                self._push((_LOST, f"the master at {address} {how}"))
                return
            time.sleep(RETRY_S)

    def _push(self, item: object) -> None:
        self._updates.put(item)
        os.write(self._wake_w, b"x")

    def _follow(self) -> FollowResult:
        running: tuple[int, int] | None = None  # (generation, node rank) the group runs for
        generations = 0
        said_waiting = -2
        wake_fds = [self._wake_r] + ([] if self._wakeup_fd is None else [self._wakeup_fd])
        while True:
            exits = self.group.wait(wake_fds, TICK_S)
            if self._pending_signal is not None:
                self._stop_group(self._pending_signal)
                name = signal.Signals(self._pending_signal).name
                return FollowResult(128 + self._pending_signal, f"stopped by {name}", generations)
            self._report_exits(exits, running[0] if running else 0)
            while not self._updates.empty():
                update = self._updates.get()
                if isinstance(update, tuple):
                    kind, message = update
                    if kind is _BROKEN:
                        self._stop_group()
                        running = None
                        self._say(message)
                        continue
                    return FollowResult(EXIT_REFUSED if kind is _REFUSED else EXIT_MASTER_LOST, message, generations)
                if update.state != RUNNING:
                    self._stop_group()
                    message = f"the run {update.state}" + (f": {update.message}" if update.message else "")
                    return FollowResult(update.exit_code, message, generations)
                wanted = (update.generation, update.node_rank)
                if wanted == running:
                    continue  # another node joined: nothing changes here
                if running is not None:
                    self._stop_group()
                    running = None
                if update.generation < 0 or update.node_rank < 0:
                    if said_waiting != update.generation:
                        said_waiting = update.generation
                        self._say(
                            "joined; waiting for the first generation"
                            if update.generation < 0
                            else f"waiting to be admitted at the next generation ({update.nnodes} node(s) run now)"
                        )
                    continue
                if self.config.node_rank < 0 or self.config.elastic:
                    self._say(
                        f"generation {update.generation}: node rank {update.node_rank} of {update.nnodes} node(s)"
                    )
                running = wanted
                generations += 1
                self.group.start(update.generation, self.config.nproc_per_node, update.node_rank)

    def _report_exits(self, exits: list, generation: int) -> None:
        for e in exits:
            if e.exit_code != 0:
                self._say(f"rank {e.rank} failed ({describe_exit(e.exit_code)}); waiting for the master's decision")
            try:
                self._client.report_exit(e.rank, generation, e.exit_code, e.at)
            except grpc.RpcError as err:
                self._say(f"could not report rank {e.rank}'s exit to the master: {err.code().name}")

    def _stop_group(self, first_signal: int = signal.SIGTERM) -> None:
        """Stop the workers. Their exits are reaped here, unreported: this launcher ended
        them (a new generation, the end of the run, or the master is gone), and the master
        counts the ranks of a generation it stopped as stopped."""
        self.group.stop(self.config.restart.stop_grace_s, first_signal)
        self.group.wait([], 0)

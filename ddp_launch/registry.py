"""The run's state: ranks, generations, the start barrier, heartbeats and hang verdicts.

Thread-safe (the gRPC servicer calls it from its thread pool, the supervisor and the live
view from theirs) and free of I/O: it imports neither grpc nor torch, and takes its clock
as an argument, so it is tested as a plain object with a fake clock.

A rank's life within one generation is `record.RankState` (documented there, with who makes
each transition). Every transition is also journaled with the registry's clock at the moment
it happened (`drain_transitions`), so the event log dates an event when it happened, not
when a tick noticed it. `snapshot` gives every rank as an immutable `RankRecord`.
"""

from __future__ import annotations

import math
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ddp_launch.env import Assignment
from ddp_launch.errors import DdpLaunchError
from ddp_launch.progress import Progress
from ddp_launch.record import RankRecord, RankState, slowest

RATE_WINDOW_S = 10.0
MAX_METRICS = 32
MAX_NAME = 64
MAX_HOSTNAME = 256
MAX_TEXT = 64 * 1024


# Transitions kept for the event log between two drains; beyond this the oldest are dropped
# (a reader that never drains must not grow the master's memory).
JOURNAL_LIMIT = 100_000

__all__ = ["LostNode", "RankRecord", "RankState", "Registry", "RunSnapshot"]


class Rejected(DdpLaunchError):
    """A request the registry refuses; `reason` tells the master which gRPC code to answer."""

    INVALID = "invalid"  # out-of-range slot, bad values
    STALE = "stale"  # a generation that is not the current one
    DUPLICATE = "duplicate"  # the slot is already held by another process
    UNKNOWN = "unknown"  # a heartbeat from a rank that never registered

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def free_port(host: str) -> int:
    """A port nobody listens on right now (the kernel's pick)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class _Slot:
    """One rank's live state in the current generation (mutable, guarded by the lock).

    Only the registry sees it; everyone else gets a `RankRecord` built by `_record`.
    """

    rank: int
    node_rank: int
    local_rank: int
    state: RankState = RankState.STARTING
    state_since: float = 0.0
    pid: int = 0
    hostname: str = ""
    registered_at: float | None = None
    last_heartbeat_at: float | None = None
    progress: Progress = field(default_factory=Progress)
    loss: float | None = None  # the last finite loss: a heartbeat without one keeps it
    last_step_change_at: float | None = None
    heartbeats: int = 0
    # (time, rate step) of this generation's recent heartbeats; see _rate_step
    rate_window: deque[tuple[float, int]] = field(default_factory=deque)
    rate_source: str = ""
    rss_bytes: int = 0
    cpu_percent: float = 0.0
    exit_code: int | None = None
    exited_at: float | None = None  # unix time its launcher saw it end, when reported
    slow_since: float | None = None  # when its rate first fell below the straggler threshold
    straggler: bool = False
    exception_type: str = ""
    traceback: str = ""


@dataclass(frozen=True)
class RunSnapshot:
    """The whole run at one moment of the registry's clock (`taken_at`)."""

    run_id: str
    world_size: int
    generation: int
    max_restarts: int
    elapsed_s: float
    total_steps: int  # 0 when no script reported one
    barrier_open: bool
    ranks: tuple[RankRecord, ...]
    taken_at: float = 0.0
    restarts: int = 0  # generations begun after a failure (an elastic resize is none)
    nnodes: int = 1

    @property
    def step(self) -> int:
        """The world's progress: the slowest rank's step (DDP ranks move together)."""
        return min((r.step for r in self.ranks), default=0)

    @property
    def step_reported(self) -> bool:
        """Whether `step` is the script's own (every rank reported one), not optimizer steps."""
        return bool(self.ranks) and all(r.reported_step is not None for r in self.ranks)

    @property
    def optimizer_steps(self) -> int:
        """The slowest rank's optimizer steps in this generation."""
        return min((r.optimizer_steps for r in self.ranks), default=0)

    @property
    def samples(self) -> int:
        """Samples processed, as the script reported them: by `report()`'s contract each rank
        reports the world's count, so the largest report is the world's progress."""
        return max((r.samples for r in self.ranks), default=0)

    @property
    def loss(self) -> float | None:
        """The mean over ranks of each rank's last reported loss (not the script's own
        reduction of it)."""
        losses = [r.loss for r in self.ranks if r.loss is not None]
        return sum(losses) / len(losses) if losses else None

    @property
    def step_total(self) -> int:
        """What `step` is out of: the script's total when the step is the script's own, else 0
        (optimizer steps of one generation are not steps of the script's total)."""
        return self.total_steps if self.step_reported else 0

    @property
    def slowest(self) -> RankRecord | None:
        """The rank with the lowest step rate among those that have one; training ranks first."""
        return slowest(self.ranks)

    @property
    def rate_spread(self) -> tuple[float, float, float] | None:
        """(min, median, max) of the ranks' rates, over the ranks that have one."""
        rates = sorted(r.steps_per_s for r in self.ranks if r.steps_per_s > 0)
        return (rates[0], statistics.median(rates), rates[-1]) if rates else None

    @property
    def steps_per_s(self) -> float | None:
        """The median of the training ranks' rates (of all ranks' once none trains), the
        world's rate: DDP ranks move together. None while no rank has one."""
        training = [r.steps_per_s for r in self.ranks if r.steps_per_s > 0 and r.state is RankState.TRAINING]
        rates = training or [r.steps_per_s for r in self.ranks if r.steps_per_s > 0]
        return statistics.median(rates) if rates else None


@dataclass(frozen=True)
class Transition:
    """One thing that happened to the run, at `at` (the registry's clock).

    kind is "register", "barrier_open", "state", "straggler" or "straggler_cleared";
    `record` is the rank as it was right after (None for barrier_open).
    """

    at: float
    kind: str
    generation: int
    record: RankRecord | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HangVerdict:
    rank: int
    reason: str
    stalled_for_s: float
    last_sign_of_life: float  # clock time; the smallest stopped first


RUNNING = "running"
# Node 0's own launcher, in the membership: it holds the master, so it is node 0 always.
MASTER_AGENT = "node-0"


@dataclass(frozen=True)
class RunState:
    """What a node's launcher follows: the current generation, its nodes, how the run ended.

    `nodes` holds the agent id of each node rank of `generation` ("" for a rank no node has
    taken yet); generation -1 is an elastic run's first rendezvous, before any generation.
    """

    generation: int
    state: str  # RUNNING, or the outcome ("succeeded", "failed", ...)
    message: str = ""
    exit_code: int = 0
    nodes: tuple[str, ...] = ()

    def node_rank_of(self, agent_id: str) -> int:
        """`agent_id`'s node rank in this generation, or -1 when it is not one of its nodes."""
        return self.nodes.index(agent_id) if agent_id and agent_id in self.nodes else -1


@dataclass
class _Agent:
    """A node's launcher that follows the run (a WatchRun stream)."""

    agent_id: str
    hostname: str
    serial: int  # which of its streams holds the membership (a rejoin replaces it)
    joined_at: float
    seen_at: float  # its last node heartbeat (or its join)
    # An elastic run dropped it for its silence: it is admitted again only once it joins
    # again (a new stream), not when its heartbeats come back on the old one.
    evicted: bool = False


@dataclass(frozen=True)
class LostNode:
    node_rank: int
    hostname: str
    why: str

    @property
    def where(self) -> str:
        return f"node {self.node_rank}" + (f" ({self.hostname})" if self.hostname else "")


@dataclass(frozen=True)
class BarrierResult:
    open: bool
    superseded: bool


class Registry:
    """The master's state for one run. See the module docstring for the rank life cycle."""

    def __init__(
        self,
        *,
        run_id: str,
        nnodes: int,
        local_world_size: int,
        max_restarts: int,
        ddp_addr: str,
        ddp_port: int | None = None,
        port_picker: Callable[[str], int] = free_port,
        clock: Callable[[], float] = time.monotonic,
        min_nodes: int | None = None,
        barrier_waits_for_rank0: bool = False,
    ) -> None:
        self.run_id = run_id
        # The launcher's workers: rank 0 serves the DDP store before it waits at the barrier,
        # and the barrier opens only then (see _maybe_open_barrier).
        self._wait_for_rank0 = barrier_waits_for_rank0
        # The most nodes; an elastic run (min_nodes < max_nodes) has `nnodes` of them in the
        # current generation, chosen by the supervisor when it begins (begin_generation).
        self.max_nodes = nnodes
        self.min_nodes = nnodes if min_nodes is None else min_nodes
        self.elastic = self.min_nodes < self.max_nodes
        self.nnodes = 0 if self.elastic else nnodes
        self.local_world_size = local_world_size
        self.world_size = self.nnodes * local_world_size
        self.max_restarts = max_restarts
        self.ddp_addr = ddp_addr
        self._fixed_ddp_port = ddp_port
        self._port_picker = port_picker
        self._clock = clock
        self._started_at = clock()
        self._cond = threading.Condition()
        self._total_steps = 0
        self.generation = -1
        self.restarts = 0
        self.ddp_port = 0
        self._slots: list[_Slot] = []
        self._registered = 0
        self._rank0_at_barrier = False
        self._barrier_is_open = False
        self._end: RunState | None = None
        # The state a worker's exit is recorded as once the group is being stopped (begin_stop).
        self._stopping: RankState | None = None
        self._journal: deque[Transition] = deque(maxlen=JOURNAL_LIMIT)
        self._agents: dict[str, _Agent] = {}
        self._serial = 0
        self._lost_nodes: dict[int, LostNode] = {}
        # The agent of each node rank: fixed for the run unless it is elastic ("" untaken).
        self._nodes: list[str] = [] if self.elastic else [MASTER_AGENT] + [""] * (nnodes - 1)
        if not self.elastic:  # an elastic run's first generation begins after its rendezvous
            self.begin_generation(0)

    # -- generations and registration --------------------------------------------------

    def begin_generation(self, generation: int, nodes: list[str] | None = None, *, restart: bool = True) -> None:
        """Start generation `generation`: all slots empty, a fresh DDP port, barrier closed.

        `nodes` (an elastic run only) are the agent ids of its nodes in node-rank order,
        MASTER_AGENT first; node ranks and the world size change only here. `restart`: it
        follows a failure (what --max-restarts counts), not a change of membership.
        """
        with self._cond:
            if generation <= self.generation:
                raise ValueError(f"generation {generation} is not after {self.generation}")
            if nodes is not None:
                if not self.elastic:
                    raise ValueError("a fixed world's nodes do not change")
                if not nodes or nodes[0] != MASTER_AGENT or len(nodes) > self.max_nodes:
                    raise ValueError(f"bad node list {nodes}")
                self._nodes = list(nodes)
                self.nnodes = len(nodes)
                self.world_size = self.nnodes * self.local_world_size
            elif self.elastic:
                raise ValueError("an elastic generation needs its nodes")
            if generation > 0 and restart:
                self.restarts += 1
            self.generation = generation
            self.ddp_port = self._fixed_ddp_port or self._port_picker(self.ddp_addr)
            now = self._clock()
            self._slots = [
                _Slot(
                    rank=r, node_rank=r // self.local_world_size, local_rank=r % self.local_world_size, state_since=now
                )
                for r in range(self.world_size)
            ]
            self._registered = 0
            self._rank0_at_barrier = False
            self._barrier_is_open = False
            self._stopping = None
            self._lost_nodes = {}
            self._cond.notify_all()  # wakes barrier waiters of the old generation: superseded

    def register(
        self, *, node_rank: int, local_rank: int, pid: int, hostname: str, generation: int, any_slot: bool = False
    ) -> Assignment:
        """Give the worker at (node_rank, local_rank) its rank; ranks are contiguous per node.

        With `any_slot` (a worker started by hand), the worker gets the lowest free rank.

        Raises:
            Rejected: bad slot, stale generation, a slot already held by another pid, or
                (any_slot) no free slot left.
        """
        if pid <= 0:
            raise Rejected(Rejected.INVALID, f"pid must be positive, got {pid}")
        if len(hostname) > MAX_HOSTNAME:
            raise Rejected(Rejected.INVALID, f"hostname longer than {MAX_HOSTNAME} characters")
        with self._cond:
            self._check_generation(generation)
            if any_slot:
                held = next(
                    (s for s in self._slots if s.registered_at is not None and s.pid == pid and s.hostname == hostname),
                    None,
                )
                free = held or next((s for s in self._slots if s.state is RankState.STARTING), None)
                if free is None:
                    raise Rejected(Rejected.DUPLICATE, f"all {self.world_size} ranks are taken")
                node_rank, local_rank = free.node_rank, free.local_rank
            if not 0 <= node_rank < self.nnodes:
                raise Rejected(Rejected.INVALID, f"node rank {node_rank} outside [0, {self.nnodes})")
            if not 0 <= local_rank < self.local_world_size:
                raise Rejected(Rejected.INVALID, f"local rank {local_rank} outside [0, {self.local_world_size})")
            rank = node_rank * self.local_world_size + local_rank
            slot = self._slots[rank]
            if slot.state is not RankState.STARTING:
                if (slot.pid, slot.hostname) == (pid, hostname):  # a retried RPC whose reply was lost
                    return self._assignment(slot)
                if slot.registered_at is None:  # its worker died before registering
                    raise Rejected(
                        Rejected.DUPLICATE,
                        f"rank {rank} already ended in generation {generation} (exit code {slot.exit_code}) "
                        "before it registered",
                    )
                raise Rejected(Rejected.DUPLICATE, f"rank {rank} is already registered by pid {slot.pid}")
            now = self._clock()
            slot.pid = pid
            slot.hostname = hostname
            slot.registered_at = now
            self._set_state(slot, RankState.WAITING, now, "register")
            self._registered += 1
            self._maybe_open_barrier(now)
            return self._assignment(slot)

    def _maybe_open_barrier(self, now: float) -> None:
        """The barrier opens once every rank has registered, and (barrier_waits_for_rank0)
        rank 0 waits at it: rank 0's worker serves the DDP store before it comes to the
        barrier, so no rank that passes it finds the store missing (the lock is held)."""
        if self._barrier_is_open or self._registered != self.world_size:
            return
        if self._wait_for_rank0 and not self._rank0_at_barrier:
            return
        self._barrier_is_open = True
        for s in self._slots:
            if s.state is RankState.WAITING:  # not one that already exited
                s.state, s.state_since = RankState.TRAINING, now
                s.last_heartbeat_at = now  # the heartbeat clock starts at the barrier
        self._journal.append(Transition(now, "barrier_open", self.generation, fields={"world_size": self.world_size}))
        self._cond.notify_all()

    def _assignment(self, slot: _Slot) -> Assignment:
        return Assignment(
            rank=slot.rank,
            local_rank=slot.local_rank,
            world_size=self.world_size,
            local_world_size=self.local_world_size,
            node_rank=slot.node_rank,
            nnodes=self.nnodes,
            ddp_addr=self.ddp_addr,
            ddp_port=self.ddp_port,
            run_id=self.run_id,
            generation=self.generation,
            max_restarts=self.max_restarts,
        )

    def _check_generation(self, generation: int) -> None:
        if generation != self.generation:
            raise Rejected(Rejected.STALE, f"generation {generation} is not the current one ({self.generation})")

    def _registered_slot(self, rank: int, generation: int, pid: int | None = None) -> _Slot:
        if not 0 <= rank < self.world_size:
            raise Rejected(Rejected.INVALID, f"rank {rank} outside [0, {self.world_size})")
        self._check_generation(generation)
        slot = self._slots[rank]
        # registered_at, not the state: a rank that died before registering is FAILED
        # but still unknown (and its pid 0 must not match a request's).
        if slot.registered_at is None:
            raise Rejected(Rejected.UNKNOWN, f"rank {rank} has not registered in generation {generation}")
        if pid is not None and pid != slot.pid:
            raise Rejected(Rejected.DUPLICATE, f"rank {rank} is registered by pid {slot.pid}, not {pid}")
        return slot

    @property
    def barrier_open(self) -> bool:
        with self._cond:
            return self._barrier_is_open

    def wait_barrier(self, *, rank: int, generation: int, timeout_s: float) -> BarrierResult:
        """Block until the barrier of `generation` opens (every rank registered, rank 0 waits
        here), the generation ends, or timeout."""
        with self._cond:
            if generation < self.generation:
                return BarrierResult(open=False, superseded=True)
            self._registered_slot(rank, generation)
            if rank == 0 and not self._rank0_at_barrier:
                self._rank0_at_barrier = True
                self._maybe_open_barrier(self._clock())
            self._cond.wait_for(
                lambda: self.generation != generation or self._barrier_is_open, timeout=max(0.0, timeout_s)
            )
            if self.generation != generation:
                return BarrierResult(open=False, superseded=True)
            return BarrierResult(open=self._barrier_is_open, superseded=False)

    # -- progress ------------------------------------------------------------------------

    def heartbeat(self, *, rank: int, generation: int, pid: int, progress: Progress) -> bool:
        """Record a worker's progress. Returns True when its generation is over (superseded).

        Raises:
            Rejected: unknown rank, a pid that does not hold the slot, or bad values.
        """
        p = progress
        if p.optimizer_steps < 0 or (p.reported_step or 0) < 0 or p.samples < 0 or p.total_steps < 0:
            raise Rejected(Rejected.INVALID, "steps, samples and total_steps must be >= 0")
        if len(p.metrics) > MAX_METRICS:
            raise Rejected(Rejected.INVALID, f"{len(p.metrics)} metrics in one heartbeat; at most {MAX_METRICS}")
        for name, value in p.metrics.items():
            if not name or len(name) > MAX_NAME:
                raise Rejected(Rejected.INVALID, f"metric names must have 1..{MAX_NAME} characters")
            if not math.isfinite(value):
                raise Rejected(Rejected.INVALID, f"metric {name!r} is not a finite number ({value})")
        # A diverged loss is reported as missing, not allowed to poison means.
        loss = p.loss if p.loss is not None and math.isfinite(p.loss) else None
        with self._cond:
            if generation < self.generation:
                return True
            slot = self._registered_slot(rank, generation, pid)
            now = self._clock()
            step = p.step
            # The first heartbeat sets the baseline (a resumed run may start at any step);
            # the step rule of find_hung applies once the step has moved from it.
            if slot.heartbeats and step != slot.progress.step:
                # Dated by the worker's own clock where it can be: a stall then counts from the
                # step itself, not from the heartbeat that saw it (up to an interval later),
                # but never from before the previous heartbeat.
                age = p.step_age_s if math.isfinite(p.step_age_s) and p.step_age_s > 0 else 0.0
                slot.last_step_change_at = max(now - age, slot.last_heartbeat_at or now)
            slot.heartbeats += 1
            slot.last_heartbeat_at = now
            slot.progress = p
            if loss is not None:
                slot.loss = loss
            if p.total_steps:
                self._total_steps = p.total_steps
            self._add_rate_point(slot, now, p)
            return False

    @staticmethod
    def _add_rate_point(slot: _Slot, now: float, p: Progress) -> None:
        """The rate counts optimizer steps when the script steps an optimizer (they are this
        generation's own work, whatever step a resume starts from), else its reported steps.
        A change of source, or a step going backwards, starts the window afresh, so a jump to
        a checkpoint's step is never a rate."""
        if p.optimizer_steps == 0 and p.reported_step is not None:
            source, value = "reported", p.reported_step
        else:
            source, value = "optimizer", p.optimizer_steps
        window = slot.rate_window
        if source != slot.rate_source or (window and value < window[-1][1]):
            window.clear()
            slot.rate_source = source
        window.append((now, value))
        while len(window) > 2 and now - window[0][0] > RATE_WINDOW_S:
            window.popleft()

    def report_failure(self, *, rank: int, generation: int, pid: int, exception_type: str, traceback: str) -> None:
        with self._cond:
            slot = self._registered_slot(rank, generation, pid)
            slot.exception_type = exception_type[:256]
            slot.traceback = traceback[-MAX_TEXT:]

    # -- what the supervisor tells us ------------------------------------------------------

    def record_exit(self, rank: int, generation: int, exit_code: int, exited_at: float | None = None) -> None:
        """How a worker ended (reported by the launcher of its node). An old generation's exit
        changes nothing: a node's launcher may report a worker that ended while a restart
        stopped it.

        Raises:
            Rejected: a rank that does not exist, or a generation that has not begun.
        """
        if not 0 <= rank < self.world_size:
            raise Rejected(Rejected.INVALID, f"rank {rank} outside [0, {self.world_size})")
        with self._cond:
            if generation > self.generation:
                raise Rejected(
                    Rejected.STALE,
                    f"generation {generation} has not begun (the run is at generation {self.generation})",
                )
            if generation < self.generation:
                return
            slot = self._slots[rank]
            if slot.exit_code is not None:
                return  # reported twice (the follower and a retry): the first one counts
            slot.exit_code = exit_code
            slot.exited_at = exited_at
            now = self._clock()
            if slot.state is RankState.HUNG:  # the verdict stands; the exit is how it ended
                return
            state = RankState.DONE if exit_code == 0 else self._stopping or RankState.FAILED
            self._set_state(slot, state, now, "state")

    def begin_stop(self, generation: int, *, interrupted: bool) -> None:
        """Node 0's launcher is stopping generation `generation`'s group: a worker that ends
        from now on was ended by it (STOPPED), or by the user's signal it forwarded
        (INTERRUPTED), and did not fail."""
        with self._cond:
            if generation == self.generation:
                self._stopping = RankState.INTERRUPTED if interrupted else RankState.STOPPED

    def failed_ranks(self) -> list[RankRecord]:
        """The current generation's failed ranks (a cheap look: only those are built)."""
        with self._cond:
            now = self._clock()
            return [self._record(s, self.generation, now) for s in self._slots if s.state is RankState.FAILED]

    @property
    def all_done(self) -> bool:
        with self._cond:
            return all(s.state is RankState.DONE for s in self._slots)

    # -- the run as node launchers follow it -----------------------------------------------

    def end_run(self, state: str, message: str, exit_code: int) -> None:
        """The run is over: every node's launcher stops its workers and exits with exit_code."""
        with self._cond:
            self._end = RunState(self.generation, state, message, exit_code, tuple(self._nodes))
            self._cond.notify_all()

    # -- membership: the nodes' launchers -------------------------------------------------

    def join(self, agent_id: str, hostname: str, nproc_per_node: int, node_rank: int = -1) -> int:
        """A node's launcher follows the run (its WatchRun stream opened); returns the
        stream's serial, which `leave` names.

        In a fixed world the node takes `node_rank`, or the lowest untaken one (-1), for the
        whole run. In an elastic run it waits until the supervisor names it in a generation.
        A join from an agent that already holds a node of the current generation (its
        launcher lost the master and came back) ends that node's part of the generation.

        Raises:
            Rejected: another --nproc-per-node, a node rank out of range or taken, no rank left.
        """
        if not agent_id or agent_id == MASTER_AGENT:
            raise Rejected(Rejected.INVALID, f"bad agent id {agent_id!r}")
        if len(hostname) > MAX_HOSTNAME:
            raise Rejected(Rejected.INVALID, f"hostname longer than {MAX_HOSTNAME} characters")
        if nproc_per_node != self.local_world_size:
            raise Rejected(
                Rejected.INVALID,
                f"this node runs --nproc-per-node {nproc_per_node}; the run has {self.local_world_size} per node",
            )
        with self._cond:
            now = self._clock()
            if agent_id in self._nodes:
                self._lose(self._nodes.index(agent_id), hostname, "its launcher lost the master and rejoined")
            if not self.elastic:
                self._take_node_rank(agent_id, hostname, node_rank)
            self._serial += 1
            previous = self._agents.get(agent_id)
            self._agents[agent_id] = _Agent(
                agent_id, hostname, self._serial, previous.joined_at if previous else now, now
            )
            self._cond.notify_all()
            return self._serial

    def _take_node_rank(self, agent_id: str, hostname: str, node_rank: int) -> None:
        if node_rank < 0 and agent_id in self._nodes:  # a rejoin keeps its rank for the run
            node_rank = self._nodes.index(agent_id)
        if node_rank < 0:
            free = [r for r, a in enumerate(self._nodes) if r > 0 and a == ""]
            if not free:
                raise Rejected(Rejected.DUPLICATE, f"all {self.max_nodes} node ranks of this run are taken")
            node_rank = free[0]
        if not 0 < node_rank < self.max_nodes:
            raise Rejected(Rejected.INVALID, f"node rank {node_rank} outside [1, {self.max_nodes})")
        holder = self._nodes[node_rank]
        if holder not in ("", agent_id):
            other = self._agents.get(holder)
            raise Rejected(
                Rejected.DUPLICATE,
                f"node rank {node_rank} is taken by the launcher on {other.hostname if other else holder}",
            )
        self._nodes = ["" if a == agent_id else a for a in self._nodes]  # one rank per node
        self._nodes[node_rank] = agent_id

    def leave(self, agent_id: str, serial: int) -> None:
        """The agent's stream `serial` ended. While the run goes on, a node of the current
        generation is then lost: its workers cannot be supervised any more."""
        with self._cond:
            agent = self._agents.get(agent_id)
            if agent is None or agent.serial != serial:
                return  # a stream a rejoin replaced
            del self._agents[agent_id]
            if agent_id in self._nodes:
                node_rank = self._nodes.index(agent_id)
                if self._end is None:
                    self._lose(node_rank, agent.hostname, "its launcher stopped answering the master")
                if not self.elastic:
                    self._nodes[node_rank] = ""  # a node that replaces it may take the rank
            self._cond.notify_all()

    def node_seen(self, agent_id: str) -> None:
        """A node heartbeat (a relay's batch): the node's launcher is there."""
        with self._cond:
            agent = self._agents.get(agent_id)
            if agent is not None:
                agent.seen_at = self._clock()

    def _lose(self, node_rank: int, hostname: str, why: str) -> None:
        if node_rank > 0 and node_rank not in self._lost_nodes:
            host = hostname or next((s.hostname for s in self._slots if s.node_rank == node_rank and s.hostname), "")
            self._lost_nodes[node_rank] = LostNode(node_rank, host, why)

    def lost_nodes(self, silent_after_s: float | None = None) -> list[LostNode]:
        """The current generation's nodes that are gone: their launcher left, rejoined, or (with
        `silent_after_s`) sent no node heartbeat for that long (a cut link sends no reset)."""
        with self._cond:
            if silent_after_s is not None:
                now = self._clock()
                for node_rank, agent_id in enumerate(self._nodes):
                    agent = self._agents.get(agent_id)
                    if node_rank > 0 and agent is not None and now - agent.seen_at > silent_after_s:
                        why = f"no heartbeat from its launcher for {now - agent.seen_at:.0f} s"
                        self._lose(node_rank, agent.hostname, why)
                        agent.evicted = self.elastic
            return [self._lost_nodes[n] for n in sorted(self._lost_nodes)]

    def live_agents(self, silent_after_s: float | None = None) -> list[str]:
        """The following nodes' agent ids, in the order they first joined, without those silent
        for `silent_after_s` and those dropped for it (one that left is no agent any more;
        one that joined again is live)."""
        with self._cond:
            now = self._clock()
            agents = sorted(self._agents.values(), key=lambda a: (a.joined_at, a.agent_id))
            return [
                a.agent_id
                for a in agents
                if not a.evicted and (silent_after_s is None or now - a.seen_at <= silent_after_s)
            ]

    def evicted(self, agent_id: str, serial: int) -> bool:
        """Whether stream `serial` of the agent belongs to a node dropped for its silence
        (the master ends that stream, so that the node joins again)."""
        with self._cond:
            agent = self._agents.get(agent_id)
            return agent is not None and agent.serial == serial and agent.evicted

    def waiting_agents(self, silent_after_s: float | None = None) -> list[str]:
        """Live agents that hold no node of the current generation (they wait to be admitted)."""
        live = self.live_agents(silent_after_s)
        with self._cond:
            return [a for a in live if a not in self._nodes]

    def agent_hostname(self, agent_id: str) -> str:
        with self._cond:
            agent = self._agents.get(agent_id)
            return agent.hostname if agent else ""

    @property
    def nodes(self) -> tuple[str, ...]:
        with self._cond:
            return tuple(self._nodes)

    def run_state(self) -> RunState:
        with self._cond:
            return self._end or RunState(self.generation, RUNNING, nodes=tuple(self._nodes))

    def wait_run_change(self, seen: RunState | None, timeout_s: float) -> RunState:
        """Block until the run's state differs from `seen` (a restart, the end), or timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self.run_state() != seen, timeout=max(0.0, timeout_s))
            return self.run_state()

    def record_process_stats(self, rank: int, *, rss_bytes: int, cpu_percent: float) -> None:
        with self._cond:
            slot = self._slots[rank]
            slot.rss_bytes = rss_bytes
            slot.cpu_percent = cpu_percent

    def mark_hung(self, rank: int) -> None:
        with self._cond:
            slot = self._slots[rank]
            if not slot.state.final:
                self._set_state(slot, RankState.HUNG, self._clock(), "state")

    def excuse_pause(self) -> None:
        """The whole run was paused (Ctrl-Z) and goes on: nobody was silent or stalled by
        itself, so the hang clocks of every rank start again from now."""
        with self._cond:
            now = self._clock()
            for s in self._slots:
                if s.last_heartbeat_at is not None:
                    s.last_heartbeat_at = now
                if s.last_step_change_at is not None:
                    s.last_step_change_at = now

    def find_hung(self, hang_timeout_s: float) -> list[HangVerdict]:
        """Training ranks that sent no heartbeat, or made no step, for `hang_timeout_s`.

        The step rule applies once a rank has completed its first step. Verdicts come in the
        order the ranks stopped: the first is the likeliest root cause (its peers then stall
        in the next collective).
        """
        if hang_timeout_s <= 0:
            return []
        now = self._clock()
        verdicts = []
        with self._cond:
            for s in self._slots:
                if s.state is not RankState.TRAINING or s.last_heartbeat_at is None:
                    continue
                silent_for = now - s.last_heartbeat_at
                if silent_for > hang_timeout_s:
                    verdicts.append(
                        HangVerdict(s.rank, f"no heartbeat for {silent_for:.0f} s", silent_for, s.last_heartbeat_at)
                    )
                elif s.last_step_change_at is not None:
                    stalled_for = now - s.last_step_change_at
                    if stalled_for > hang_timeout_s:
                        verdicts.append(
                            HangVerdict(
                                s.rank,
                                f"step {s.progress.step} has not advanced for {stalled_for:.0f} s",
                                stalled_for,
                                s.last_step_change_at,
                            )
                        )
            verdicts.sort(key=lambda v: (v.last_sign_of_life, self._slots[v.rank].progress.step, v.rank))
        return verdicts

    def update_stragglers(self, fraction: float, window_s: float) -> list[int]:
        """Flag training ranks whose step rate stayed below `fraction` x the median rate of
        the training ranks for `window_s`; returns the ranks newly flagged.

        A rank recovers (loses the flag) as soon as its rate is back above the threshold.
        """
        if fraction <= 0:
            return []
        now = self._clock()
        flagged = []
        with self._cond:
            rates = {s.rank: self._rate(s) for s in self._slots if s.state is RankState.TRAINING}
            measured = [r for r in rates.values() if r > 0]
            if len(measured) < 2:
                return []
            median = statistics.median(measured)
            for s in self._slots:
                rate = rates.get(s.rank)
                if rate is None or len(s.rate_window) < 2 or rate >= fraction * median:
                    s.slow_since = None
                    # Cleared as an event only when it recovered: a rank that stopped training
                    # (it failed, it finished) did not catch up.
                    if s.straggler and rate is not None:
                        s.straggler = False
                        record = self._record(s, self.generation, now, rate or 0.0)
                        self._journal.append(Transition(now, "straggler_cleared", self.generation, record))
                    s.straggler = False
                    continue
                if s.slow_since is None:
                    s.slow_since = now
                if not s.straggler and now - s.slow_since >= window_s:
                    s.straggler = True
                    flagged.append(s.rank)
                    self._journal.append(
                        Transition(
                            now,
                            "straggler",
                            self.generation,
                            self._record(s, self.generation, now, rate),
                            {"median_steps_per_s": median},
                        )
                    )
        return flagged

    def unregistered_ranks(self) -> list[int]:
        with self._cond:
            return [s.rank for s in self._slots if s.state is RankState.STARTING]

    # -- views ---------------------------------------------------------------------------

    def snapshot(self) -> RunSnapshot:
        now = self._clock()
        # Under the lock only a flat copy of each slot (its attribute dict) and its rate: the
        # records (thousands at a large world) are built after the lock is released, so
        # heartbeats never wait for them.
        with self._cond:
            generation, total_steps = self.generation, self._total_steps
            restarts, nnodes, world_size = self.restarts, self.nnodes, self.world_size
            barrier_open = self._barrier_is_open
            rows = [(vars(s).copy(), self._rate(s)) for s in self._slots]
        return RunSnapshot(
            run_id=self.run_id,
            world_size=world_size,
            generation=generation,
            max_restarts=self.max_restarts,
            elapsed_s=now - self._started_at,
            total_steps=total_steps,
            barrier_open=barrier_open,
            ranks=tuple(_record_of(row, rate, generation, now, total_steps) for row, rate in rows),
            taken_at=now,
            restarts=restarts,
            nnodes=nnodes,
        )

    def drain_transitions(self) -> list[Transition]:
        """What happened since the last call, oldest first, each dated when it happened."""
        with self._cond:
            out = list(self._journal)
            self._journal.clear()
        return out

    # -- internals (the lock is held) ------------------------------------------------------

    def _set_state(self, slot: _Slot, state: RankState, now: float, kind: str) -> None:
        previous = slot.state
        slot.state, slot.state_since = state, now
        record = self._record(slot, self.generation, now)
        self._journal.append(Transition(now, kind, self.generation, record, {"previous": previous.value}))

    def _record(self, s: _Slot, generation: int, now: float, rate: float | None = None) -> RankRecord:
        return _record_of(vars(s), self._rate(s) if rate is None else rate, generation, now, self._total_steps)

    @staticmethod
    def _rate(s: _Slot) -> float:
        if len(s.rate_window) < 2:
            return 0.0
        (t0, s0), (t1, s1) = s.rate_window[0], s.rate_window[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0


def _record_of(slot: dict[str, Any], rate: float, generation: int, now: float, total_steps: int) -> RankRecord:
    """The one place a rank's record is built: from a slot's attributes (`vars(slot)`)."""
    p: Progress = slot["progress"]
    last_heartbeat_at = slot["last_heartbeat_at"]
    return RankRecord(
        rank=slot["rank"],
        node_rank=slot["node_rank"],
        local_rank=slot["local_rank"],
        generation=generation,
        state=slot["state"],
        pid=slot["pid"],
        hostname=slot["hostname"],
        optimizer_steps=p.optimizer_steps,
        reported_step=p.reported_step,
        samples=p.samples,
        steps_per_s=rate,
        loss=slot["loss"],
        # A heartbeat replaces a progress's metrics dict, never changes it: no copy needed.
        metrics=p.metrics,
        total_steps=total_steps,
        rss_bytes=slot["rss_bytes"],
        cpu_percent=slot["cpu_percent"],
        heartbeat_age_s=None if last_heartbeat_at is None else now - last_heartbeat_at,
        exit_code=slot["exit_code"],
        exited_at=slot["exited_at"],
        exception_type=slot["exception_type"],
        traceback=slot["traceback"],
        straggler=slot["straggler"],
        state_since_s=slot["state_since"],
    )

"""The run's state: ranks, generations, the start barrier, heartbeats and hang verdicts.

Thread-safe (the gRPC servicer calls it from its thread pool, the supervisor and the live
view from theirs) and free of I/O: it imports neither grpc nor torch, and takes its clock
as an argument, so it is tested as a plain object with a fake clock.

A rank's life within one generation (RankState)::

    STARTING --register--> WAITING --barrier opens--> TRAINING --exit 0--> DONE
                                                          |
                                                          +--> HUNG (verdict) / FAILED (exit != 0)

A restart begins a new generation: every slot goes back to STARTING and workers of an
older generation are told they are superseded.
"""

from __future__ import annotations

import enum
import math
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ddp_launch.env import Assignment
from ddp_launch.errors import DdpLaunchError

RATE_WINDOW_S = 10.0
MAX_METRICS = 32
MAX_NAME = 64
MAX_HOSTNAME = 256
MAX_TEXT = 64 * 1024


class RankState(enum.Enum):
    STARTING = "starting"
    WAITING = "waiting"
    TRAINING = "training"
    HUNG = "hung"
    FAILED = "failed"
    DONE = "done"


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
    """One rank's live record in the current generation (mutable, guarded by the lock)."""

    rank: int
    node_rank: int
    local_rank: int
    state: RankState = RankState.STARTING
    pid: int = 0
    hostname: str = ""
    registered_at: float | None = None
    last_heartbeat_at: float | None = None
    step: int = 0
    samples: int = 0
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    last_step_change_at: float | None = None
    heartbeats: int = 0
    rate_window: deque[tuple[float, int]] = field(default_factory=deque)
    rss_bytes: int = 0
    cpu_percent: float = 0.0
    exit_code: int | None = None
    slow_since: float | None = None  # when its rate first fell below the straggler threshold
    straggler: bool = False
    exception_type: str = ""
    traceback: str = ""


@dataclass(frozen=True, slots=True)  # slots: half the cost to build, a thousand per snapshot
class RankView:
    """A rank as the live view, the status command and the failure report see it."""

    rank: int
    node_rank: int
    local_rank: int
    state: RankState
    generation: int
    pid: int
    hostname: str
    step: int
    samples: int
    steps_per_s: float
    loss: float | None
    metrics: Mapping[str, float]
    rss_bytes: int
    cpu_percent: float
    heartbeat_age_s: float | None
    exit_code: int | None
    exception_type: str
    traceback: str
    straggler: bool = False


@dataclass(frozen=True)
class RunSnapshot:
    run_id: str
    world_size: int
    generation: int
    max_restarts: int
    elapsed_s: float
    total_steps: int  # 0 when no script reported one
    barrier_open: bool
    ranks: tuple[RankView, ...]

    @property
    def step(self) -> int:
        """The world's progress: the slowest rank's step (DDP ranks move together)."""
        return min((r.step for r in self.ranks), default=0)

    @property
    def loss(self) -> float | None:
        losses = [r.loss for r in self.ranks if r.loss is not None]
        return sum(losses) / len(losses) if losses else None


@dataclass(frozen=True)
class HangVerdict:
    rank: int
    reason: str
    stalled_for_s: float
    last_sign_of_life: float  # clock time; the smallest stopped first


RUNNING = "running"


@dataclass(frozen=True)
class RunState:
    """What a node's launcher follows: the current generation, and how the run ended."""

    generation: int
    state: str  # RUNNING, or the outcome ("succeeded", "failed", ...)
    message: str = ""
    exit_code: int = 0


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
    ) -> None:
        self.run_id = run_id
        self.nnodes = nnodes
        self.local_world_size = local_world_size
        self.world_size = nnodes * local_world_size
        self.max_restarts = max_restarts
        self.ddp_addr = ddp_addr
        self._fixed_ddp_port = ddp_port
        self._port_picker = port_picker
        self._clock = clock
        self._started_at = clock()
        self._cond = threading.Condition()
        self._total_steps = 0
        self.generation = -1
        self.ddp_port = 0
        self._slots: list[_Slot] = []
        self._registered = 0
        self._end: RunState | None = None
        self.begin_generation(0)

    # -- generations and registration --------------------------------------------------

    def begin_generation(self, generation: int) -> None:
        """Start generation `generation`: all slots empty, a fresh DDP port, barrier closed."""
        with self._cond:
            if generation <= self.generation:
                raise ValueError(f"generation {generation} is not after {self.generation}")
            self.generation = generation
            self.ddp_port = self._fixed_ddp_port or self._port_picker(self.ddp_addr)
            self._slots = [
                _Slot(rank=r, node_rank=r // self.local_world_size, local_rank=r % self.local_world_size)
                for r in range(self.world_size)
            ]
            self._registered = 0
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
            slot.state = RankState.WAITING
            slot.pid = pid
            slot.hostname = hostname
            slot.registered_at = now
            self._registered += 1
            if self._registered == self.world_size:
                for s in self._slots:
                    if s.state is RankState.WAITING:  # not one that already exited
                        s.state = RankState.TRAINING
                        s.last_heartbeat_at = now  # the heartbeat clock starts at the barrier
                self._cond.notify_all()
            return self._assignment(slot)

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
            return self._registered == self.world_size

    def wait_barrier(self, *, rank: int, generation: int, timeout_s: float) -> BarrierResult:
        """Block until every rank of `generation` has registered, the generation ends, or timeout."""
        with self._cond:
            if generation < self.generation:
                return BarrierResult(open=False, superseded=True)
            self._registered_slot(rank, generation)
            self._cond.wait_for(
                lambda: self.generation != generation or self._registered == self.world_size,
                timeout=max(0.0, timeout_s),
            )
            if self.generation != generation:
                return BarrierResult(open=False, superseded=True)
            return BarrierResult(open=self._registered == self.world_size, superseded=False)

    # -- progress ------------------------------------------------------------------------

    def heartbeat(
        self,
        *,
        rank: int,
        generation: int,
        pid: int,
        step: int,
        samples: int = 0,
        loss: float | None = None,
        metrics: Mapping[str, float] | None = None,
        total_steps: int = 0,
        step_age_s: float = 0.0,
    ) -> bool:
        """Record a worker's progress. Returns True when its generation is over (superseded).

        Raises:
            Rejected: unknown rank, a pid that does not hold the slot, or bad values.
        """
        if step < 0 or samples < 0 or total_steps < 0:
            raise Rejected(Rejected.INVALID, "step, samples and total_steps must be >= 0")
        if loss is not None and not math.isfinite(loss):
            loss = None  # a diverged loss is reported as missing, not allowed to poison means
        metrics = dict(metrics or {})
        if len(metrics) > MAX_METRICS:
            raise Rejected(Rejected.INVALID, f"{len(metrics)} metrics in one heartbeat; at most {MAX_METRICS}")
        for name, value in metrics.items():
            if not name or len(name) > MAX_NAME:
                raise Rejected(Rejected.INVALID, f"metric names must have 1..{MAX_NAME} characters")
            if not math.isfinite(value):
                raise Rejected(Rejected.INVALID, f"metric {name!r} is not a finite number ({value})")
        with self._cond:
            if generation < self.generation:
                return True
            slot = self._registered_slot(rank, generation, pid)
            now = self._clock()
            # The first heartbeat sets the baseline (a resumed run may start at any step);
            # the step rule of find_hung applies once the step has moved from it.
            if slot.heartbeats and step != slot.step:
                # Dated by the worker's own clock where it can be: a stall then counts from the
                # step itself, not from the heartbeat that saw it (up to an interval later),
                # but never from before the previous heartbeat.
                age = step_age_s if math.isfinite(step_age_s) and step_age_s > 0 else 0.0
                slot.last_step_change_at = max(now - age, slot.last_heartbeat_at or now)
            slot.heartbeats += 1
            slot.last_heartbeat_at = now
            slot.step = step
            slot.samples = samples
            if loss is not None:
                slot.loss = loss
            slot.metrics = metrics  # each heartbeat carries the worker's whole set
            if total_steps:
                self._total_steps = total_steps
            window = slot.rate_window
            window.append((now, step))
            while len(window) > 2 and now - window[0][0] > RATE_WINDOW_S:
                window.popleft()
            return False

    def report_failure(self, *, rank: int, generation: int, pid: int, exception_type: str, traceback: str) -> None:
        with self._cond:
            slot = self._registered_slot(rank, generation, pid)
            slot.exception_type = exception_type[:256]
            slot.traceback = traceback[-MAX_TEXT:]

    # -- what the supervisor tells us ------------------------------------------------------

    def record_exit(self, rank: int, generation: int, exit_code: int) -> None:
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
            slot.exit_code = exit_code
            slot.state = RankState.DONE if exit_code == 0 else RankState.FAILED

    def failed_ranks(self) -> list[tuple[int, int]]:
        """(rank, exit code) of the current generation's failed ranks."""
        with self._cond:
            return [(s.rank, s.exit_code or 0) for s in self._slots if s.state is RankState.FAILED]

    @property
    def all_done(self) -> bool:
        with self._cond:
            return all(s.state is RankState.DONE for s in self._slots)

    # -- the run as node launchers follow it -----------------------------------------------

    def end_run(self, state: str, message: str, exit_code: int) -> None:
        """The run is over: every node's launcher stops its workers and exits with exit_code."""
        with self._cond:
            self._end = RunState(self.generation, state, message, exit_code)
            self._cond.notify_all()

    def run_state(self) -> RunState:
        with self._cond:
            return self._end or RunState(self.generation, RUNNING)

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
            self._slots[rank].state = RankState.HUNG

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
                                f"step {s.step} has not advanced for {stalled_for:.0f} s",
                                stalled_for,
                                s.last_step_change_at,
                            )
                        )
            verdicts.sort(key=lambda v: (v.last_sign_of_life, self._slots[v.rank].step, v.rank))
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
                    s.straggler = False
                    continue
                if s.slow_since is None:
                    s.slow_since = now
                if not s.straggler and now - s.slow_since >= window_s:
                    s.straggler = True
                    flagged.append(s.rank)
        return flagged

    def unregistered_ranks(self) -> list[int]:
        with self._cond:
            return [s.rank for s in self._slots if s.state is RankState.STARTING]

    # -- views ---------------------------------------------------------------------------

    def snapshot(self) -> RunSnapshot:
        now = self._clock()
        # Under the lock only a flat copy of each slot: the views (thousands of objects at a
        # large world) are built after it is released, so heartbeats never wait for them.
        with self._cond:
            generation, total_steps = self.generation, self._total_steps
            barrier_open = self._registered == self.world_size
            rows = [self._copy(s) for s in self._slots]
        return RunSnapshot(
            run_id=self.run_id,
            world_size=self.world_size,
            generation=generation,
            max_restarts=self.max_restarts,
            elapsed_s=now - self._started_at,
            total_steps=total_steps,
            barrier_open=barrier_open,
            ranks=tuple(self._view(row, generation, now) for row in rows),
        )

    @staticmethod
    def _rate(s: _Slot) -> float:
        if len(s.rate_window) < 2:
            return 0.0
        (t0, s0), (t1, s1) = s.rate_window[0], s.rate_window[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

    @classmethod
    def _copy(cls, s: _Slot) -> tuple:
        # A heartbeat replaces a slot's metrics dict, never changes it: the reference is enough.
        return (s.rank, s.node_rank, s.local_rank, s.state, s.pid, s.hostname, s.step, s.samples, cls._rate(s),
                s.loss, s.metrics, s.rss_bytes, s.cpu_percent, s.last_heartbeat_at, s.exit_code,
                s.exception_type, s.traceback, s.straggler)  # fmt: skip

    @staticmethod
    def _view(row: tuple, generation: int, now: float) -> RankView:
        (rank, node_rank, local_rank, state, pid, hostname, step, samples, rate, loss, metrics, rss_bytes,
         cpu_percent, last_heartbeat_at, exit_code, exception_type, traceback, straggler) = row  # fmt: skip
        return RankView(
            rank=rank,
            node_rank=node_rank,
            local_rank=local_rank,
            state=state,
            generation=generation,
            pid=pid,
            hostname=hostname,
            step=step,
            samples=samples,
            steps_per_s=rate,
            loss=loss,
            metrics=dict(metrics),
            rss_bytes=rss_bytes,
            cpu_percent=cpu_percent,
            heartbeat_age_s=None if last_heartbeat_at is None else now - last_heartbeat_at,
            exit_code=exit_code,
            exception_type=exception_type,
            traceback=traceback,
            straggler=straggler,
        )

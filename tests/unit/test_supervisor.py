"""The Supervisor driven by fakes and a scripted history: no process, no socket, a fake clock.

A fake worker's sentinel is the read end of a real pipe: closing the write end is its death,
which the supervisor notices through `multiprocessing.connection.wait` exactly as it notices
a real process's. Its pid is None, so nothing can ever be signalled, and the WorkerGroup's
signalling is injected (`Signals` records it): nothing is monkeypatched to keep signals off
real processes. Each tick of the watch loop (the `on_tick` callback) moves the fake clock
by one second and plays the script: heartbeats, exits, stop requests.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import ddp_launch.run.supervisor as supervisor_module
from ddp_launch.config import RestartPolicy, RunConfig, Target
from ddp_launch.progress import Progress
from ddp_launch.record import describe_exit
from ddp_launch.registry import MASTER_AGENT, HangVerdict, RankState, Registry, RunSnapshot
from ddp_launch.run.group import WorkerGroup
from ddp_launch.run.result import Outcome, RunResult, WorkerExit, shell_exit_code
from ddp_launch.run.supervisor import Supervisor, _main_thread_stack, _root_of_hang
from ddp_launch.run.worker import STACK_DUMP_SIGNAL
from tests.fakes import FakeClock

START = 1000.0
TICK_S = 1.0  # fake seconds per watch-loop tick


class FakePorts:
    def __init__(self) -> None:
        self.next = 30000

    def __call__(self, host: str) -> int:
        self.next += 1
        return self.next


@dataclass(frozen=True)
class Fate:
    """What one fake worker does in one generation.

    exit_code: its exit code (negative: killed by that signal); None runs until stopped.
    at_tick: the tick on which it exits (0: as soon as it is started).
    register: whether it registers with the registry (all must, for the barrier to open).
    heartbeats_until: the last tick on which it sends a heartbeat (None: every tick).
    stopped_exit: the exit code it gets when the group is stopped while it runs.
    """

    exit_code: int | None = 0
    at_tick: int = 0
    register: bool = True
    heartbeats_until: int | None = None
    stopped_exit: int = -signal.SIGTERM


RUNS = Fate(exit_code=None)


class FakeWorker:
    """A WorkerHandle with no process behind it."""

    def __init__(self, rank: int, generation: int, fate: Fate, registry_pid: int) -> None:
        self.rank = rank
        self.generation = generation
        self.fate = fate
        self.registry_pid = registry_pid  # what it registered with; never signalled
        self.pid: int | None = None
        self._read_fd, self._write_fd = os.pipe()
        self.sentinel = self._read_fd
        self._exitcode: int | None = None
        self.registered = False

    @property
    def exitcode(self) -> int | None:
        return self._exitcode

    def exit(self, code: int) -> None:
        if self._exitcode is None:
            self._exitcode = code  # set before the sentinel becomes readable, like a real Process
            os.close(self._write_fd)
            self._write_fd = -1

    def join(self, timeout: float | None = None) -> None:
        # The supervisor joins every worker after stopping the group: a worker still
        # running here is one the stop ended.
        if self._exitcode is None:
            self.exit(self.fate.stopped_exit)

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self._read_fd = self._write_fd = -1


class FakePump:
    """lines_seen / lines_since / wait_quiet / tail over in-memory lines."""

    def __init__(self) -> None:
        self.lines: dict[int, list[str]] = {}
        self.waited: list[list[int]] = []

    def print(self, rank: int, text: str) -> None:
        self.lines.setdefault(rank, []).extend(text.split("\n"))

    def lines_seen(self, rank: int) -> int:
        return len(self.lines.get(rank, []))

    def lines_since(self, rank: int, mark: int) -> list[str]:
        return self.lines.get(rank, [])[mark:]

    def wait_quiet(self, ranks: list[int], quiet_s: float, timeout_s: float) -> None:
        self.waited.append(list(ranks))

    def tail(self, rank: int, n: int = 20) -> list[str]:
        return self.lines.get(rank, [])[-n:] if n > 0 else []


class Script:
    """The scripted history: fates per generation and local rank, played on each tick.

    Generations not in `fates` (and ranks not in a generation's dict) exit 0 immediately.
    """

    def __init__(
        self,
        config: RunConfig,
        fates: dict[int, dict[int, Fate]] | None = None,
        *,
        on_tick: Callable[[int, Script], None] | None = None,
        max_ticks: int = 1000,
        seconds_per_tick: float = TICK_S,
        signals: Signals | None = None,
        send: Callable[[int, int], None] | None = None,
        standbys: RecordedStandbys | None = None,
    ) -> None:
        self.config = config
        self.signals = signals or Signals()
        self.group = WorkerGroup(
            self.start_worker,
            config.node_rank,
            kill_trees=self.signals.kill_trees,
            send=send or self.signals.send,
            send_group=self.signals.send_group,
            standbys=standbys,
        )
        self.fates = fates or {}
        self.clock = FakeClock(START)
        self.registry = Registry(
            run_id="run-1",
            nnodes=config.nnodes,
            local_world_size=config.nproc_per_node,
            max_restarts=config.restart.max_restarts,
            ddp_addr="127.0.0.1",
            port_picker=FakePorts(),
            clock=self.clock,
        )
        self.pump = FakePump()
        self.started: list[tuple[int, int]] = []
        self.workers: list[FakeWorker] = []
        self.current: dict[int, FakeWorker] = {}
        self.tick = 0  # ticks of the whole run
        self.generation = -1
        self.gen_tick = 0  # ticks of the current generation: what fates count
        self.snapshots: list[RunSnapshot] = []
        self._extra_on_tick = on_tick
        self._max_ticks = max_ticks
        self._seconds_per_tick = seconds_per_tick
        self.ended: list[tuple[int, Outcome, bool]] = []
        self.supervisor = Supervisor(
            config,
            self.registry,
            None,
            self.pump,
            on_tick=self.on_tick,
            on_generation_end=lambda result, restarting: self.ended.append(
                (result.generation, result.outcome, restarting)
            ),
            clock=self.clock,
            group=self.group,
        )

    def fate(self, generation: int, local_rank: int) -> Fate:
        return self.fates.get(generation, {}).get(local_rank, Fate())

    def start_worker(self, local_rank: int, generation: int, node_rank: int) -> FakeWorker:
        self.started.append((local_rank, generation))
        if generation != self.generation:  # the first worker of a new generation
            self.generation, self.gen_tick = generation, 0
            self.current = {}
        rank = self.config.node_rank * self.config.nproc_per_node + local_rank
        fate = self.fate(generation, local_rank)
        w = FakeWorker(rank, generation, fate, registry_pid=10_000 + 100 * generation + rank)
        self.workers.append(w)
        self.current[rank] = w
        if fate.register:
            self.registry.register(
                node_rank=self.config.node_rank,
                local_rank=local_rank,
                pid=w.registry_pid,
                hostname="node-a",
                generation=generation,
            )
            w.registered = True
        if fate.exit_code is not None and fate.at_tick == 0:
            w.exit(fate.exit_code)
        return w

    def on_tick(self, snap: RunSnapshot) -> None:
        self.snapshots.append(snap)
        self.tick += 1
        self.gen_tick += 1
        assert self.tick <= self._max_ticks, "the supervisor never ended the generation"
        self.clock.advance(self._seconds_per_tick)
        t = self.gen_tick
        for w in self.current.values():
            if w.exitcode is not None or not w.registered:
                continue
            until = w.fate.heartbeats_until
            if until is None or t <= until:
                self.registry.heartbeat(
                    rank=w.rank,
                    generation=w.generation,
                    pid=w.registry_pid,
                    progress=Progress(optimizer_steps=t, samples=32 * t),
                )
            if w.fate.exit_code is not None and w.fate.at_tick == t:
                w.exit(w.fate.exit_code)
        if self._extra_on_tick is not None:
            self._extra_on_tick(t, self)

    def run(self) -> RunResult:
        return self.supervisor.run()

    def close(self) -> None:
        for w in self.workers:
            w.close()


# The hang tests' 40-odd ticks each wait (really) up to --monitor-interval; their hang
# checks follow the fake clock, a tick apart either way.
HANG_TEST_INTERVAL_S = 0.01


def make_config(nproc: int = 2, **kw: object) -> RunConfig:
    restart = RestartPolicy(
        max_restarts=kw.pop("max_restarts", 0),  # type: ignore[arg-type]
        stop_grace_s=0.5,
        hang_timeout_s=kw.pop("hang_timeout_s", 300.0),  # type: ignore[arg-type]
    )
    return RunConfig(target=Target("train.py"), nproc_per_node=nproc, run_dir=Path("unused"), restart=restart, **kw)  # type: ignore[arg-type]


class RecordedStandbys:
    """The starter's standbys, recorded: (local rank, generation, node rank, the fake time)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.prepared: list[tuple[int, int, int, float]] = []
        self.discarded = 0

    def prepare(self, local_rank: int, generation: int, node_rank: int) -> None:
        self.prepared.append((local_rank, generation, node_rank, self.clock()))

    def discard(self) -> None:
        self.discarded += 1


class Signals:
    """The WorkerGroup's signalling, recorded instead of sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []
        self.group_sent: list[tuple[int, int]] = []
        self.trees: list[tuple[list[int], float, int]] = []

    def kill_trees(self, pids: list[int], grace_s: float, first_signal: int = signal.SIGTERM) -> None:
        self.trees.append((list(pids), grace_s, first_signal))

    def send(self, pid: int, signum: int) -> None:
        self.sent.append((pid, signum))

    def send_group(self, pid: int, signum: int) -> None:
        self.group_sent.append((pid, signum))


@pytest.fixture
def signals() -> Signals:
    return Signals()


@pytest.fixture(autouse=True)
def fast_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    # The watch loop blocks up to TICK_S real seconds when nothing happens; the fake clock,
    # not the wall clock, is what moves in these tests.
    monkeypatch.setattr(supervisor_module, "TICK_S", 0.0)


@pytest.fixture
def scripts(signals: Signals):
    made: list[Script] = []

    def make(config: RunConfig, fates: dict[int, dict[int, Fate]] | None = None, **kw: object) -> Script:
        s = Script(config, fates, signals=signals, **kw)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
    # Fake workers have no pid: nothing was ever addressed to a process.
    assert signals.sent == [] and signals.group_sent == [], "a test signalled a process"


# -- outcomes ------------------------------------------------------------------------------


def test_all_exit_zero_succeeds_in_one_generation(scripts) -> None:
    s = scripts(make_config(nproc=3))

    result = s.run()

    assert result.outcome is Outcome.SUCCEEDED
    assert result.restarts == 0
    assert [g.generation for g in result.generations] == [0]
    assert result.last.failures == [] and result.last.root_rank is None
    assert s.started == [(0, 0), (1, 0), (2, 0)]
    assert [r.state for r in s.registry.snapshot().ranks] == [RankState.DONE] * 3
    assert [r.exit_code for r in s.registry.snapshot().ranks] == [0, 0, 0]


@pytest.mark.parametrize(("nproc", "seconds_per_round"), [(2, 0.25), (128, 1.0)])
def test_registry_wide_rounds_run_once_a_second_above_64_ranks(scripts, monkeypatch, nproc, seconds_per_round):
    monkeypatch.setattr(supervisor_module, "TICK_S", 0.25)
    s = scripts(make_config(nproc=nproc), {0: {r: Fate(0, at_tick=8) for r in range(nproc)}}, seconds_per_tick=0.0)
    real_wait = s.group.wait

    def wait_a_tick(wake_fds, timeout_s):
        s.clock.advance(0.25)  # every wake-up of the watch loop is a tick of fake time
        return real_wait(wake_fds, 0)

    monkeypatch.setattr(s.group, "wait", wait_a_tick)
    result = s.run()

    assert result.outcome is Outcome.SUCCEEDED
    assert len(s.snapshots) == 8  # rounds (each one snapshot) until the ranks exit on the 8th
    assert s.clock() - START == pytest.approx(8 * seconds_per_round, abs=0.5)


def test_workers_that_exit_on_a_later_tick_succeed(scripts) -> None:
    s = scripts(make_config(), {0: {0: Fate(0, at_tick=2), 1: Fate(0, at_tick=4)}})

    result = s.run()

    assert result.outcome is Outcome.SUCCEEDED
    assert s.tick == 4
    assert result.wall_s == pytest.approx(4 * TICK_S)
    assert s.registry.snapshot().ranks[1].step == 4  # heartbeats reached the registry


def test_a_failure_restarts_the_whole_group(scripts) -> None:
    s = scripts(make_config(max_restarts=1), {0: {0: RUNS, 1: Fate(1, at_tick=2)}})

    result = s.run()

    assert result.outcome is Outcome.SUCCEEDED
    assert result.restarts == 1
    assert s.started == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert s.registry.generation == 1
    first, second = result.generations
    assert first.outcome is Outcome.FAILED
    assert first.root_rank == 1
    assert [(f.rank, f.exit_code) for f in first.failures] == [(1, 1)]
    assert first.message == "rank 1 failed (exit code 1)"
    assert first.snapshot is not None and first.snapshot.generation == 0
    assert second.outcome is Outcome.SUCCEEDED and second.generation == 1
    assert s.ended == [(0, Outcome.FAILED, True), (1, Outcome.SUCCEEDED, False)]
    # Rank 0 of generation 0 was still running: the stop ended it.
    assert s.workers[0].exitcode == -signal.SIGTERM


def test_a_restart_s_workers_are_forked_while_the_generation_before_trains(scripts) -> None:
    now = [START]
    standbys = RecordedStandbys(lambda: now[0])
    s = scripts(make_config(max_restarts=2), {0: {0: RUNS, 1: Fate(1, at_tick=5)}, 1: {0: Fate(0, at_tick=3)}},
                standbys=standbys)  # fmt: skip
    standbys.clock = s.clock
    opened = START  # the fake clock when generation 0's barrier opened (both registered at once)

    result = s.run()

    assert result.outcome is Outcome.SUCCEEDED and result.restarts == 1
    gen1 = [p for p in standbys.prepared if p[1] == 1]
    assert [p[:3] for p in gen1] == [(0, 1, 0), (1, 1, 0)]  # once each, for generation 1
    assert gen1[0][3] - opened >= supervisor_module.PREPARE_AFTER_S  # not during the start
    # Generation 1 prepared generation 2 in turn (a restart was left); the end discarded them.
    assert [p[:3] for p in standbys.prepared if p[1] == 2] == [(0, 2, 0), (1, 2, 0)]
    assert standbys.discarded == 1


def test_no_standby_without_a_restart_left_or_once_failing(scripts) -> None:
    standbys = RecordedStandbys(lambda: 0.0)
    s = scripts(make_config(max_restarts=0), {0: {0: Fate(0, at_tick=5), 1: Fate(0, at_tick=5)}}, standbys=standbys)
    assert s.run().outcome is Outcome.SUCCEEDED
    assert standbys.prepared == [] and standbys.discarded == 1
    standbys = RecordedStandbys(lambda: 0.0)
    s = scripts(make_config(max_restarts=1), {0: {0: RUNS, 1: Fate(1, at_tick=0)}}, standbys=standbys)
    s.run()  # the failure came before the generation trained: generation 1 is forked then
    assert [p[1] for p in standbys.prepared] == []


def test_exhausted_restarts_fail_with_the_first_failure(scripts) -> None:
    fates = {g: {0: RUNS, 1: Fate(3, at_tick=1)} for g in range(3)}
    s = scripts(make_config(max_restarts=2), fates)

    result = s.run()

    assert result.outcome is Outcome.FAILED
    assert result.restarts == 2
    assert [g.generation for g in result.generations] == [0, 1, 2]
    assert all(g.outcome is Outcome.FAILED for g in result.generations)
    assert s.started == [(r, g) for g in range(3) for r in range(2)]
    last = result.last
    assert last.root_rank == 1
    assert last.failures[0].rank == 1 and last.failures[0].exit_code == 3
    assert last.message == "rank 1 failed (exit code 3)"
    assert s.ended == [(0, Outcome.FAILED, True), (1, Outcome.FAILED, True), (2, Outcome.FAILED, False)]


def test_the_first_rank_to_die_is_the_root_cause(scripts) -> None:
    # Rank 1 dies on tick 1; rank 0 would die later (a peer's "connection closed").
    s = scripts(make_config(), {0: {0: Fate(1, at_tick=3), 1: Fate(7, at_tick=1)}})

    result = s.run()

    assert result.outcome is Outcome.FAILED
    assert result.last.root_rank == 1
    assert [f.rank for f in result.last.failures] == [1]


def test_a_rank_stopped_with_the_group_is_stopped_not_failed(scripts) -> None:
    s = scripts(make_config(), {0: {0: RUNS, 1: Fate(2, at_tick=1)}})

    result = s.run()

    assert [f.rank for f in result.last.failures] == [1]  # the collateral is no root cause
    ranks = s.registry.snapshot().ranks
    # Rank 0 was ended by the launcher's SIGTERM: that is no failure of its own.
    assert (ranks[0].state, ranks[0].exit_code) == (RankState.STOPPED, -signal.SIGTERM)
    assert (ranks[1].state, ranks[1].exit_code) == (RankState.FAILED, 2)
    # The generation's snapshot is read after the stop: it shows how each rank ended.
    assert [r.state for r in result.last.snapshot.ranks] == [RankState.STOPPED, RankState.FAILED]


def test_ranks_ended_by_the_users_signal_are_interrupted(scripts) -> None:
    def ctrl_c(tick: int, s: Script) -> None:
        if tick == 2:
            s.supervisor.request_stop(signal.SIGINT)

    s = scripts(make_config(), {0: {0: RUNS, 1: RUNS}}, on_tick=ctrl_c)

    result = s.run()

    assert result.outcome is Outcome.INTERRUPTED
    assert [r.state for r in s.registry.snapshot().ranks] == [RankState.INTERRUPTED] * 2


def test_death_by_signal_is_described_by_the_signal(scripts) -> None:
    s = scripts(make_config(), {0: {0: Fate(-signal.SIGKILL, at_tick=1), 1: RUNS}})

    result = s.run()

    failure = result.last.failures[0]
    assert (failure.rank, failure.exit_code) == (0, -9)
    assert failure.description == "signal SIGKILL"
    assert result.last.message == "rank 0 failed (signal SIGKILL)"
    assert shell_exit_code(failure.exit_code) == 137


@pytest.mark.parametrize(
    ("code", "text", "shell"),
    [
        (0, "exit code 0", 0),
        (3, "exit code 3", 3),
        (-9, "signal SIGKILL", 137),
        (-15, "signal SIGTERM", 143),
        (-2, "signal SIGINT", 130),
        (-200, "signal 200", 328),
    ],
)
def test_describe_exit_and_shell_exit_code(code: int, text: str, shell: int) -> None:
    assert describe_exit(code) == text
    assert shell_exit_code(code) == shell
    assert WorkerExit(rank=0, pid=1, exit_code=code, at=0.0).description == text


def test_a_stop_request_interrupts_without_restart(scripts, signals: Signals) -> None:
    def ctrl_c(tick: int, s: Script) -> None:
        if tick == 2:
            s.supervisor.request_stop(signal.SIGINT)
            s.supervisor.request_stop(signal.SIGTERM)  # the first request wins

    s = scripts(make_config(max_restarts=3), {0: {0: RUNS, 1: RUNS}}, on_tick=ctrl_c)

    result = s.run()

    assert result.outcome is Outcome.INTERRUPTED
    assert result.last.signal_number == signal.SIGINT
    assert result.last.message == "stopped by SIGINT"
    assert result.restarts == 0
    assert s.started == [(0, 0), (1, 0)]
    # The user's signal is forwarded to the group; pid-less handles are never signalled.
    assert signals.trees[0] == ([], 0.5, signal.SIGINT)


def test_the_wakeup_fd_is_drained(signals: Signals) -> None:
    config = make_config()
    s = Script(config, {0: {0: RUNS, 1: RUNS}}, signals=signals)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    s.supervisor = Supervisor(
        config, s.registry, None, s.pump, on_tick=s.on_tick, wakeup_fd=read_fd, clock=s.clock, group=s.group
    )

    def signal_arrives(tick: int, s: Script) -> None:
        if tick == 1:
            os.write(write_fd, b"\x02")  # what signal.set_wakeup_fd writes
            s.supervisor.request_stop(signal.SIGINT)

    s._extra_on_tick = signal_arrives
    try:
        result = s.run()
        assert result.outcome is Outcome.INTERRUPTED
        with pytest.raises(BlockingIOError):
            os.read(read_fd, 1)
    finally:
        s.close()
        os.close(read_fd)
        os.close(write_fd)


def test_the_run_timeout_ends_the_run_without_restart(scripts) -> None:
    s = scripts(make_config(max_restarts=3, timeout_s=5.0), {0: {0: RUNS, 1: RUNS}})

    result = s.run()

    assert result.outcome is Outcome.TIMED_OUT
    assert result.wall_s == pytest.approx(5.0)
    assert result.restarts == 0
    assert "--timeout of 5 s" in result.last.message
    assert s.started == [(0, 0), (1, 0)]


def test_a_rank_whose_heartbeats_stop_is_hung(scripts, signals: Signals) -> None:
    s = scripts(
        make_config(hang_timeout_s=10.0, monitor_interval_s=HANG_TEST_INTERVAL_S),
        {0: {0: RUNS, 1: Fate(None, heartbeats_until=3)}},
    )

    result = s.run()

    assert result.outcome is Outcome.HUNG
    g = result.last
    assert g.root_rank == 1
    assert [v.rank for v in g.hung] == [1]
    assert g.hung[0].stalled_for_s > 10.0
    assert g.message.startswith("rank 1 hung: no heartbeat for")
    # Rank 1 last spoke on tick 3 and was judged once more than 10 s had passed since.
    assert s.clock() - (START + 3 * TICK_S) > 10.0
    assert s.clock() - (START + 3 * TICK_S) <= 10.0 + TICK_S
    assert g.snapshot is not None
    assert g.snapshot.ranks[1].state is RankState.HUNG
    assert g.snapshot.ranks[0].state is RankState.STOPPED  # read after the stop
    # Pid-less handles get no stack dump request, and nobody waits for one.
    assert g.stacks == {} and s.pump.waited == []
    assert signals.trees[0][2] == signal.SIGTERM


def test_a_rank_whose_step_stalls_is_hung(scripts) -> None:
    def stall(tick: int, s: Script) -> None:
        if tick >= 5:  # rank 0 keeps sending heartbeats, at step 5 forever
            s.registry.heartbeat(
                rank=0, generation=0, pid=s.current[0].registry_pid, progress=Progress(optimizer_steps=5)
            )

    s = scripts(
        make_config(hang_timeout_s=10.0, monitor_interval_s=HANG_TEST_INTERVAL_S),
        {0: {0: Fate(None, heartbeats_until=4), 1: RUNS}},
        on_tick=stall,
    )

    result = s.run()

    assert result.outcome is Outcome.HUNG
    assert result.last.root_rank == 0
    assert "step 5 has not advanced" in result.last.message


def test_a_hang_is_restarted_while_restarts_remain(scripts) -> None:
    s = scripts(
        make_config(max_restarts=1, hang_timeout_s=10.0, monitor_interval_s=HANG_TEST_INTERVAL_S),
        {0: {0: RUNS, 1: Fate(None, heartbeats_until=0)}},
    )

    result = s.run()

    assert [g.outcome for g in result.generations] == [Outcome.HUNG, Outcome.SUCCEEDED]
    assert result.outcome is Outcome.SUCCEEDED
    assert s.started == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_hang_detection_off_with_zero_timeout(scripts) -> None:
    # 50 ticks of the fake clock, each a real wait of at most --monitor-interval: short here.
    s = scripts(
        make_config(hang_timeout_s=0.0, monitor_interval_s=0.01),
        {0: {0: Fate(0, at_tick=50, heartbeats_until=0), 1: Fate(0, at_tick=50)}},
    )

    assert s.run().outcome is Outcome.SUCCEEDED


def test_a_rank_that_never_registers_hits_the_join_timeout(scripts) -> None:
    s = scripts(make_config(join_timeout_s=5.0), {0: {0: RUNS, 1: Fate(None, register=False)}})

    result = s.run()

    assert result.outcome is Outcome.HUNG
    assert result.last.message == "rank(s) [1] did not register within --join-timeout (5 s)"
    assert result.last.hung == []
    assert result.wall_s == pytest.approx(5.0)


def test_the_join_timeout_names_the_missing_rank_as_root_cause(scripts) -> None:
    s = scripts(make_config(join_timeout_s=5.0), {0: {0: RUNS, 1: Fate(None, register=False)}})

    result = s.run()

    assert result.outcome is Outcome.HUNG
    assert result.last.root_rank == 1


def test_ranks_of_a_second_node_are_offset(scripts) -> None:
    # Node 1 of 2: its local ranks are global ranks 2 and 3; rank 3 fails.
    config = make_config(nnodes=2, node_rank=1)
    s = scripts(config, {0: {0: RUNS, 1: Fate(4, at_tick=1)}})
    # Node 0's ranks register too (through the master, in a real run), so the barrier opens.
    for local_rank in range(2):
        s.registry.register(node_rank=0, local_rank=local_rank, pid=500 + local_rank, hostname="node-b", generation=0)

    result = s.run()

    assert result.last.root_rank == 3
    assert s.supervisor.first_rank == 2


def test_hang_root_cause_comes_from_the_stacks(monkeypatch: pytest.MonkeyPatch, signals: Signals) -> None:
    """Ranks with pids: the stack dump is requested (recorded, never sent) and the rank whose
    main thread is outside a collective is the root cause, though rank 0's verdict comes first."""
    config = make_config(hang_timeout_s=10.0, monitor_interval_s=HANG_TEST_INTERVAL_S)
    sent: list[tuple[int, int]] = []

    def send(pid: int, signum: int) -> None:
        sent.append((pid, signum))
        if signum == STACK_DUMP_SIGNAL:
            rank = next(r for r, p in fake_pids.items() if p == pid)
            s.pump.print(rank, dumps[rank])

    fates = {0: {0: Fate(None, heartbeats_until=3), 1: Fate(None, heartbeats_until=3)}}
    s = Script(config, fates, signals=signals, send=send)
    # Above Linux's largest possible pid_max (2**22): no such process can exist.
    fake_pids = {0: 2**22 + 1001, 1: 2**22 + 1002}
    dumps = {0: dump(RANK_IN_ALLREDUCE), 1: dump(RANK_IN_USER_CODE)}

    def start_with_pid(local_rank: int, generation: int, node_rank: int) -> FakeWorker:
        w = Script.start_worker(s, local_rank, generation, node_rank)
        w.pid = fake_pids[w.rank]
        return w

    s.group._start_worker = start_with_pid  # workers with pids (that no process can have)
    monkeypatch.setattr(Supervisor, "_sample_stats", lambda self, alive: None)
    s.pump.print(0, "epoch 1 done")  # output before the dump is not part of the stack
    try:
        result = s.run()
    finally:
        s.close()

    g = result.last
    assert result.outcome is Outcome.HUNG
    assert [v.rank for v in g.hung] == [0, 1]  # the same silence: rank 0 is listed first...
    assert g.root_rank == 1  # ...but it waits in allreduce for rank 1
    assert sent == [(fake_pids[0], STACK_DUMP_SIGNAL), (fake_pids[1], STACK_DUMP_SIGNAL)]
    assert s.pump.waited == [[0, 1]]
    assert g.stacks == {0: dumps[0], 1: dumps[1]}
    assert signals.trees[0] == ([fake_pids[0], fake_pids[1]], 0.5, signal.SIGTERM)


def test_a_stopped_rank_is_left_stopped_and_is_the_hang_s_root(monkeypatch: pytest.MonkeyPatch, signals) -> None:
    """Continued for a dump, a SIGSTOPped rank lets the group train on while it is judged hung."""
    config = make_config(hang_timeout_s=10.0, monitor_interval_s=HANG_TEST_INTERVAL_S)
    sent: list[tuple[int, int]] = []

    def send(pid: int, signum: int) -> None:
        sent.append((pid, signum))
        if signum == STACK_DUMP_SIGNAL:
            s.pump.print(0, dump(RANK_IN_USER_CODE))  # rank 0 is not stopped: it dumps

    fates = {0: {0: Fate(None, heartbeats_until=3), 1: Fate(None, heartbeats_until=3)}}
    s = Script(config, fates, signals=signals, send=send)
    fake_pids = {0: 2**22 + 1001, 1: 2**22 + 1002}

    def start_with_pid(local_rank: int, generation: int, node_rank: int) -> FakeWorker:
        w = Script.start_worker(s, local_rank, generation, node_rank)
        w.pid = fake_pids[w.rank]
        return w

    s.group._start_worker = start_with_pid
    monkeypatch.setattr(s.group, "is_stopped", lambda rank: rank == 1)
    monkeypatch.setattr(Supervisor, "_sample_stats", lambda self, alive: None)
    try:
        result = s.run()
    finally:
        s.close()

    g = result.last
    assert result.outcome is Outcome.HUNG and g.root_rank == 1  # though rank 0 is in user code
    assert sent == [(fake_pids[0], STACK_DUMP_SIGNAL)]  # no SIGCONT, no dump asked of rank 1
    assert g.stacks is not None and g.stacks[1] == supervisor_module.STOPPED_STACK


# -- regressions (bugs these tests found) --------------------------------------------------


def test_a_stop_request_with_a_failure_starts_no_new_generation(scripts) -> None:
    def ctrl_c(tick: int, s: Script) -> None:
        if tick == 1:
            s.supervisor.request_stop(signal.SIGINT)

    fates = {g: {0: RUNS, 1: RUNS} for g in range(3)}
    fates[0] = {0: RUNS, 1: Fate(1, at_tick=1)}  # rank 1 dies of the same Ctrl-C
    s = scripts(make_config(max_restarts=2), fates, on_tick=ctrl_c)

    result = s.run()

    assert s.started == [(0, 0), (1, 0)]
    assert result.outcome is Outcome.INTERRUPTED
    assert result.last.signal_number == signal.SIGINT


def test_a_handle_without_pid_gets_no_process_stats(scripts) -> None:
    s = scripts(make_config(), {0: {0: Fate(0, at_tick=1), 1: Fate(0, at_tick=1)}})

    result = s.run()

    assert result.outcome is Outcome.SUCCEEDED
    assert [r.rss_bytes for r in s.registry.snapshot().ranks] == [0, 0]


# -- reading stack dumps -------------------------------------------------------------------

HEARTBEAT_THREAD = """\
Thread 0x00007f3a2cffd640 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 331 in wait
  File "/usr/lib/python3.11/threading.py", line 629 in wait
  File "/opt/venv/lib/python3.11/site-packages/ddp_launch/control/client.py", line 402 in _loop
  File "/usr/lib/python3.11/threading.py", line 975 in run
  File "/usr/lib/python3.11/threading.py", line 1038 in _bootstrap_inner
  File "/usr/lib/python3.11/threading.py", line 995 in _bootstrap"""

RANK_IN_ALLREDUCE = """\
Current thread 0x00007f3a3b5ff740 (most recent call first):
  File "/opt/venv/lib/python3.11/site-packages/torch/autograd/graph.py", line 769 in _engine_run_backward
  File "/opt/venv/lib/python3.11/site-packages/torch/autograd/__init__.py", line 289 in backward
  File "/opt/venv/lib/python3.11/site-packages/torch/_tensor.py", line 581 in backward
  File "/home/user/train.py", line 41 in train_step
  File "/home/user/train.py", line 58 in main
  File "/home/user/train.py", line 62 in <module>
  File "<frozen runpy>", line 88 in _run_code
  File "<frozen runpy>", line 291 in run_path
  File "/opt/venv/lib/python3.11/site-packages/ddp_launch/run/worker.py", line 160 in _run_target"""

RANK_IN_USER_CODE = """\
Current thread 0x00007f9d11e4b740 (most recent call first):
  File "/home/user/data.py", line 17 in load_shard
  File "/home/user/train.py", line 35 in next_batch
  File "/home/user/train.py", line 40 in train_step
  File "/home/user/train.py", line 58 in main
  File "/home/user/train.py", line 62 in <module>
  File "<frozen runpy>", line 88 in _run_code
  File "<frozen runpy>", line 291 in run_path
  File "/opt/venv/lib/python3.11/site-packages/ddp_launch/run/worker.py", line 160 in _run_target"""


def dump(main_thread: str) -> str:
    """A faulthandler all-threads dump: newest thread first, blocks separated by a blank line."""
    return f"{HEARTBEAT_THREAD}\n\n{main_thread}\n"


def verdict(rank: int, last: float) -> HangVerdict:
    return HangVerdict(rank, "no heartbeat for 301 s", 301.0, last)


def test_main_thread_stack_is_the_last_block_innermost_frames() -> None:
    main = _main_thread_stack(dump(RANK_IN_ALLREDUCE))

    assert main.splitlines() == [
        '  File "/opt/venv/lib/python3.11/site-packages/torch/autograd/graph.py", line 769 in _engine_run_backward',
        '  File "/opt/venv/lib/python3.11/site-packages/torch/autograd/__init__.py", line 289 in backward',
        '  File "/opt/venv/lib/python3.11/site-packages/torch/_tensor.py", line 581 in backward',
    ]
    assert "client.py" not in main


def test_main_thread_stack_of_no_dump_is_empty() -> None:
    assert _main_thread_stack("") == ""
    assert _main_thread_stack("epoch 3: loss 0.12\nsome other line") == ""


def test_main_thread_stack_reads_a_real_faulthandler_dump(tmp_path: Path) -> None:
    """The format assumptions (blank-line blocks, the main thread listed last) hold for the
    interpreter's own dump."""
    started, release = threading.Event(), threading.Event()

    def other_thread() -> None:
        started.set()
        release.wait(10)

    t = threading.Thread(target=other_thread, daemon=True)
    t.start()
    assert started.wait(10)
    path = tmp_path / "dump.txt"
    try:
        with open(path, "w") as f:
            faulthandler.dump_traceback(f, all_threads=True)
    finally:
        release.set()
        t.join(10)

    text = path.read_text()
    main = _main_thread_stack(text)
    assert "test_main_thread_stack_reads_a_real_faulthandler_dump" in main
    assert "other_thread" not in main


def test_root_of_hang_prefers_the_rank_outside_a_collective() -> None:
    verdicts = [verdict(0, 10.0), verdict(1, 11.0)]
    stacks = {0: dump(RANK_IN_ALLREDUCE), 1: dump(RANK_IN_USER_CODE)}

    assert _root_of_hang(verdicts, stacks) == 1


def test_root_of_hang_falls_back_to_the_first_to_go_quiet() -> None:
    verdicts = [verdict(2, 10.0), verdict(0, 11.0)]

    assert _root_of_hang(verdicts, {0: dump(RANK_IN_ALLREDUCE), 2: dump(RANK_IN_ALLREDUCE)}) == 2
    assert _root_of_hang(verdicts, {}) == 2  # no stacks (a dump that never came)
    assert _root_of_hang([], {}) is None


@pytest.mark.parametrize(
    "frame",
    [
        "/opt/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py",
        "/opt/venv/lib/python3.11/site-packages/torch/nn/parallel/distributed.py",
    ],
)
def test_every_collective_marker_counts_as_waiting(frame: str) -> None:
    waiting = f'Current thread 0x1 (most recent call first):\n  File "{frame}", line 1 in all_reduce\n'
    verdicts = [verdict(0, 10.0), verdict(1, 11.0)]

    assert _root_of_hang(verdicts, {0: waiting, 1: dump(RANK_IN_USER_CODE)}) == 1


# -- elastic runs: rendezvous, resizes -------------------------------------------------------


class ElasticScript(Script):
    """A Script whose registry is elastic (config.min_nodes < config.nnodes), with other
    nodes' launchers played by the test: they join (`join`), send node heartbeats on every
    tick, and, in the generations of `finish`, register their ranks and exit 0 on that tick.

    Every wait of the supervisor (the rendezvous' polls, the watch loop's wake-ups) moves the
    fake clock by its timeout: nothing happens in between, as in a real run. Ticks move it no
    further (seconds_per_tick 0).
    """

    def __init__(self, config: RunConfig, fates=None, *, finish: dict[int, int] | None = None, **kw) -> None:
        kw.setdefault("seconds_per_tick", 0.0)
        super().__init__(config, fates, **kw)
        self.registry = Registry(
            run_id="run-1",
            nnodes=config.nnodes,
            local_world_size=config.nproc_per_node,
            max_restarts=config.restart.max_restarts,
            ddp_addr="127.0.0.1",
            port_picker=FakePorts(),
            clock=self.clock,
            min_nodes=config.min_nodes,
        )
        self.said: list[str] = []
        self.resized: list[int] = []
        self.supervisor = Supervisor(
            config,
            self.registry,
            None,
            self.pump,
            on_tick=self.on_tick,
            on_generation_end=lambda result, restarting: self.ended.append(
                (result.generation, result.outcome, restarting)
            ),
            clock=self.clock,
            group=self.group,
            say=self.said.append,
            on_resized=lambda result: self.resized.append(result.generation),
        )
        self.serials: dict[str, int] = {}
        self.finish = finish or {}
        self.polls: list[tuple[float, int]] = []  # (clock, registry generation) at each wait
        # (generation, nodes, clock) of each generation begun
        self.began: list[tuple[int, tuple[str, ...], float]] = []
        real_begin = self.registry.begin_generation

        def begin(generation: int, nodes: list[str] | None = None, *, restart: bool = True) -> None:
            real_begin(generation, nodes, restart=restart)
            self.began.append((generation, self.registry.run_state().nodes, self.clock()))

        self.registry.begin_generation = begin  # type: ignore[method-assign]
        real_wait = self.group.wait

        def wait(wake_fds, timeout_s: float):
            self.polls.append((self.clock(), self.registry.generation))
            if self.on_poll is not None:
                self.on_poll(self)
            assert self.clock() - START < 10_000, "the supervisor never ended its wait"
            self.clock.advance(timeout_s)
            return real_wait(wake_fds, 0)

        self.group.wait = wait  # type: ignore[method-assign]
        self.on_poll: Callable[[ElasticScript], None] | None = None  # called at every wait
        self.mute: set[str] = set()  # agents whose node heartbeats stopped

    def join(self, agent: str) -> None:
        self.serials[agent] = self.registry.join(agent, f"host-{agent}", self.config.nproc_per_node)

    def leave(self, agent: str) -> None:
        self.registry.leave(agent, self.serials[agent])

    def on_tick(self, snap: RunSnapshot) -> None:
        super().on_tick(snap)
        for agent in self.registry.live_agents():
            if agent not in self.mute:
                self.registry.node_seen(agent)
        generation = self.registry.generation
        if self.finish.get(generation) == self.gen_tick:
            nproc = self.config.nproc_per_node
            for rank in range(nproc, self.registry.world_size):
                self.registry.register(
                    node_rank=rank // nproc,
                    local_rank=rank % nproc,
                    pid=20_000 + 100 * generation + rank,
                    hostname=f"node-{rank // nproc}",
                    generation=generation,
                )
            for rank in range(nproc, self.registry.world_size):
                self.registry.record_exit(rank, generation, 0)


def elastic_config(**kw: object) -> RunConfig:
    kw.setdefault("nnodes", 3)
    kw.setdefault("min_nodes", 2)
    kw.setdefault("last_call_s", 2.0)
    kw.setdefault("control_port", 29400)
    return make_config(**kw)


@pytest.fixture
def elastic_scripts(signals: Signals):
    made: list[ElasticScript] = []

    def make(config: RunConfig, fates: dict[int, dict[int, Fate]] | None = None, **kw: object) -> ElasticScript:
        s = ElasticScript(config, fates, signals=signals, **kw)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
    assert signals.sent == [] and signals.group_sent == [], "a test signalled a process"


def test_an_elastic_run_at_min_nodes_begins_after_the_last_call(elastic_scripts) -> None:
    s = elastic_scripts(elastic_config(), finish={0: 1})
    s.join("a")

    result = s.run()

    assert result.outcome is Outcome.SUCCEEDED
    assert [(g, nodes) for g, nodes, _ in s.began] == [(0, (MASTER_AGENT, "a"))]
    began_at = s.began[0][2]
    assert START + 2.0 <= began_at < START + 2.0 + 2 * supervisor_module.RENDEZVOUS_POLL_S
    # Nothing began during the last call: the rendezvous polled through it.
    during = [g for t, g in s.polls if t < START + 2.0]
    assert len(during) >= 19 and set(during) == {-1}
    assert (s.registry.nnodes, s.registry.world_size) == (2, 4)
    assert s.started == [(0, 0), (1, 0)]
    assert result.resizes == 0 and result.restarts == 0
    assert s.said == []  # MIN was there from the start: nobody was waited for


def test_an_elastic_run_at_max_nodes_begins_at_once(elastic_scripts) -> None:
    s = elastic_scripts(elastic_config(), finish={0: 1})
    s.join("a")
    s.join("b")

    result = s.run()

    assert result.outcome is Outcome.SUCCEEDED
    assert s.began == [(0, (MASTER_AGENT, "a", "b"), START)]
    assert (s.registry.nnodes, s.registry.world_size) == (3, 6)
    assert all(g == 0 for _, g in s.polls)  # no rendezvous poll: every wait was the watch loop's


def test_an_elastic_run_below_min_nodes_fails_after_the_join_timeout(elastic_scripts) -> None:
    s = elastic_scripts(elastic_config(join_timeout_s=5.0))

    result = s.run()

    assert result.outcome is Outcome.FAILED
    assert [g.generation for g in result.generations] == [0]
    assert "only 1 of the 2 nodes" in result.last.message
    assert "--join-timeout (5 s)" in result.last.message
    assert s.began == [] and s.started == []
    assert s.registry.generation == -1
    assert START + 5.0 <= s.clock() < START + 5.0 + 2 * supervisor_module.RENDEZVOUS_POLL_S
    assert s.said == ["waiting for nodes: 1 of --nnodes 2:3 here"]  # said once, not per poll
    assert s.ended == [(0, Outcome.FAILED, False)]


def test_a_lost_node_resizes_an_elastic_run_without_a_restart(elastic_scripts) -> None:
    left_at: list[float] = []

    def b_leaves(tick: int, s: Script) -> None:
        if s.generation == 0 and tick == 2:
            s.leave("b")  # type: ignore[attr-defined]
            left_at.append(s.clock())

    fates = {0: {0: RUNS, 1: RUNS}}
    s = elastic_scripts(elastic_config(max_restarts=0), fates, finish={1: 1}, on_tick=b_leaves)
    s.join("a")
    s.join("b")

    result = s.run()

    assert result.outcome is Outcome.SUCCEEDED
    assert [g.outcome for g in result.generations] == [Outcome.RESIZED, Outcome.SUCCEEDED]
    assert result.restarts == 0
    assert result.resizes == 1
    assert s.registry.restarts == 0
    assert [(g, nodes) for g, nodes, _ in s.began] == [(0, (MASTER_AGENT, "a", "b")), (1, (MASTER_AGENT, "a"))]
    first = result.generations[0]
    assert first.message == "node 2 (host-b) lost: its launcher stopped answering the master"
    assert first.root_rank == 4  # node 2's first rank
    assert s.ended == [(0, Outcome.RESIZED, True), (1, Outcome.SUCCEEDED, False)]
    assert s.resized == [0]
    assert s.started == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert (s.registry.nnodes, s.registry.world_size) == (2, 4)
    # Lost on the next round, and the next generation goes on with the nodes it has at
    # once: no last call (2 s) for a resize that keeps MIN.
    assert s.began[1][2] == pytest.approx(left_at[0] + s.config.monitor_interval_s)


def test_a_resize_below_min_nodes_fails_after_the_join_timeout_without_a_restart(elastic_scripts) -> None:
    def a_leaves(tick: int, s: Script) -> None:
        if s.generation == 0 and tick == 2:
            s.leave("a")  # type: ignore[attr-defined]

    config = elastic_config(max_restarts=0, join_timeout_s=5.0)
    s = elastic_scripts(config, {0: {0: RUNS, 1: RUNS}}, on_tick=a_leaves)
    s.join("a")

    result = s.run()

    assert result.outcome is Outcome.FAILED
    assert [g.outcome for g in result.generations] == [Outcome.RESIZED, Outcome.FAILED]
    assert result.generations[0].message == "node 1 (host-a) lost: its launcher stopped answering the master"
    assert "only 1 of the 2 nodes" in result.last.message
    assert result.restarts == 0
    assert [g for g, _, _ in s.began] == [0]
    assert s.started == [(0, 0), (1, 0)]
    assert s.resized == []  # no generation began with the new nodes
    assert s.said == ["waiting for nodes: 1 of --nnodes 2:3 here"]


def test_a_run_that_fell_below_min_gives_late_nodes_a_last_call_again(elastic_scripts) -> None:
    def a_leaves(tick: int, s: Script) -> None:
        if s.generation == 0 and tick == 2:
            s.leave("a")  # type: ignore[attr-defined]

    rendezvous_from: list[float] = []
    joined_at: list[float] = []

    def c_joins(s: ElasticScript) -> None:
        # One second into generation 1's rendezvous (the run is below MIN), c joins.
        if s.ended and s.registry.generation == 0:
            rendezvous_from[:] = rendezvous_from or [s.clock()]
            if not joined_at and s.clock() >= rendezvous_from[0] + 1.0:
                s.join("c")
                joined_at.append(s.clock())

    s = elastic_scripts(elastic_config(), {0: {0: RUNS, 1: RUNS}}, finish={1: 1}, on_tick=a_leaves)
    s.on_poll = c_joins
    s.join("a")

    result = s.run()

    assert result.outcome is Outcome.SUCCEEDED
    assert [g.outcome for g in result.generations] == [Outcome.RESIZED, Outcome.SUCCEEDED]
    assert [(g, nodes) for g, nodes, _ in s.began] == [(0, (MASTER_AGENT, "a")), (1, (MASTER_AGENT, "c"))]
    assert len(joined_at) == 1
    # MIN came back with c: the last call (2 s) runs from then.
    assert joined_at[0] + 2.0 <= s.began[1][2] < joined_at[0] + 2.0 + 2 * supervisor_module.RENDEZVOUS_POLL_S
    assert s.said == ["waiting for nodes: 1 of --nnodes 2:3 here"]
    assert s.resized == [0]
    assert result.restarts == 0


@pytest.mark.parametrize(("nnodes", "waits_s"), [(3, 0.0), (4, 2.0)])
def test_a_node_that_joins_mid_run_is_admitted_by_a_resize(elastic_scripts, nnodes, waits_s) -> None:
    """Room for one node: b is admitted at the next round. Room for two: the last call (2 s)
    gives others the chance to come along first."""
    joined_at: list[float] = []

    def b_joins(tick: int, s: Script) -> None:
        if s.generation == 0 and tick == 4:
            s.join("b")  # type: ignore[attr-defined]
            joined_at.append(s.clock())

    s = elastic_scripts(elastic_config(nnodes=nnodes), {0: {0: RUNS, 1: RUNS}}, finish={1: 1}, on_tick=b_joins)
    s.join("a")

    result = s.run()

    assert result.outcome is Outcome.SUCCEEDED
    assert [g.outcome for g in result.generations] == [Outcome.RESIZED, Outcome.SUCCEEDED]
    assert result.generations[0].message == "1 node(s) joined (host-b)"
    assert result.restarts == 0 and result.resizes == 1
    assert [(g, nodes) for g, nodes, _ in s.began] == [(0, (MASTER_AGENT, "a")), (1, (MASTER_AGENT, "a", "b"))]
    waited = s.began[1][2] - joined_at[0]
    assert waits_s <= waited < waits_s + 2 * s.config.monitor_interval_s
    assert s.resized == [0]
    assert (s.registry.nnodes, s.registry.world_size) == (3, 6)


def test_a_silent_node_is_dropped_until_it_joins_again(elastic_scripts) -> None:
    events: dict[str, float] = {}

    def b_goes_silent_then_rejoins(tick: int, s: Script) -> None:
        if s.generation == 0 and tick == 2:
            s.mute.add("b")  # type: ignore[attr-defined]
            events["last_seen"] = s.clock() - s.config.monitor_interval_s  # the tick before
        elif s.generation == 1 and tick >= 4:
            s.registry.node_seen("b")  # its old stream's heartbeats come back: not enough
            if tick == 8:
                s.mute.discard("b")  # type: ignore[attr-defined]
                s.join("b")  # type: ignore[attr-defined]
                events["rejoined"] = s.clock()

    fates = {0: {0: RUNS, 1: RUNS}, 1: {0: RUNS, 1: RUNS}}
    s = elastic_scripts(elastic_config(), fates, finish={2: 1}, on_tick=b_goes_silent_then_rejoins)
    s.join("a")
    s.join("b")
    old_serial = s.serials["b"]

    result = s.run()

    assert result.outcome is Outcome.SUCCEEDED
    assert [g.outcome for g in result.generations] == [Outcome.RESIZED, Outcome.RESIZED, Outcome.SUCCEEDED]
    assert result.generations[0].message.startswith("node 2 (host-b) lost: no heartbeat from its launcher for")
    assert result.generations[1].message == "1 node(s) joined (host-b)"
    assert [(g, nodes) for g, nodes, _ in s.began] == [
        (0, (MASTER_AGENT, "a", "b")),
        (1, (MASTER_AGENT, "a")),
        (2, (MASTER_AGENT, "a", "b")),
    ]
    # Lost once silent for more than node_silent_s (5 s), not before.
    silent_s = supervisor_module.node_silent_s(s.config)
    assert silent_s == 5.0
    silent_for = s.began[1][2] - events["last_seen"]
    assert silent_s < silent_for <= silent_s + s.config.monitor_interval_s
    # Generation 1 ran on until b joined again on a new stream.
    assert s.began[2][2] == pytest.approx(events["rejoined"] + s.config.monitor_interval_s)
    assert s.serials["b"] != old_serial
    assert result.restarts == 0 and result.resizes == 2

"""The Registry as a plain object: a fake clock, a fake port picker, no sockets, no processes."""

from __future__ import annotations

import math
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddp_launch.progress import Progress
from ddp_launch.registry import RATE_WINDOW_S, BarrierResult, RankState, Registry, Rejected
from tests.fakes import FakeClock

DDP_ADDR = "127.0.0.1"


class FakePorts:
    """A port picker that hands out increasing ports, so every generation's port differs."""

    def __init__(self, first: int = 30000) -> None:
        self.next = first
        self.hosts: list[str] = []

    def __call__(self, host: str) -> int:
        self.hosts.append(host)
        port = self.next
        self.next += 1
        return port


class ObservedCondition(threading.Condition):
    """A Condition that says when someone started waiting on it (to test wake-ups without sleeps)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def ports() -> FakePorts:
    return FakePorts()


def make_registry(
    clock: FakeClock,
    ports: FakePorts | None = None,
    *,
    nnodes: int = 1,
    local_world_size: int = 2,
    max_restarts: int = 3,
    ddp_port: int | None = None,
) -> Registry:
    return Registry(
        run_id="run-1",
        nnodes=nnodes,
        local_world_size=local_world_size,
        max_restarts=max_restarts,
        ddp_addr=DDP_ADDR,
        ddp_port=ddp_port,
        port_picker=ports or FakePorts(),
        clock=clock,
    )


def pid_of(rank: int, generation: int = 0) -> int:
    return 1000 + 100 * generation + rank


def register(reg: Registry, rank: int, generation: int = 0, pid: int | None = None):
    return reg.register(
        node_rank=rank // reg.local_world_size,
        local_rank=rank % reg.local_world_size,
        pid=pid if pid is not None else pid_of(rank, generation),
        hostname=f"host{rank // reg.local_world_size}",
        generation=generation,
    )


def register_all(reg: Registry, generation: int = 0) -> None:
    for rank in range(reg.world_size):
        register(reg, rank, generation)


def progress(step: int | None = None, **kw) -> Progress:
    """A heartbeat's progress in which the script reported `step` (the tests' usual case)."""
    return Progress(reported_step=step, **kw)


def beat(reg: Registry, rank: int, step: int, generation: int = 0, **kw) -> bool:
    return reg.heartbeat(rank=rank, generation=generation, pid=pid_of(rank, generation), progress=progress(step, **kw))


def states(reg: Registry) -> list[RankState]:
    return [r.state for r in reg.snapshot().ranks]


# -- rank assignment ---------------------------------------------------------------------


@pytest.mark.parametrize(("nnodes", "local_world_size"), [(1, 1), (1, 4), (2, 2), (2, 3)])
def test_rank_is_node_rank_times_local_world_size_plus_local_rank(clock, ports, nnodes, local_world_size):
    reg = make_registry(clock, ports, nnodes=nnodes, local_world_size=local_world_size)
    # Registration order must not matter: walk the slots backwards.
    for node_rank in reversed(range(nnodes)):
        for local_rank in reversed(range(local_world_size)):
            a = reg.register(
                node_rank=node_rank,
                local_rank=local_rank,
                pid=4000 + node_rank * 100 + local_rank,
                hostname="h",
                generation=0,
            )
            assert a.rank == node_rank * local_world_size + local_rank
            assert (a.node_rank, a.local_rank) == (node_rank, local_rank)
            assert a.world_size == nnodes * local_world_size
            assert a.local_world_size == local_world_size
            assert a.nnodes == nnodes
            assert (a.ddp_addr, a.ddp_port) == (DDP_ADDR, 30000)
            assert (a.run_id, a.generation, a.max_restarts) == ("run-1", 0, 3)
    snap = reg.snapshot()
    assert [(r.rank, r.node_rank, r.local_rank) for r in snap.ranks] == [
        (n * local_world_size + lr, n, lr) for n in range(nnodes) for lr in range(local_world_size)
    ]


def test_two_nodes_second_node_gets_the_upper_ranks(clock):
    reg = make_registry(clock, nnodes=2, local_world_size=2)
    a = reg.register(node_rank=1, local_rank=0, pid=11, hostname="node-b", generation=0)
    assert a.rank == 2
    assert reg.snapshot().ranks[2].hostname == "node-b"
    assert reg.unregistered_ranks() == [0, 1, 3]


@given(
    nnodes=st.integers(1, 4),
    local_world_size=st.integers(1, 4),
    order=st.randoms(use_true_random=False),
)
def test_any_registration_order_gives_each_rank_once_and_opens_the_barrier(nnodes, local_world_size, order):
    reg = make_registry(FakeClock(1000.0), nnodes=nnodes, local_world_size=local_world_size)
    slots = [(n, lr) for n in range(nnodes) for lr in range(local_world_size)]
    order.shuffle(slots)
    ranks = []
    for i, (n, lr) in enumerate(slots):
        assert not reg.barrier_open
        ranks.append(reg.register(node_rank=n, local_rank=lr, pid=100 + i, hostname="h", generation=0).rank)
    assert sorted(ranks) == list(range(nnodes * local_world_size))
    assert reg.barrier_open


# -- rejected registrations -------------------------------------------------------------


@pytest.mark.parametrize(
    ("node_rank", "local_rank", "pid"),
    [(0, -1, 10), (0, 2, 10), (0, 99, 10), (-1, 0, 10), (2, 0, 10), (0, 0, 0), (0, 0, -5)],
)
def test_out_of_range_slot_or_bad_pid_is_invalid_and_changes_nothing(clock, node_rank, local_rank, pid):
    reg = make_registry(clock, nnodes=2, local_world_size=2)
    before = reg.snapshot()
    with pytest.raises(Rejected) as e:
        reg.register(node_rank=node_rank, local_rank=local_rank, pid=pid, hostname="h", generation=0)
    assert e.value.reason == Rejected.INVALID
    assert reg.snapshot() == before
    assert reg.unregistered_ranks() == [0, 1, 2, 3]


def test_a_generation_that_is_not_the_current_one_is_stale(clock):
    reg = make_registry(clock)
    with pytest.raises(Rejected) as e:
        register(reg, 0, generation=1)  # from the future
    assert e.value.reason == Rejected.STALE
    reg.begin_generation(1)
    with pytest.raises(Rejected) as e:
        register(reg, 0, generation=0)  # a worker of the old generation, late
    assert e.value.reason == Rejected.STALE
    assert reg.unregistered_ranks() == [0, 1]


def test_a_slot_held_by_another_pid_is_a_duplicate(clock):
    reg = make_registry(clock)
    register(reg, 0, pid=111)
    with pytest.raises(Rejected) as e:
        register(reg, 0, pid=222)
    assert e.value.reason == Rejected.DUPLICATE
    snap = reg.snapshot()
    assert snap.ranks[0].pid == 111
    assert not snap.barrier_open


def test_over_registration_of_a_full_world_is_a_duplicate(clock):
    reg = make_registry(clock)
    register_all(reg)
    with pytest.raises(Rejected) as e:
        register(reg, 1, pid=9999)
    assert e.value.reason == Rejected.DUPLICATE
    assert reg.snapshot().ranks[1].pid == pid_of(1)


def test_the_same_pid_registering_again_gets_the_same_assignment(clock):
    reg = make_registry(clock)
    first = register(reg, 1, pid=111)
    clock.advance(1)
    again = register(reg, 1, pid=111)  # a retried RPC whose first reply was lost
    assert again == first
    assert not reg.barrier_open  # counted once: rank 0 is still missing
    assert reg.unregistered_ranks() == [0]


# -- the start barrier ------------------------------------------------------------------


def test_barrier_opens_only_when_every_rank_registered(clock):
    reg = make_registry(clock, local_world_size=3)
    assert not reg.barrier_open
    register(reg, 2)
    register(reg, 0)
    assert not reg.barrier_open
    assert not reg.snapshot().barrier_open
    assert states(reg) == [RankState.WAITING, RankState.STARTING, RankState.WAITING]
    register(reg, 1)
    assert reg.barrier_open
    assert reg.snapshot().barrier_open
    assert states(reg) == [RankState.TRAINING] * 3


def test_wait_barrier_times_out_closed_when_incomplete(clock):
    reg = make_registry(clock)
    register(reg, 0)
    t0 = time.monotonic()
    r = reg.wait_barrier(rank=0, generation=0, timeout_s=0)
    assert (r.open, r.superseded) == (False, False)
    assert time.monotonic() - t0 < 5


def test_wait_barrier_is_open_when_complete(clock):
    reg = make_registry(clock)
    register_all(reg)
    r = reg.wait_barrier(rank=1, generation=0, timeout_s=0)
    assert (r.open, r.superseded) == (True, False)


def test_wait_barrier_of_an_old_generation_is_superseded(clock):
    reg = make_registry(clock)
    register_all(reg)
    reg.begin_generation(1)
    r = reg.wait_barrier(rank=0, generation=0, timeout_s=0)
    assert (r.open, r.superseded) == (False, True)


def test_wait_barrier_of_an_unregistered_rank_is_unknown(clock):
    reg = make_registry(clock)
    register(reg, 0)
    with pytest.raises(Rejected) as e:
        reg.wait_barrier(rank=1, generation=0, timeout_s=0)
    assert e.value.reason == Rejected.UNKNOWN
    with pytest.raises(Rejected) as e:
        reg.wait_barrier(rank=5, generation=0, timeout_s=0)
    assert e.value.reason == Rejected.INVALID


def _wait_in_thread(reg: Registry, rank: int, generation: int) -> tuple[threading.Thread, list]:
    results: list = []
    thread = threading.Thread(
        target=lambda: results.append(reg.wait_barrier(rank=rank, generation=generation, timeout_s=30)),
        daemon=True,
    )
    thread.start()
    return thread, results


@pytest.mark.timeout(30)
def test_a_waiter_is_released_when_the_last_rank_registers(clock):
    reg = make_registry(clock)
    reg._cond = ObservedCondition()  # the seam: know when the waiter is really waiting
    register(reg, 0)
    thread, results = _wait_in_thread(reg, 0, 0)
    assert reg._cond.waiting.wait(10), "the waiter never started waiting"
    t0 = time.monotonic()
    register(reg, 1)
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - t0 < 10
    assert [(r.open, r.superseded) for r in results] == [(True, False)]


@pytest.mark.timeout(30)
def test_a_waiter_is_superseded_when_a_new_generation_begins(clock):
    reg = make_registry(clock)
    reg._cond = ObservedCondition()
    register(reg, 0)
    thread, results = _wait_in_thread(reg, 0, 0)
    assert reg._cond.waiting.wait(10), "the waiter never started waiting"
    reg.begin_generation(1)
    thread.join(10)
    assert not thread.is_alive(), "begin_generation did not wake the barrier waiter"
    assert [(r.open, r.superseded) for r in results] == [(False, True)]


# -- generations ------------------------------------------------------------------------


def test_begin_generation_picks_a_fresh_port_and_resets_every_slot(clock, ports):
    reg = make_registry(clock, ports)
    register_all(reg)
    beat(reg, 0, step=7, loss=0.5)
    assert reg.ddp_port == 30000
    reg.begin_generation(1)
    assert (reg.generation, reg.ddp_port) == (1, 30001)
    assert ports.hosts == [DDP_ADDR, DDP_ADDR]
    snap = reg.snapshot()
    assert snap.generation == 1
    assert not snap.barrier_open
    assert [r.state for r in snap.ranks] == [RankState.STARTING] * 2
    assert [(r.pid, r.step, r.loss, r.heartbeat_age_s) for r in snap.ranks] == [(0, 0, None, None)] * 2
    assert reg.unregistered_ranks() == [0, 1]
    a = register(reg, 0, generation=1)
    assert (a.generation, a.ddp_port) == (1, 30001)
    reg.begin_generation(3)  # generations may skip, never go back
    assert reg.ddp_port == 30002


def test_a_pinned_ddp_port_is_kept_across_generations(clock, ports):
    reg = make_registry(clock, ports, ddp_port=29500)
    assert reg.ddp_port == 29500
    reg.begin_generation(1)
    assert reg.ddp_port == 29500
    assert register(reg, 0, generation=1).ddp_port == 29500
    assert ports.hosts == []  # never asked


@pytest.mark.parametrize("generation", [0, -1])
def test_begin_generation_must_move_forward(clock, generation):
    reg = make_registry(clock)
    with pytest.raises(ValueError):
        reg.begin_generation(generation)
    assert reg.generation == 0


# -- heartbeats -------------------------------------------------------------------------


def test_heartbeat_is_recorded_and_shown_in_the_snapshot(clock):
    reg = make_registry(clock)
    register_all(reg)
    clock.advance(1)
    superseded = beat(reg, 0, step=5, samples=160, loss=0.25, metrics={"lr": 0.1, "acc": 0.5}, total_steps=100)
    assert superseded is False
    clock.advance(2)
    snap = reg.snapshot()
    r0 = snap.ranks[0]
    assert (r0.step, r0.samples, r0.loss) == (5, 160, 0.25)
    assert r0.metrics == {"lr": 0.1, "acc": 0.5}
    assert r0.heartbeat_age_s == pytest.approx(2.0)
    assert r0.pid == pid_of(0)
    assert snap.total_steps == 100
    assert snap.ranks[1].step == 0
    assert snap.ranks[1].heartbeat_age_s == pytest.approx(3.0)  # the heartbeat clock starts at the barrier
    # A later heartbeat without loss keeps the last loss; it carries the worker's whole set
    # of metrics, which replaces the last one (so a rank's metrics stay bounded).
    beat(reg, 0, step=6, samples=192, metrics={"lr": 0.1, "acc": 0.75})
    r0 = reg.snapshot().ranks[0]
    assert (r0.step, r0.loss, r0.metrics) == (6, 0.25, {"lr": 0.1, "acc": 0.75})


def test_steps_per_s_comes_from_the_window(clock):
    reg = make_registry(clock)
    register_all(reg)
    beat(reg, 0, step=0)
    assert reg.snapshot().ranks[0].steps_per_s == 0.0  # one point is no rate
    for step in (10, 20, 30):
        clock.advance(1)
        beat(reg, 0, step=step)
    assert reg.snapshot().ranks[0].steps_per_s == pytest.approx(10.0)


def test_steps_per_s_forgets_what_left_the_window(clock):
    reg = make_registry(clock)
    register_all(reg)
    beat(reg, 0, step=0)
    clock.advance(1)
    beat(reg, 0, step=1000)  # a burst, long ago
    step = 1000
    for _ in range(int(RATE_WINDOW_S) + 5):
        clock.advance(1)
        step += 2
        beat(reg, 0, step=step)
    assert reg.snapshot().ranks[0].steps_per_s == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_is_ignored(clock, bad):
    reg = make_registry(clock)
    register_all(reg)
    beat(reg, 0, step=1, loss=bad)
    assert reg.snapshot().ranks[0].loss is None
    beat(reg, 0, step=2, loss=0.5)
    beat(reg, 0, step=3, loss=bad)
    r0 = reg.snapshot().ranks[0]
    assert (r0.step, r0.loss) == (3, 0.5)
    assert reg.snapshot().loss == 0.5


@pytest.mark.parametrize(
    "metrics",
    [
        {"ok": 1.5, "nan": math.nan},
        {"inf": math.inf},
        {"x" * 65: 1.0},
        {"": 1.0},
        {f"m{i}": 1.0 for i in range(33)},
    ],
)
def test_bad_metrics_are_invalid_and_change_nothing(clock, metrics):
    reg = make_registry(clock)
    register_all(reg)
    beat(reg, 0, step=1, metrics={"ok": 1.0})
    before = reg.snapshot().ranks[0]
    with pytest.raises(Rejected) as e:
        beat(reg, 0, step=2, metrics=metrics)
    assert e.value.reason == Rejected.INVALID
    after = reg.snapshot().ranks[0]
    assert (after.step, after.metrics) == (before.step, before.metrics)


def test_a_diverged_loss_is_shown_as_missing_not_rejected(clock):
    reg = make_registry(clock)
    register_all(reg)
    beat(reg, 0, step=1, loss=math.nan)
    assert reg.snapshot().ranks[0].step == 1 and reg.snapshot().ranks[0].loss is None


def test_an_oversized_hostname_is_invalid(clock):
    reg = make_registry(clock)
    with pytest.raises(Rejected) as e:
        reg.register(node_rank=0, local_rank=0, pid=10, hostname="h" * 257, generation=0)
    assert e.value.reason == Rejected.INVALID
    assert reg.unregistered_ranks() == [0, 1]


@pytest.mark.parametrize("field", ["reported_step", "optimizer_steps", "samples", "total_steps"])
def test_negative_counts_are_invalid_and_change_nothing(clock, field):
    reg = make_registry(clock)
    register_all(reg)
    beat(reg, 0, step=3)
    before = reg.snapshot()
    kw = {"reported_step": 4, "samples": 0, "total_steps": 0} | {field: -1}
    with pytest.raises(Rejected) as e:
        reg.heartbeat(rank=0, generation=0, pid=pid_of(0), progress=Progress(**kw))
    assert e.value.reason == Rejected.INVALID
    assert reg.snapshot() == before


def test_heartbeat_from_an_unregistered_rank_is_unknown(clock):
    reg = make_registry(clock)
    register(reg, 0)
    with pytest.raises(Rejected) as e:
        beat(reg, 1, step=1)
    assert e.value.reason == Rejected.UNKNOWN
    with pytest.raises(Rejected) as e:
        reg.heartbeat(rank=2, generation=0, pid=1, progress=progress(1))  # not a rank at all
    assert e.value.reason == Rejected.INVALID


def test_heartbeat_from_a_pid_that_does_not_hold_the_slot_is_a_duplicate(clock):
    reg = make_registry(clock)
    register_all(reg)
    before = reg.snapshot()
    with pytest.raises(Rejected) as e:
        reg.heartbeat(rank=0, generation=0, pid=pid_of(1), progress=progress(9))
    assert e.value.reason == Rejected.DUPLICATE
    assert reg.snapshot() == before


def test_heartbeat_from_a_future_generation_is_stale(clock):
    reg = make_registry(clock)
    register_all(reg)
    with pytest.raises(Rejected) as e:
        beat(reg, 0, step=1, generation=1)
    assert e.value.reason == Rejected.STALE


def test_heartbeat_from_an_older_generation_says_superseded_and_changes_nothing(clock):
    reg = make_registry(clock)
    register_all(reg)
    reg.begin_generation(1)
    register(reg, 0, generation=1)
    beat(reg, 0, step=2, generation=1, loss=1.0)
    before = reg.snapshot()
    assert beat(reg, 0, step=50, generation=0, loss=9.0, samples=7, total_steps=80) is True
    assert beat(reg, 1, step=50, generation=0) is True  # not registered in gen 1: still just "superseded"
    assert reg.snapshot() == before


# -- hang verdicts ----------------------------------------------------------------------


def test_no_heartbeat_for_longer_than_the_timeout_is_a_hang(clock):
    reg = make_registry(clock)
    register_all(reg)  # the barrier opens at t=1000; heartbeats are due from then on
    clock.advance(10)
    beat(reg, 1, step=0)
    assert reg.find_hung(10) == []  # exactly the timeout is not more than it
    clock.advance(1)
    (v,) = reg.find_hung(10)
    assert v.rank == 0
    assert "no heartbeat" in v.reason
    assert v.stalled_for_s == pytest.approx(11)
    assert v.last_sign_of_life == 1000


def test_a_step_that_does_not_advance_after_the_first_step_is_a_hang(clock):
    reg = make_registry(clock)
    register_all(reg)
    beat(reg, 0, step=0)  # a worker's first heartbeat goes out before its script starts
    for t in range(1, 13):
        clock.advance(1)
        beat(reg, 0, step=1)  # heartbeats keep coming, the step does not
        beat(reg, 1, step=t)
        if t <= 11:
            assert reg.find_hung(10) == [], t
    (v,) = reg.find_hung(10)
    assert v.rank == 0
    assert "step 1 has not advanced" in v.reason
    assert v.stalled_for_s == pytest.approx(11)


def test_a_paused_run_is_not_hung_for_the_time_it_was_paused(clock):
    reg = make_registry(clock)
    register_all(reg)
    beat(reg, 0, step=0)
    beat(reg, 1, step=0)
    clock.advance(1)
    beat(reg, 0, step=1)  # both past their first step: both hang rules apply
    beat(reg, 1, step=1)
    clock.advance(600)  # Ctrl-Z, and `fg` ten minutes later
    assert len(reg.find_hung(10)) == 2
    reg.excuse_pause()
    assert reg.find_hung(10) == []
    clock.advance(11)  # nothing since the pause ended: hung again, by the same rules
    assert [v.rank for v in reg.find_hung(10)] == [0, 1]


def test_a_resumed_step_reported_before_the_first_step_does_not_start_the_step_clock(clock):
    reg = make_registry(clock)
    register_all(reg)
    beat(reg, 0, step=500)  # resumed from a checkpoint; the first real step is slow
    beat(reg, 1, step=500)
    clock.advance(60)
    beat(reg, 0, step=500)
    beat(reg, 1, step=500)
    assert reg.find_hung(10) == []


def test_a_rank_before_its_first_step_is_not_hung_while_it_heartbeats(clock):
    reg = make_registry(clock)
    register_all(reg)
    for _ in range(100):  # a long first step: data loading, compilation
        clock.advance(1)
        beat(reg, 0, step=0)
        beat(reg, 1, step=0)
    assert reg.find_hung(10) == []


@pytest.mark.parametrize("timeout", [0, -1])
def test_a_hang_timeout_of_zero_disables_detection(clock, timeout):
    reg = make_registry(clock)
    register_all(reg)
    clock.advance(10_000)
    assert reg.find_hung(timeout) == []
    assert len(reg.find_hung(10)) == 2


def test_only_training_ranks_can_hang(clock):
    reg = make_registry(clock, local_world_size=3)
    register(reg, 0)
    clock.advance(1000)
    assert reg.find_hung(10) == []  # waiting at the barrier is the join timeout's business
    register(reg, 1)
    register(reg, 2)
    reg.record_exit(1, 0, 0)
    reg.mark_hung(2)
    clock.advance(1000)
    assert [v.rank for v in reg.find_hung(10)] == [0]


def test_verdicts_put_the_rank_that_stopped_first_first(clock):
    reg = make_registry(clock, local_world_size=3)
    register_all(reg)
    steps = [0, 0, 0]
    for t in range(1, 8):
        clock.advance(1)
        steps[1] = t
        if t <= 3:
            steps[2] = t  # rank 2 stops stepping first (after t=1003) but keeps heartbeating
        if t <= 5:
            steps[0] = t  # then rank 0 (after t=1005)
        beat(reg, 0, step=steps[0])
        beat(reg, 2, step=steps[2])
        if t <= 6:
            beat(reg, 1, step=steps[1])  # rank 1 steps until it falls silent (after t=1006)
    for _ in range(30):  # the two still heartbeat, the step stays
        clock.advance(1)
        beat(reg, 0, step=steps[0])
        beat(reg, 2, step=steps[2])
    verdicts = reg.find_hung(10)
    assert [v.rank for v in verdicts] == [2, 0, 1]
    assert [v.last_sign_of_life for v in verdicts] == [1003, 1005, 1006]
    assert "no heartbeat" in verdicts[2].reason


# -- exits and failures -----------------------------------------------------------------


def test_record_exit_sets_done_or_failed(clock):
    reg = make_registry(clock)
    register_all(reg)
    reg.record_exit(0, 0, 0)
    reg.record_exit(1, 0, -9)
    ranks = reg.snapshot().ranks
    assert [(r.state, r.exit_code) for r in ranks] == [(RankState.DONE, 0), (RankState.FAILED, -9)]


def test_record_exit_of_an_old_generation_is_ignored(clock):
    reg = make_registry(clock)
    register_all(reg)
    reg.begin_generation(1)
    reg.record_exit(0, 0, 1)
    assert reg.snapshot().ranks[0].state is RankState.STARTING
    assert reg.snapshot().ranks[0].exit_code is None


def test_a_rank_that_died_before_the_barrier_stays_failed(clock):
    reg = make_registry(clock)
    register(reg, 0)
    reg.record_exit(0, 0, 1)  # died between Register and the barrier
    register(reg, 1)
    clock.advance(1000)
    r0 = reg.snapshot().ranks[0]
    assert (r0.state, r0.exit_code) == (RankState.FAILED, 1)
    assert [v.rank for v in reg.find_hung(10)] == [1]  # a dead rank is not "hung"


def test_report_failure_stores_the_traceback_for_the_snapshot(clock):
    reg = make_registry(clock)
    register_all(reg)
    tb = 'Traceback (most recent call last):\n  File "train.py", line 3\nZeroDivisionError: division by zero\n'
    reg.report_failure(rank=1, generation=0, pid=pid_of(1), exception_type="ZeroDivisionError", traceback=tb)
    r1 = reg.snapshot().ranks[1]
    assert (r1.exception_type, r1.traceback) == ("ZeroDivisionError", tb)
    assert reg.snapshot().ranks[0].traceback == ""


def test_report_failure_from_a_stranger_is_rejected(clock):
    reg = make_registry(clock)
    register(reg, 0)
    with pytest.raises(Rejected) as e:
        reg.report_failure(rank=1, generation=0, pid=5, exception_type="E", traceback="tb")
    assert e.value.reason == Rejected.UNKNOWN
    with pytest.raises(Rejected) as e:
        reg.report_failure(rank=0, generation=0, pid=5, exception_type="E", traceback="tb")
    assert e.value.reason == Rejected.DUPLICATE
    assert reg.snapshot().ranks[0].traceback == ""


# -- threads ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_concurrent_registrations_give_every_rank_once(clock):
    reg = make_registry(clock, nnodes=2, local_world_size=4)
    ranks: list[int] = []
    lock = threading.Lock()

    def join(rank: int) -> None:
        a = register(reg, rank)
        with lock:
            ranks.append(a.rank)

    threads = [threading.Thread(target=join, args=(r,), daemon=True) for r in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(ranks) == list(range(8))
    assert reg.barrier_open


def test_a_stall_is_dated_from_the_step_the_worker_saw_not_from_the_heartbeat(clock):
    reg = make_registry(clock)
    register_all(reg)
    beat(reg, 0, step=0)
    beat(reg, 1, step=0)
    clock.advance(1.0)
    beat(reg, 0, step=7, step_age_s=0.8)  # the step moved 0.8 s before this heartbeat
    beat(reg, 1, step=7, step_age_s=0.0)
    for _ in range(10):
        clock.advance(1.0)
        beat(reg, 0, step=7, step_age_s=99.0)
        beat(reg, 1, step=7, step_age_s=99.0)
    clock.advance(0.1)  # rank 0 stalled 10.9 s ago by its own clock, rank 1 10.1 s ago
    (v,) = [v for v in reg.find_hung(10.5)]
    assert v.rank == 0 and v.stalled_for_s == pytest.approx(10.9)


def test_a_step_age_never_dates_a_step_before_the_previous_heartbeat(clock):
    reg = make_registry(clock)
    register_all(reg)
    beat(reg, 0, step=0)
    clock.advance(1.0)
    beat(reg, 0, step=3, step_age_s=1e9)  # a bogus age is clamped to the previous heartbeat (t=0)
    clock.advance(5.0)
    beat(reg, 0, step=3)
    assert [v.stalled_for_s for v in reg.find_hung(4) if v.rank == 0] == [pytest.approx(6.0)]


def test_with_rank0_serving_the_store_the_barrier_opens_only_once_rank0_waits_at_it(clock) -> None:
    """Rank 0's worker serves the DDP store and then comes to the barrier: until it is there,
    a rank that passed the barrier could find no store and wait out torch's back-off."""
    reg = Registry(
        run_id="r", nnodes=1, local_world_size=2, max_restarts=0, ddp_addr="127.0.0.1", ddp_port=29500,
        clock=clock, barrier_waits_for_rank0=True,
    )  # fmt: skip
    register_all(reg)
    assert not reg.barrier_open
    assert reg.wait_barrier(rank=1, generation=0, timeout_s=0) == BarrierResult(open=False, superseded=False)
    assert reg.wait_barrier(rank=0, generation=0, timeout_s=0) == BarrierResult(open=True, superseded=False)
    assert reg.barrier_open and reg.wait_barrier(rank=1, generation=0, timeout_s=0).open
    reg.begin_generation(1)  # rank 0 of generation 1 comes first this time: it waits for the rest
    register(reg, 0, generation=1)
    assert reg.wait_barrier(rank=0, generation=1, timeout_s=0).open is False
    register(reg, 1, generation=1)
    assert reg.barrier_open

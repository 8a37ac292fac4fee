"""The event log: the events a real registry's transitions give, each dated when it happened;
progress samples from hand-built snapshots with a fake clock; the size bound; the schema; and
reading a file that a killed run left behind."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddp_launch.observe.events import (
    EVENT_KINDS,
    SCHEMA_VERSION,
    SLOWEST_LIMIT,
    EventLog,
    read_events,
    schema,
    validate_event,
)
from ddp_launch.record import SAMPLE_FIELDS, RankRecord, RankState
from ddp_launch.registry import Rejected, RunSnapshot, Transition
from tests.fakes import FakeClock
from tests.unit.run_fakes import T0, FakeRun, resume_from_checkpoint

FINAL_STATES = {s.value for s in RankState if s.final}


def rank(i: int, **kw: object) -> RankRecord:
    """A training rank as the registry's snapshot would give it."""
    fields: dict[str, object] = {
        "rank": i,
        "node_rank": 0,
        "local_rank": i,
        "generation": 0,
        "state": RankState.TRAINING,
        "pid": 1000 + i,
        "hostname": "host",
        "optimizer_steps": 120,
        "reported_step": None,
        "samples": 120 * 32,
        "steps_per_s": 43.1,
        "loss": 0.231,
        "rss_bytes": 312_000_000,
        "cpu_percent": 98.0,
        "heartbeat_age_s": 0.5,
    }
    fields.update(kw)
    return RankRecord(**fields)  # type: ignore[arg-type]


def starting(i: int, **kw: object) -> RankRecord:
    fields: dict[str, object] = {
        "state": RankState.STARTING,
        "pid": 0,
        "hostname": "",
        "optimizer_steps": 0,
        "samples": 0,
        "steps_per_s": 0.0,
        "loss": None,
        "rss_bytes": 0,
        "cpu_percent": 0.0,
        "heartbeat_age_s": None,
    }
    fields.update(kw)
    return rank(i, **fields)


def snapshot(ranks: list[RankRecord], **kw: object) -> RunSnapshot:
    fields: dict[str, object] = {
        "run_id": "run-1",
        "world_size": len(ranks),
        "generation": 0,
        "max_restarts": 3,
        "elapsed_s": 10.0,
        "total_steps": 300,
        "barrier_open": all(r.state is not RankState.STARTING for r in ranks),
        "ranks": tuple(ranks),
        "taken_at": 10.0,
    }
    fields.update(kw)
    return RunSnapshot(**fields)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "events.jsonl"


def kinds(path: Path) -> list[str]:
    return [e["event"] for e in read_events(path)]


def of_kind(path: Path, kind: str) -> list[dict]:
    return [e for e in read_events(path) if e["event"] == kind]


def check_all_valid(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line whole, plain json
    for e in events:
        validate_event(e)
    return events


def states_of(path: Path) -> list[tuple[int, int, str, str]]:
    """(generation, rank, state, previous) of every state event, in file order."""
    return [(e["generation"], e["rank"], e["state"], e["previous"]) for e in of_kind(path, "state")]


def train(run: FakeRun, seconds: float, *, every_s: float = 0.25, start: int = 0) -> int:
    """Every rank heartbeats one optimizer step per `every_s`, observed each time; returns
    the last step."""
    step = start
    for _ in range(round(seconds / every_s)):
        run.advance(every_s)
        step += 1
        run.heartbeat_all(optimizer_steps=step, loss=1.0 / step)
        run.observe()
    return step


# -- events from the registry's transitions --------------------------------------------------


def test_register_barrier_and_state_are_written_once_each(log_path: Path) -> None:
    with FakeRun(log_path, nproc=4, progress_interval_s=1000) as run:
        run.observe()
        run.at(1.0)
        run.register(0)
        run.register(1)
        for _ in range(3):
            run.observe()
        run.at(2.0)
        run.register(2)
        run.register(3)
        for step in range(1, 6):
            run.advance(0.5)
            run.heartbeat_all(optimizer_steps=step)
            run.observe()
        run.advance(0.5)
        run.exit(2, 1)
        for _ in range(5):
            run.observe()

    events = check_all_valid(log_path)
    registers = [e for e in events if e["event"] == "register"]
    assert [e["rank"] for e in registers] == [0, 1, 2, 3]
    assert registers[0] == {
        "v": SCHEMA_VERSION,
        "t": T0 + 1.0,
        "event": "register",
        "rank": 0,
        "node_rank": 0,
        "local_rank": 0,
        "pid": 1000,
        "hostname": "node-0",
        "generation": 0,
    }
    barriers = [e for e in events if e["event"] == "barrier_open"]
    assert [(e["t"], e["generation"], e["world_size"]) for e in barriers] == [(T0 + 2.0, 0, 4)]
    # the barrier follows the registrations that opened it
    assert [e["event"] for e in events if e["event"] != "progress"][:5] == ["register"] * 4 + ["barrier_open"]
    [state] = [e for e in events if e["event"] == "state"]
    assert state == {
        "v": SCHEMA_VERSION,
        "t": T0 + 5.0,
        "event": "state",
        "rank": 2,
        "generation": 0,
        "state": "failed",
        "previous": "training",
        "step": 5,
        "optimizer_steps": 5,
        "reported_step": None,
        "exit_code": 1,
        "exit": "exit code 1",
    }


def test_each_event_carries_the_time_it_happened(log_path: Path) -> None:
    with FakeRun(log_path, nproc=4) as run:
        for r, at in enumerate((1.0, 1.1, 1.2, 1.3)):
            run.at(at)
            run.register(r)
        run.at(2.0)
        run.exit(2, 1)
        run.at(2.25)
        assert run.wall() == 1_700_000_002.25
        run.observe()  # the only observation: every event is dated by the registry's journal
    events = check_all_valid(log_path)
    assert [e["event"] for e in events] == ["register"] * 4 + ["barrier_open", "state", "progress"]
    expected = [1_700_000_001.0, 1_700_000_001.1, 1_700_000_001.2, 1_700_000_001.3] + [
        1_700_000_001.3,
        1_700_000_002.0,
        1_700_000_002.25,
    ]
    assert [e["t"] for e in events] == pytest.approx(expected, abs=1e-6)
    assert events[5]["state"] == "failed"
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)


def test_events_drained_late_are_still_written_in_the_order_they_happened(log_path: Path) -> None:
    """A transition reaches the log only at the next observation; the file is ordered by when
    things happened, not by the order of the journal's kinds."""
    with FakeRun(log_path, progress_interval_s=1.0) as run:
        run.at(1.0)
        run.register_all()
        run.heartbeat_all(optimizer_steps=1)
        run.observe()  # t = 1.0: registers, barrier, progress
        run.at(1.5)
        run.exit(1, 0)
        run.at(2.0)
        run.exit(0, 0)
        run.at(4.0)
        run.observe()
    events = check_all_valid(log_path)
    assert [(e["event"], e.get("rank"), e["t"] - T0) for e in events[-3:]] == [
        ("state", 1, 1.5),
        ("state", 0, 2.0),
        ("progress", None, 4.0),
    ]
    ts = [e["t"] for e in events]
    assert ts == sorted(ts)


def test_a_transition_between_the_snapshot_and_the_drain_is_written_after_the_sample(log_path: Path) -> None:
    """The launcher's tick: the supervisor takes the snapshot, a worker ends, then the tick
    drains the journal. The sample is dated at the snapshot, the end after it."""
    with FakeRun(log_path) as run:
        run.at(1.0)
        run.register_all()
        run.heartbeat_all(optimizer_steps=1)
        snap = run.registry.snapshot()  # at registry time 1.0, wall T0 + 1.0
        run.clock.advance(0.5)  # only the registry's clock: the log converts through the snapshot
        run.exit(0, 1)
        run.log.observe(snap, run.registry.drain_transitions())
    assert [(e["event"], round(e["t"] - T0, 3)) for e in read_events(log_path)][-2:] == [
        ("progress", 1.0),
        ("state", 1.5),
    ]


def test_a_state_transition_to_a_state_that_is_not_final_is_not_written(log_path: Path, clock: FakeClock) -> None:
    training = rank(0)
    with EventLog(log_path, clock=clock, progress_interval_s=1000) as log:
        log.observe(snapshot([training]), [Transition(9.0, "state", 0, training, {"previous": "waiting"})])
        failed = rank(0, state=RankState.FAILED, exit_code=-11)
        log.observe(snapshot([failed]), [Transition(9.5, "state", 0, failed, {"previous": "training"})])
    [state] = of_kind(log_path, "state")
    assert (state["state"], state["previous"], state["exit"], state["t"]) == (
        "failed",
        "training",
        "signal SIGSEGV",
        T0 - 0.5,
    )


def test_a_rank_that_dies_before_registering_gets_a_state_but_no_register(log_path: Path) -> None:
    with FakeRun(log_path) as run:
        run.observe()
        run.advance(1.0)
        run.exit(0, -9)
        run.observe()
    assert states_of(log_path) == [(0, 0, "failed", "starting")]
    [state] = of_kind(log_path, "state")
    assert (state["exit_code"], state["exit"]) == (-9, "signal SIGKILL")
    assert of_kind(log_path, "register") == []
    assert of_kind(log_path, "barrier_open") == []


def test_hung_then_done_are_each_recorded_and_training_is_not(log_path: Path) -> None:
    with FakeRun(log_path) as run:
        run.register_all()
        train(run, 2.0)
        run.registry.mark_hung(0)
        run.exit(1, 0)
        run.observe()
        run.stop()
        run.exit(0, -15)  # the hung rank's exit, when the group is stopped: the verdict stands
        run.registry.mark_hung(1)  # an ended rank is never hung afterwards
        run.observe()
    assert states_of(log_path) == [(0, 0, "hung", "training"), (0, 1, "done", "training")]


def test_workers_the_launcher_stopped_are_stopped_not_failed(log_path: Path) -> None:
    with FakeRun(log_path, nproc=4) as run:
        run.register_all()
        train(run, 1.0)
        run.exit(1, 1)
        run.observe()
        run.stop()  # the supervisor saw rank 1 fail and stops the group
        for r in (0, 2, 3):
            run.exit(r, -9)
        run.observe()
    assert states_of(log_path) == [
        (0, 1, "failed", "training"),
        (0, 0, "stopped", "training"),
        (0, 2, "stopped", "training"),
        (0, 3, "stopped", "training"),
    ]
    assert {e["exit"] for e in of_kind(log_path, "state") if e["state"] == "stopped"} == {"signal SIGKILL"}


@pytest.mark.parametrize("codes", [(130, -2), (-2, -2), (130, 130)])
def test_ctrl_c_ends_the_ranks_as_interrupted(log_path: Path, codes: tuple[int, int]) -> None:
    with FakeRun(log_path) as run:
        run.register_all()
        train(run, 1.0)
        run.stop(interrupted=True)
        run.exit(0, codes[0])
        run.exit(1, codes[1])
        run.observe()
    assert states_of(log_path) == [(0, 0, "interrupted", "training"), (0, 1, "interrupted", "training")]


def test_a_clean_exit_during_a_stop_is_done(log_path: Path) -> None:
    with FakeRun(log_path) as run:
        run.register_all()
        train(run, 1.0)
        run.stop(interrupted=True)
        run.exit(0, 0)  # the script caught KeyboardInterrupt, saved and returned
        run.exit(1, -2)
        run.observe()
    assert [s[2] for s in states_of(log_path)] == ["done", "interrupted"]


def test_a_new_generation_registers_and_opens_its_barrier_again(log_path: Path) -> None:
    with FakeRun(log_path) as run:
        run.register_all()
        train(run, 1.0)
        run.exit(0, 1)
        run.stop()
        run.exit(1, -15)
        run.observe()
        run.emit("restart", generation=1, reason="rank 0 failed (exit code 1)")
        run.restart()
        run.observe()
        run.advance(0.5)
        run.register_all()
        train(run, 1.0)
    events = check_all_valid(log_path)
    assert [(e["event"], e.get("generation")) for e in events if e["event"] != "progress"] == [
        ("register", 0),
        ("register", 0),
        ("barrier_open", 0),
        ("state", 0),
        ("state", 0),
        ("restart", 1),
        ("register", 1),
        ("register", 1),
        ("barrier_open", 1),
    ]
    assert [e["pid"] for e in events if e["event"] == "register"] == [1000, 1001, 1100, 1101]


def test_an_old_generations_transitions_drained_after_the_restart_keep_their_generation(log_path: Path) -> None:
    with FakeRun(log_path) as run:
        run.register_all()
        train(run, 1.0)
        run.exit(0, 1)
        run.stop()
        run.exit(1, -15)
        run.advance(0.5)
        run.restart()  # no observation in between: the journal keeps generation 0's ends
        run.registry.record_exit(1, 0, 1)  # a late report of an old worker changes nothing
        run.advance(0.5)
        run.register_all()
        run.observe()
    assert [(e["event"], e.get("generation"), e.get("rank")) for e in read_events(log_path)][-6:] == [
        ("state", 0, 0),
        ("state", 0, 1),
        ("register", 1, 0),
        ("register", 1, 1),
        ("barrier_open", 1, None),
        ("progress", 1, None),
    ]
    assert [s[2] for s in states_of(log_path)] == ["failed", "stopped"]


def test_an_older_snapshot_gets_no_progress_sample(log_path: Path) -> None:
    with FakeRun(log_path, progress_interval_s=1.0) as run:
        run.register_all()
        train(run, 1.0)
        before_restart = run.registry.snapshot()
        run.restart()
        run.register_all()
        run.advance(2.0)
        run.observe()
        run.advance(2.0)
        run.log.observe(before_restart, run.registry.drain_transitions())  # taken before the restart
        run.advance(2.0)
        run.observe()
    progress = of_kind(log_path, "progress")
    assert [p["generation"] for p in progress][-2:] == [1, 1]
    assert [round(p["t"] - T0, 3) for p in progress][-2:] == [3.0, 7.0]


def test_straggler_flag_is_written_when_it_is_raised_and_when_it_clears(log_path: Path) -> None:
    rates = [10, 10, 4, 12]
    steps = [0, 0, 0, 0]
    with FakeRun(log_path, nproc=4) as run:
        run.register_all()
        for second in range(1, 13):
            run.at(float(second))
            if second == 8:
                rates[2] = 30  # it catches up
            for r in range(4):
                steps[r] += rates[r]
                run.heartbeat(r, optimizer_steps=steps[r])
            flagged = run.registry.update_stragglers(0.5, 2.0)
            assert flagged == ([2] if second == 4 else [])
            run.observe()
    check_all_valid(log_path)
    [flag] = of_kind(log_path, "straggler")
    assert (flag["rank"], flag["generation"], flag["steps_per_s"], flag["median_steps_per_s"]) == (2, 0, 4.0, 10.0)
    assert (flag["step"], flag["t"]) == (16, T0 + 4.0)
    [cleared] = of_kind(log_path, "straggler_cleared")
    assert (cleared["rank"], cleared["generation"]) == (2, 0)
    assert cleared["t"] > flag["t"]
    assert cleared["steps_per_s"] >= 0.5 * 10


# -- progress ------------------------------------------------------------------------------


def test_progress_is_sampled_once_per_interval(log_path: Path, clock: FakeClock) -> None:
    ranks = [rank(i) for i in range(2)]
    with EventLog(log_path, clock=clock, progress_interval_s=5.0) as log:
        for n in range(41):  # 10 s at 4 snapshots a second
            log.observe(snapshot(ranks, taken_at=100.0 + n / 4))
            clock.now += 0.25
    progress = of_kind(log_path, "progress")
    assert len(progress) == 3  # at 0, 5 and 10 s
    assert [round(p["t"] - progress[0]["t"], 2) for p in progress] == [0.0, 5.0, 10.0]
    assert progress[0]["t"] == T0
    assert progress[0]["ranks"][1] == {
        "rank": 1,
        "step": 120,
        "optimizer_steps": 120,
        "reported_step": None,
        "steps_per_s": 43.1,
        "loss": 0.231,
        "samples": 3840,
        "rss_bytes": 312_000_000,
        "cpu_percent": 98.0,
        "heartbeat_age_s": 0.5,
    }
    assert tuple(progress[0]["ranks"][1]) == SAMPLE_FIELDS
    assert (progress[0]["generation"], progress[0]["elapsed_s"], progress[0]["world_size"]) == (0, 10.0, 2)


def test_a_samples_step_is_the_reported_step_when_the_script_gave_one(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock) as log:
        log.observe(snapshot([rank(0, optimizer_steps=12, reported_step=5012), rank(1, optimizer_steps=12)]))
    [progress] = of_kind(log_path, "progress")
    assert [(s["step"], s["optimizer_steps"], s["reported_step"]) for s in progress["ranks"]] == [
        (5012, 12, 5012),
        (12, 12, None),
    ]


def test_a_clock_that_goes_back_restarts_the_interval(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock, progress_interval_s=5.0) as log:
        log.observe(snapshot([rank(0)]))
        clock.now -= 3600  # the wall clock was set back
        log.observe(snapshot([rank(0)]))
        clock.now += 1
        log.observe(snapshot([rank(0)]))
    assert [round(p["t"] - T0) for p in of_kind(log_path, "progress")] == [0, -3600]


def test_no_progress_before_any_rank_registers_and_only_registered_ranks_are_sampled(log_path: Path) -> None:
    with FakeRun(log_path, progress_interval_s=1.0) as run:
        run.observe()
        run.advance(2)
        run.observe()
        run.register(0)
        run.advance(2)
        run.observe()
    [progress] = of_kind(log_path, "progress")
    assert [s["rank"] for s in progress["ranks"]] == [0]
    assert progress["t"] == T0 + 4


def test_a_rank_ending_forces_a_progress_sample_with_its_final_step(log_path: Path) -> None:
    with FakeRun(log_path, progress_interval_s=5.0) as run:
        run.register_all()
        run.heartbeat_all(optimizer_steps=10)
        run.observe()
        run.advance(1)
        run.heartbeat_all(optimizer_steps=50)
        run.observe()  # not due yet
        run.exit(0, 0)
        run.exit(1, 0)
        run.observe()  # forced: the ranks ended
        run.advance(1)
        run.observe()  # not due, not forced
    progress = of_kind(log_path, "progress")
    assert [[s["step"] for s in p["ranks"]] for p in progress] == [[10, 10], [50, 50]]
    assert [round(p["t"] - T0) for p in progress] == [0, 1]


@pytest.mark.parametrize("optimizer", [True, False], ids=["optimizer", "reported-only"])
def test_a_resume_from_a_checkpoint_is_not_a_rate_spike(log_path: Path, optimizer: bool) -> None:
    """The script reports no step while it loads its checkpoint, then its global step from 5000
    on, one step per 0.1 s: the rate is 10 steps/s throughout, never the jump."""
    with FakeRun(log_path, progress_interval_s=1.0) as run:
        last = resume_from_checkpoint(run, optimizer=optimizer)
    samples = [s for p in of_kind(log_path, "progress") for s in p["ranks"]]
    assert last == 5089
    assert samples[-1]["step"] == last
    assert max(s["steps_per_s"] for s in samples) <= 10.5
    assert samples[-1]["steps_per_s"] == pytest.approx(10.0, rel=0.05)  # the real rate is there


def test_non_finite_values_become_null(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock) as log:
        log.observe(snapshot([rank(0, loss=math.nan, steps_per_s=math.inf)]))
        log.emit("run_end", outcome="succeeded", exit_code=0, wall_s=math.nan, restarts=0, final_step=1, summary={})
    [progress] = of_kind(log_path, "progress")
    assert progress["ranks"][0]["loss"] is None
    assert progress["ranks"][0]["steps_per_s"] == 0.0
    assert "NaN" not in log_path.read_text()
    [end] = of_kind(log_path, "run_end")
    assert end["wall_s"] is None


def test_size_grows_with_time_not_with_heartbeat_rate(log_path: Path) -> None:
    """10,000 observations over a simulated 100 s of 4 ranks: ~100 s / interval lines, plus transitions."""
    interval_s = 5.0
    with FakeRun(log_path, nproc=4, progress_interval_s=interval_s) as run:
        run.observe()
        run.register_all()
        for n in range(1, 10_001):
            run.at(n / 100)
            if n % 10 == 0:
                run.heartbeat_all(optimizer_steps=n // 10)
            run.observe()
        for r in range(4):
            run.exit(r, 0)
        run.observe()
    events = check_all_valid(log_path)
    transitions = 4 + 1 + 4  # registrations, the barrier, the ranks ending
    progress = [e for e in events if e["event"] == "progress"]
    assert 100 / interval_s <= len(progress) <= 100 / interval_s + 2  # + the first sample + the final one
    assert len(events) == len(progress) + transitions
    assert log_path.stat().st_size < 30_000


def test_a_large_world_gets_an_aggregate_and_its_slowest_ranks(log_path: Path, clock: FakeClock) -> None:
    world = 256
    ranks = [
        rank(i, node_rank=i // 8, local_rank=i % 8, optimizer_steps=1000 + i, steps_per_s=50.0 + i % 50)
        for i in range(world)
    ]
    ranks[77] = rank(77, node_rank=9, local_rank=5, optimizer_steps=900, steps_per_s=3.0, loss=None)
    with EventLog(log_path, clock=clock) as log:
        log.observe(snapshot(ranks))
    events = check_all_valid(log_path)
    [progress] = [e for e in events if e["event"] == "progress"]
    assert "ranks" not in progress
    agg = progress["aggregate"]
    assert agg["ranks"] == world
    assert (agg["step"]["min"], agg["step"]["max"]) == (900, 1255)
    assert agg["steps_per_s"]["min"] == 3.0 and agg["steps_per_s"]["max"] == 99.0
    assert agg["loss"] == {"min": 0.231, "median": 0.231, "max": 0.231}
    slowest = progress["slowest"]
    assert len(slowest) == SLOWEST_LIMIT
    assert slowest[0]["rank"] == 77
    assert [s["steps_per_s"] for s in slowest] == sorted(s["steps_per_s"] for s in slowest)
    line = next(line for line in log_path.read_text().splitlines() if '"progress"' in line)
    assert len(line) < 3000  # independent of the world's size


def test_the_per_rank_limit_is_where_the_aggregate_starts(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock, per_rank_limit=4) as log:
        log.observe(snapshot([rank(i) for i in range(4)]))
        clock.now += 10
        log.observe(snapshot([rank(i) for i in range(5)], run_id="run-2", generation=1))
    first, second = of_kind(log_path, "progress")
    assert len(first["ranks"]) == 4
    assert second["aggregate"]["ranks"] == 5


# -- emit, close, threads --------------------------------------------------------------------


def test_emit_writes_a_flushed_line_with_version_time_and_kind(log_path: Path, clock: FakeClock) -> None:
    log = EventLog(log_path, clock=clock)
    try:
        log.emit("restart", generation=1, reason="rank 0 hung", extra=Path("/x"), state=RankState.HUNG)
        # readable before close: flushed as it happens
        [line] = log_path.read_text().splitlines()
        assert json.loads(line) == {
            "v": 2,
            "t": clock.now,
            "event": "restart",
            "generation": 1,
            "reason": "rank 0 hung",
            "extra": "/x",
            "state": "hung",
        }
    finally:
        log.close()


def test_emit_rejects_unknown_kinds_and_reserved_fields(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock) as log:
        with pytest.raises(ValueError, match="unknown event kind"):
            log.emit("oops")
        with pytest.raises(ValueError, match="may not be named"):
            log.emit("restart", generation=1, reason="x", t=3)
    assert log_path.read_text() == ""


def test_close_is_idempotent_and_later_calls_do_nothing(log_path: Path) -> None:
    run = FakeRun(log_path)
    run.emit("restart", generation=1, reason="x")
    run.log.close()
    run.log.close()
    assert run.log.closed
    run.emit("restart", generation=2, reason="y")
    run.register_all()
    run.observe()
    assert kinds(log_path) == ["restart"]


def test_emit_from_many_threads_never_interleaves_lines(log_path: Path) -> None:
    with FakeRun(log_path, nproc=8, progress_interval_s=0.001) as run:
        run.register_all()

        def writer(n: int) -> None:
            for i in range(300):
                run.emit("restart", generation=i, reason=f"thread {n} " + "x" * 200)

        def observer() -> None:
            for i in range(1, 301):
                run.heartbeat_all(optimizer_steps=i)  # the clock stands still; the threads race
                run.log.observe(run.registry.snapshot(), run.registry.drain_transitions())

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)] + [threading.Thread(target=observer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    events = check_all_valid(log_path)
    assert sum(e["event"] == "restart" for e in events) == 1200
    assert sum(e["event"] == "register" for e in events) == 8


def test_a_write_error_is_logged_once_and_never_raised(
    log_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    log = EventLog(log_path, clock=clock)

    class Broken:
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    real = log._file
    log._file = Broken()
    try:
        log.emit("restart", generation=1, reason="x")
        log.observe(snapshot([rank(0)]))
        log.emit("restart", generation=2, reason="y")
    finally:
        log.close()
        real.close()
    assert sum("cannot write the event log" in r.getMessage() for r in caplog.records) == 1


# -- reading ---------------------------------------------------------------------------------


def test_read_events_skips_a_torn_last_line(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock) as log:
        log.emit("restart", generation=1, reason="x")
        log.emit("restart", generation=2, reason="y")
    with open(log_path, "a") as f:
        f.write('{"v":2,"t":1.0,"event":"rest')  # the writer was killed mid-line
    assert [e["generation"] for e in read_events(log_path)] == [1, 2]


def test_appending_after_a_torn_line_ends_it_first(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock) as log:
        log.emit("restart", generation=1, reason="x")
    with open(log_path, "a") as f:
        f.write('{"v":2,"t":1.0,"ev')
    with EventLog(log_path, clock=clock) as log:
        log.emit("restart", generation=2, reason="y")
    assert [e["generation"] for e in read_events(log_path)] == [1, 2]


def test_read_events_of_an_empty_or_missing_file(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text("")
    assert read_events(tmp_path / "events.jsonl") == []
    with pytest.raises(FileNotFoundError):
        read_events(tmp_path / "missing.jsonl")


# -- the schema ------------------------------------------------------------------------------


def run_level_events() -> dict[str, dict]:
    return {
        "run_start": {
            "run_id": "r",
            "config": {"nproc_per_node": 2},
            "world_size": 4,
            "nnodes": 2,
            "nproc_per_node": 2,
            "versions": {"python": "3.11.7", "ddp_launch": "0.1.0", "grpc": "1.70"},
            "host": "h",
        },
        "failure": {
            "generation": 0,
            "report": {"outcome": "failed", "message": "rank 1 failed", "root_rank": 1},
            "outcome": "failed",
            "message": "rank 1 failed (exit code 1)",
            "root_rank": 1,
        },
        "restart": {"generation": 1, "reason": "rank 1 failed", "rank": 1, "exit": "exit code 1"},
        "resize": {"generation": 1, "reason": "1 node(s) joined (h2)", "nnodes": 3, "world_size": 6},
        "run_end": {
            "outcome": "interrupted",
            "exit_code": 130,
            "wall_s": 12.5,
            "restarts": 2,
            "final_step": 100,
            "summary": {"steps_per_s_median": 9.5},
        },
    }


@pytest.mark.parametrize("per_rank_limit", [64, 2], ids=["per-rank", "aggregate"])
def test_every_event_a_real_run_writes_validates(log_path: Path, per_rank_limit: int) -> None:
    """Three generations of a 2 x 2 world: a straggler that recovers, a hang (the group
    stopped), a failure (stopped), then Ctrl-C (interrupted, one rank ends cleanly)."""
    fields = run_level_events()
    with FakeRun(log_path, nnodes=2, nproc=2, max_restarts=2, per_rank_limit=per_rank_limit) as run:
        run.emit("run_start", **fields["run_start"])
        steps = [0, 0, 0, 0]
        for generation in range(3):
            if generation:
                run.emit("restart", **{**fields["restart"], "generation": generation})
                run.restart()
                steps = [0, 0, 0, 0]
            run.observe()
            run.advance(0.5)
            run.register_all()
            for second in range(12):
                run.advance(1.0)
                for r in range(4):
                    steps[r] += 3 if (r == 3 and generation == 0 and second < 6) else 10
                    run.heartbeat(r, optimizer_steps=steps[r], reported_step=steps[r] + 500, loss=1 / steps[r])
                run.registry.record_process_stats(0, rss_bytes=10**9, cpu_percent=99.5)
                run.registry.update_stragglers(0.5, 2.0)
                run.observe()
            if generation == 0:
                run.registry.mark_hung(2)
                run.stop()
            elif generation == 1:
                run.exit(1, 1)
                run.stop()
                run.emit("failure", **fields["failure"])
            else:
                run.stop(interrupted=True)
                run.exit(3, 0)
            for r in range(4):
                run.exit(r, -2 if generation == 2 else -15)
            run.advance(0.5)
            run.observe()
        run.emit("resize", **fields["resize"])  # the fields only: this fake world is fixed
        run.emit("run_end", **fields["run_end"])
    events = check_all_valid(log_path)
    assert {e["event"] for e in events} == set(EVENT_KINDS)
    assert {e["state"] for e in events if e["event"] == "state"} == FINAL_STATES
    progress = [e for e in events if e["event"] == "progress"]
    assert all(("aggregate" in p) == (per_rank_limit == 2) for p in progress)
    ts = [e["t"] for e in events]
    assert ts == sorted(ts)


def test_the_schema_matches_the_code() -> None:
    s = schema()
    assert s["properties"]["v"]["const"] == SCHEMA_VERSION
    assert s["properties"]["event"]["enum"] == list(EVENT_KINDS)
    kinds_with_fields = {branch["if"]["properties"]["event"]["const"] for branch in s["allOf"]}
    assert kinds_with_fields == set(EVENT_KINDS)
    assert set(s["$defs"]["state"]["enum"]) == {state.value for state in RankState}
    assert set(s["$defs"]["final_state"]["enum"]) == FINAL_STATES
    assert s["$defs"]["sample"]["required"] == list(SAMPLE_FIELDS)


REGISTER = {
    "v": SCHEMA_VERSION,
    "t": 1.5,
    "event": "register",
    "rank": 0,
    "node_rank": 0,
    "local_rank": 0,
    "pid": 10,
    "hostname": "h",
    "generation": 0,
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop("rank"), "'rank' is a required property"),
        (lambda e: e.update(rank="0"), r"rank: '0' is not of type 'integer'"),
        (lambda e: e.update(pid=True), "pid: True is not of type 'integer'"),
        (lambda e: e.update(pid=1.5), "pid: 1.5 is not of type 'integer'"),
        (lambda e: e.update(event="nope"), "'nope' is not one of"),
        (lambda e: e.update(v=1), "v: 2 was expected"),
        (lambda e: e.pop("t"), "'t' is a required property"),
        (lambda e: e.update(t="now"), "t: 'now' is not of type 'number'"),
        (lambda e: e.update(local_rank=None), "local_rank: None is not of type 'integer'"),
    ],
    ids=["missing", "str", "bool", "float", "kind", "version", "no-t", "t-str", "null"],
)
def test_validate_event_rejects_what_does_not_match(change, message: str) -> None:
    event = dict(REGISTER)
    validate_event(dict(event))
    event.update(extra="readers ignore it")
    validate_event(dict(event))
    change(event)
    with pytest.raises(ValueError, match=message):
        validate_event(event)


STATE = {
    "v": SCHEMA_VERSION,
    "t": 1.0,
    "event": "state",
    "rank": 0,
    "generation": 0,
    "state": "failed",
    "previous": "training",
    "step": 3,
    "optimizer_steps": 3,
    "reported_step": None,
    "exit_code": 1,
    "exit": "exit code 1",
}


@pytest.mark.parametrize("state", sorted(FINAL_STATES))
def test_validate_event_accepts_every_final_state(state: str) -> None:
    validate_event({**STATE, "state": state})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"state": "asleep"}, "state: 'asleep' is not one of"),
        ({"state": "training"}, "state: 'training' is not one of"),  # not a final state
        ({"previous": "asleep"}, "previous: 'asleep' is not one of"),
        ({"exit_code": "1"}, "exit_code: '1' is not of type"),
        ({"reported_step": 1.5}, "reported_step: 1.5 is not of type"),
    ],
)
def test_validate_event_checks_states(change: dict, message: str) -> None:
    validate_event(dict(STATE))
    with pytest.raises(ValueError, match=message):
        validate_event({**STATE, **change})


def test_validate_event_checks_progress_shapes() -> None:
    base = {"v": SCHEMA_VERSION, "t": 1.0, "event": "progress", "generation": 0, "elapsed_s": 1.0}
    sample = {name: 0 for name in SAMPLE_FIELDS} | {"reported_step": None, "loss": None, "heartbeat_age_s": None}
    spread = {"min": 1, "median": 1, "max": 1}
    aggregate = {"ranks": 3, "step": spread, "steps_per_s": spread, "loss": None}
    validate_event({**base, "ranks": [sample]})
    validate_event({**base, "aggregate": aggregate, "slowest": [sample]})
    with pytest.raises(ValueError, match="not valid under any of the given schemas"):
        validate_event(base)  # neither ranks nor aggregate
    with pytest.raises(ValueError, match="not valid under any of the given schemas"):
        validate_event({**base, "ranks": [sample], "aggregate": aggregate, "slowest": []})  # both
    with pytest.raises(ValueError, match="ranks/0: 'step' is a required property"):
        validate_event({**base, "ranks": [{"rank": 0}]})
    with pytest.raises(ValueError, match="ranks/0/loss: 'low' is not of type"):
        validate_event({**base, "ranks": [{**sample, "loss": "low"}]})
    with pytest.raises(ValueError, match="aggregate: 'step' is a required property"):
        validate_event({**base, "aggregate": {"ranks": 3}, "slowest": []})
    with pytest.raises(ValueError, match="is not of type 'object'"):
        validate_event([])  # type: ignore[arg-type]


_OPS = ("register", "heartbeat", "exit0", "exit1", "hang", "stop", "interrupt", "restart", "observe", "stragglers")


@settings(max_examples=60, deadline=None)
@given(
    history=st.lists(
        st.tuples(
            st.sampled_from(_OPS),
            st.integers(0, 2),  # the rank
            st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5]),  # seconds until the next step
        ),
        min_size=1,
        max_size=40,
    )
)
def test_any_history_gives_valid_ordered_events_once_per_transition(tmp_path_factory, history) -> None:
    path = tmp_path_factory.mktemp("events") / "events.jsonl"
    registered: set[tuple[int, int]] = set()
    final: dict[tuple[int, int], str] = {}  # (generation, rank) -> the final state the registry holds
    steps = [0, 0, 0]

    def remember_final(run: FakeRun) -> None:
        for r in run.registry.snapshot().ranks:
            if r.state.final:
                final[(r.generation, r.rank)] = r.state.value

    with FakeRun(path, nproc=3, max_restarts=100, progress_interval_s=1.0) as run:
        for op, r, dt in history:
            try:
                if op == "register":
                    run.register(r)
                    registered.add((run.generation, r))
                elif op == "heartbeat":
                    steps[r] += 1
                    run.heartbeat(r, optimizer_steps=steps[r])
                elif op in ("exit0", "exit1"):
                    run.exit(r, int(op[-1]))
                elif op == "hang":
                    run.registry.mark_hung(r)
                elif op in ("stop", "interrupt"):
                    run.stop(interrupted=op == "interrupt")
                elif op == "restart":
                    remember_final(run)
                    run.restart()
                    steps = [0, 0, 0]
                elif op == "stragglers":
                    run.registry.update_stragglers(0.9, 0.0)
                else:
                    run.observe()
            except Rejected:
                pass  # e.g. a heartbeat from a rank that has not registered, or has ended
            run.advance(dt)
        remember_final(run)
        run.observe()
    events = check_all_valid(path)
    registers = [(e["generation"], e["rank"]) for e in events if e["event"] == "register"]
    assert len(registers) == len(set(registers))
    assert set(registers) == registered
    barriers = [e["generation"] for e in events if e["event"] == "barrier_open"]
    assert len(barriers) == len(set(barriers))
    assert set(barriers) == {g for g in {g for g, _ in registered} if all((g, r) in registered for r in range(3))}
    ended = {(e["generation"], e["rank"]): e["state"] for e in events if e["event"] == "state"}
    assert len(ended) == sum(e["event"] == "state" for e in events)  # once per rank and generation
    assert ended == final
    for e in events:
        if e["event"] == "state":
            assert (e["previous"] == "starting") == ((e["generation"], e["rank"]) not in registered)
    ts = [e["t"] for e in events]
    assert ts == sorted(ts)


def test_every_kind_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "events.md").read_text()
    for kind in EVENT_KINDS:
        assert f"| `{kind}` |" in doc, kind


def test_the_documented_examples_validate() -> None:
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "events.md").read_text()
    section = re.search(r"\n## Examples\n(.*?)\n## ", doc, re.S)
    assert section
    blocks = re.findall(r"```json\n(.*?)```", section.group(1), re.S)
    assert len(blocks) >= 2  # a kill and restart, a Ctrl-C
    states = set()
    for block in blocks:
        events = [json.loads(line) for line in block.strip().splitlines()]
        for e in events:
            validate_event(e)
        assert events[0]["event"] == "run_start" and events[-1]["event"] == "run_end"
        assert [e["t"] for e in events] == sorted(e["t"] for e in events)
        states |= {e["state"] for e in events if e["event"] == "state"}
    assert {"failed", "stopped", "done", "interrupted"} <= states
    for state in FINAL_STATES:
        assert f"`{state}`" in doc, state


def test_events_from_a_real_registry_through_a_restart(log_path: Path) -> None:
    with FakeRun(log_path, progress_interval_s=5.0) as run:
        run.at(50.0)
        for generation in (0, 1):
            if generation:
                run.emit("restart", generation=1, reason="rank 1 failed (exit code 1)")
                run.restart()
            run.observe()
            run.register_all()
            train(run, 10.0)
            if generation == 0:
                run.exit(1, 1)
                run.stop()
                run.exit(0, -15)
            else:
                run.exit(1, 0)
                run.exit(0, 0)
            run.observe()
    events = check_all_valid(log_path)
    assert [(e["event"], e.get("generation"), e.get("state")) for e in events if e["event"] != "progress"] == [
        ("register", 0, None),
        ("register", 0, None),
        ("barrier_open", 0, None),
        ("state", 0, "failed"),
        ("state", 0, "stopped"),
        ("restart", 1, None),
        ("register", 1, None),
        ("register", 1, None),
        ("barrier_open", 1, None),
        ("state", 1, "done"),
        ("state", 1, "done"),
    ]
    progress = [e for e in events if e["event"] == "progress"]
    assert 4 <= len(progress) <= 8
    assert progress[-1]["ranks"][0]["step"] == 40
    assert progress[-1]["ranks"][0]["loss"] == 0.025
    assert progress[-1]["ranks"][0]["steps_per_s"] == pytest.approx(4.0)

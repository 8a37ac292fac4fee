"""The event log: events derived from hand-built snapshots with a fake clock, its size bound,
its schema, and reading a file that a killed run left behind."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddp_launch.events import EVENT_KINDS, SCHEMA_VERSION, SLOWEST_LIMIT, EventLog, read_events, validate_event
from ddp_launch.registry import RankState, RankView, RunSnapshot
from tests.fakes import FakeClock


@dataclasses.dataclass(frozen=True)
class FlaggedRankView(RankView):
    """RankView with the straggler flag the registry is gaining (the log reads it by getattr)."""

    straggler: bool = False


def rank(i: int, **kw: object) -> RankView:
    fields: dict[str, object] = {
        "rank": i,
        "node_rank": 0,
        "local_rank": i,
        "state": RankState.TRAINING,
        "generation": 0,
        "pid": 1000 + i,
        "hostname": "host",
        "step": 120,
        "samples": 120 * 32,
        "steps_per_s": 43.1,
        "loss": 0.231,
        "metrics": {},
        "rss_bytes": 312_000_000,
        "cpu_percent": 98.0,
        "heartbeat_age_s": 0.5,
        "exit_code": None,
        "exception_type": "",
        "traceback": "",
    }
    fields.update(kw)
    cls = FlaggedRankView if "straggler" in fields else RankView
    return cls(**fields)  # type: ignore[arg-type]


def starting(i: int, **kw: object) -> RankView:
    fields: dict[str, object] = {
        "state": RankState.STARTING,
        "pid": 0,
        "hostname": "",
        "step": 0,
        "samples": 0,
        "steps_per_s": 0.0,
        "loss": None,
        "rss_bytes": 0,
        "cpu_percent": 0.0,
        "heartbeat_age_s": None,
    }
    fields.update(kw)
    return rank(i, **fields)


def snapshot(ranks: list[RankView], **kw: object) -> RunSnapshot:
    fields: dict[str, object] = {
        "run_id": "run-1",
        "world_size": len(ranks),
        "generation": 0,
        "max_restarts": 3,
        "elapsed_s": 10.0,
        "total_steps": 300,
        "barrier_open": all(r.state is not RankState.STARTING for r in ranks),
        "ranks": tuple(ranks),
    }
    fields.update(kw)
    return RunSnapshot(**fields)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


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


# -- events derived from snapshots ---------------------------------------------------------


def test_register_barrier_and_state_are_written_once_each(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock, progress_interval_s=1000) as log:
        log.observe(snapshot([starting(i) for i in range(4)]))
        waiting = [rank(i, state=RankState.WAITING) for i in range(2)] + [starting(2), starting(3)]
        for _ in range(3):
            log.observe(snapshot(waiting))
        training = [rank(i) for i in range(4)]
        for _ in range(5):
            log.observe(snapshot(training))
        failed = [rank(i) for i in range(4)]
        failed[2] = rank(2, state=RankState.FAILED, exit_code=1)
        for _ in range(5):
            log.observe(snapshot(failed))

    events = check_all_valid(log_path)
    registers = [e for e in events if e["event"] == "register"]
    assert [e["rank"] for e in registers] == [0, 1, 2, 3]
    assert registers[0] == {
        "v": SCHEMA_VERSION,
        "t": clock.now,
        "event": "register",
        "rank": 0,
        "node_rank": 0,
        "local_rank": 0,
        "pid": 1000,
        "hostname": "host",
        "generation": 0,
    }
    barriers = [e for e in events if e["event"] == "barrier_open"]
    assert [(e["generation"], e["world_size"]) for e in barriers] == [(0, 4)]
    # the barrier follows the registrations that opened it
    assert [e["event"] for e in events if e["event"] != "progress"][:5] == ["register"] * 4 + ["barrier_open"]
    states = [e for e in events if e["event"] == "state"]
    assert len(states) == 1
    assert {k: states[0][k] for k in ("rank", "generation", "state", "previous", "exit_code")} == {
        "rank": 2,
        "generation": 0,
        "state": "failed",
        "previous": "training",
        "exit_code": 1,
    }


def test_a_rank_seen_first_after_the_barrier_is_registered_before_it(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock) as log:
        log.observe(snapshot([starting(0), starting(1)]))
        log.observe(snapshot([rank(0), rank(1)]))
    assert [k for k in kinds(log_path) if k != "progress"] == ["register", "register", "barrier_open"]


def test_a_rank_that_dies_before_registering_gets_a_state_but_no_register(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock) as log:
        log.observe(snapshot([starting(0), starting(1)]))
        log.observe(snapshot([starting(0, state=RankState.FAILED, exit_code=-9), starting(1)], barrier_open=False))
    states = of_kind(log_path, "state")
    assert [(e["rank"], e["state"], e["previous"]) for e in states] == [(0, "failed", "starting")]
    assert of_kind(log_path, "register") == []


def test_hung_then_done_are_each_recorded_and_training_is_not(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock) as log:
        log.observe(snapshot([rank(0, state=RankState.WAITING), rank(1, state=RankState.WAITING)], barrier_open=False))
        log.observe(snapshot([rank(0), rank(1)]))
        log.observe(snapshot([rank(0, state=RankState.HUNG), rank(1, state=RankState.DONE, exit_code=0)]))
    assert [(e["rank"], e["state"], e["previous"]) for e in of_kind(log_path, "state")] == [
        (0, "hung", "training"),
        (1, "done", "training"),
    ]


def test_a_new_generation_registers_and_opens_its_barrier_again(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock) as log:
        log.observe(snapshot([rank(0), rank(1)]))
        log.observe(snapshot([rank(0, state=RankState.FAILED, exit_code=1), rank(1)]))
        log.emit("restart", generation=1, reason="rank 0 failed (exit code 1)")
        log.observe(snapshot([starting(0, generation=1), starting(1, generation=1)], generation=1))
        log.observe(snapshot([rank(0, generation=1), rank(1, generation=1)], generation=1))
    events = check_all_valid(log_path)
    assert [(e["event"], e.get("generation")) for e in events if e["event"] != "progress"] == [
        ("register", 0),
        ("register", 0),
        ("barrier_open", 0),
        ("state", 0),
        ("restart", 1),
        ("register", 1),
        ("register", 1),
        ("barrier_open", 1),
    ]


def test_a_snapshot_of_an_older_generation_is_ignored(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock) as log:
        log.observe(snapshot([rank(0, generation=1)], generation=1))
        log.observe(snapshot([rank(0, state=RankState.FAILED, exit_code=1)], generation=0))
    assert [(e["event"], e["generation"]) for e in read_events(log_path)] == [
        ("register", 1),
        ("barrier_open", 1),
        ("progress", 1),
    ]


def test_straggler_flag_is_written_when_it_is_raised_and_when_it_clears(log_path: Path, clock: FakeClock) -> None:
    rates = [10.0, 10.0, 4.0, 12.0]
    normal = [rank(i, steps_per_s=rates[i], straggler=False) for i in range(4)]
    slow = list(normal)
    slow[2] = rank(2, steps_per_s=4.0, straggler=True)
    with EventLog(log_path, clock=clock) as log:
        log.observe(snapshot(normal))
        for _ in range(3):
            log.observe(snapshot(slow))
        log.observe(snapshot(normal))
        log.observe(snapshot([rank(i) for i in range(4)]))  # a RankView without the field: not flagged
    check_all_valid(log_path)
    [flag] = of_kind(log_path, "straggler")
    assert (flag["rank"], flag["steps_per_s"], flag["median_steps_per_s"]) == (2, 4.0, 10.0)
    [cleared] = of_kind(log_path, "straggler_cleared")
    assert cleared["rank"] == 2


# -- progress ------------------------------------------------------------------------------


def test_progress_is_sampled_once_per_interval(log_path: Path, clock: FakeClock) -> None:
    ranks = [rank(i) for i in range(2)]
    with EventLog(log_path, clock=clock, progress_interval_s=5.0) as log:
        for _ in range(41):  # 10 s at 4 snapshots a second
            log.observe(snapshot(ranks))
            clock.now += 0.25
    progress = of_kind(log_path, "progress")
    assert len(progress) == 3  # at 0, 5 and 10 s
    assert [round(p["t"] - progress[0]["t"], 2) for p in progress] == [0.0, 5.0, 10.0]
    assert progress[0]["ranks"][1] == {
        "rank": 1,
        "step": 120,
        "steps_per_s": 43.1,
        "loss": 0.231,
        "samples": 3840,
        "rss_bytes": 312_000_000,
        "cpu_percent": 98.0,
        "heartbeat_age_s": 0.5,
    }
    assert (progress[0]["generation"], progress[0]["elapsed_s"], progress[0]["world_size"]) == (0, 10.0, 2)


def test_no_progress_before_any_rank_registers_and_only_registered_ranks_are_sampled(
    log_path: Path, clock: FakeClock
) -> None:
    with EventLog(log_path, clock=clock, progress_interval_s=1.0) as log:
        log.observe(snapshot([starting(0), starting(1)]))
        clock.now += 2
        log.observe(snapshot([rank(0, state=RankState.WAITING), starting(1)], barrier_open=False))
    [progress] = of_kind(log_path, "progress")
    assert [s["rank"] for s in progress["ranks"]] == [0]


def test_a_rank_ending_forces_a_progress_sample_with_its_final_step(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock, progress_interval_s=5.0) as log:
        log.observe(snapshot([rank(0, step=10), rank(1, step=10)]))
        clock.now += 1
        log.observe(snapshot([rank(0, step=50, state=RankState.DONE), rank(1, step=50, state=RankState.DONE)]))
        clock.now += 1
        log.observe(snapshot([rank(0, step=50, state=RankState.DONE), rank(1, step=50, state=RankState.DONE)]))
    progress = of_kind(log_path, "progress")
    assert [[s["step"] for s in p["ranks"]] for p in progress] == [[10, 10], [50, 50]]


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


def test_size_grows_with_time_not_with_heartbeat_rate(log_path: Path, clock: FakeClock) -> None:
    """10,000 snapshots over a simulated 100 s of 4 ranks: ~100 s / interval lines, plus transitions."""
    interval_s = 5.0
    with EventLog(log_path, clock=clock, progress_interval_s=interval_s) as log:
        log.observe(snapshot([starting(i) for i in range(4)]))
        for n in range(10_000):
            clock.now += 0.01
            log.observe(snapshot([rank(i, step=n // 10, steps_per_s=100.0 - i) for i in range(4)]))
        log.observe(snapshot([rank(i, step=1000, state=RankState.DONE, exit_code=0) for i in range(4)]))
    events = check_all_valid(log_path)
    transitions = 4 + 1 + 4  # registrations, the barrier, the ranks ending
    progress = [e for e in events if e["event"] == "progress"]
    assert 100 / interval_s <= len(progress) <= 100 / interval_s + 2  # + the first sample + the final one
    assert len(events) == len(progress) + transitions
    assert log_path.stat().st_size < 30_000


def test_a_large_world_gets_an_aggregate_and_its_slowest_ranks(log_path: Path, clock: FakeClock) -> None:
    world = 256
    ranks = [
        rank(i, node_rank=i // 8, local_rank=i % 8, step=1000 + i, steps_per_s=50.0 + i % 50) for i in range(world)
    ]
    ranks[77] = rank(77, node_rank=9, local_rank=5, step=900, steps_per_s=3.0, loss=None)
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
            "v": 1,
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


def test_close_is_idempotent_and_later_calls_do_nothing(log_path: Path, clock: FakeClock) -> None:
    log = EventLog(log_path, clock=clock)
    log.emit("restart", generation=1, reason="x")
    log.close()
    log.close()
    assert log.closed
    log.emit("restart", generation=2, reason="y")
    log.observe(snapshot([rank(0)]))
    assert kinds(log_path) == ["restart"]


def test_emit_from_many_threads_never_interleaves_lines(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock, progress_interval_s=0.001) as log:

        def writer(n: int) -> None:
            for i in range(300):
                log.emit("restart", generation=i, reason=f"thread {n} " + "x" * 200)

        def observer() -> None:
            for i in range(300):
                log.observe(snapshot([rank(r, step=i) for r in range(8)]))

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)] + [threading.Thread(target=observer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    events = check_all_valid(log_path)
    assert sum(e["event"] == "restart" for e in events) == 1200


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
        f.write('{"v":1,"t":1.0,"event":"rest')  # the writer was killed mid-line
    assert [e["generation"] for e in read_events(log_path)] == [1, 2]


def test_appending_after_a_torn_line_ends_it_first(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock) as log:
        log.emit("restart", generation=1, reason="x")
    with open(log_path, "a") as f:
        f.write('{"v":1,"t":1.0,"ev')
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
            "world_size": 2,
            "nnodes": 1,
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
        "restart": {"generation": 1, "reason": "rank 1 failed"},
        "run_end": {
            "outcome": "succeeded",
            "exit_code": 0,
            "wall_s": 12.5,
            "restarts": 1,
            "final_step": 100,
            "summary": {"steps_per_s_median": 9.5},
        },
    }


def test_every_kind_written_by_the_log_validates(log_path: Path, clock: FakeClock) -> None:
    with EventLog(log_path, clock=clock, per_rank_limit=2) as log:
        for kind, fields in run_level_events().items():
            log.emit(kind, **fields)
        log.observe(snapshot([starting(0), starting(1)]))
        log.observe(snapshot([rank(0, straggler=True), rank(1, straggler=False)]))
        log.observe(snapshot([rank(0, straggler=False), rank(1, state=RankState.HUNG, straggler=False)]))
        clock.now += 10
        log.observe(snapshot([rank(i) for i in range(3)], generation=1))
    events = check_all_valid(log_path)
    assert {e["event"] for e in events} == set(EVENT_KINDS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop("rank"), "missing field 'rank'"),
        (lambda e: e.update(rank="0"), "field 'rank' is str"),
        (lambda e: e.update(pid=True), "field 'pid' is bool"),
        (lambda e: e.update(event="nope"), "unknown event kind"),
        (lambda e: e.update(v=2), "schema version"),
        (lambda e: e.pop("t"), "missing field 't'"),
        (lambda e: e.update(local_rank=None), "field 'local_rank' is NoneType"),
    ],
)
def test_validate_event_rejects_what_does_not_match(change, message: str) -> None:
    event = {
        "v": 1,
        "t": 1.5,
        "event": "register",
        "rank": 0,
        "node_rank": 0,
        "local_rank": 0,
        "pid": 10,
        "hostname": "h",
        "generation": 0,
    }
    validate_event(dict(event))
    change(event)
    with pytest.raises(ValueError, match=message):
        validate_event(event)


def test_validate_event_checks_states_and_progress_shapes() -> None:
    base = {"v": 1, "t": 1.0}
    with pytest.raises(ValueError, match="not a rank state"):
        validate_event(
            {**base, "event": "state", "rank": 0, "generation": 0, "state": "asleep", "previous": "training"}
        )
    with pytest.raises(ValueError, match="exactly one"):
        validate_event({**base, "event": "progress", "generation": 0, "elapsed_s": 1.0})
    with pytest.raises(ValueError, match="sample 0"):
        validate_event({**base, "event": "progress", "generation": 0, "elapsed_s": 1.0, "ranks": [{"rank": 0}]})
    with pytest.raises(ValueError, match="aggregate"):
        validate_event(
            {**base, "event": "progress", "generation": 0, "elapsed_s": 1.0, "aggregate": {"ranks": 3}, "slowest": []}
        )
    with pytest.raises(ValueError, match="JSON object"):
        validate_event([])  # type: ignore[arg-type]


_LIFE = [RankState.STARTING, RankState.WAITING, RankState.TRAINING]
_ENDS = [RankState.HUNG, RankState.FAILED, RankState.DONE]


@settings(max_examples=60, deadline=None)
@given(
    history=st.lists(
        st.tuples(
            st.booleans(),  # a restart before this snapshot
            st.lists(st.integers(0, 5), min_size=3, max_size=3),  # how far each rank has got
            st.floats(0, 3),  # seconds until the next snapshot
        ),
        min_size=1,
        max_size=30,
    )
)
def test_any_history_gives_valid_events_once_per_transition(tmp_path_factory, history) -> None:
    path = tmp_path_factory.mktemp("events") / "events.jsonl"
    clock = FakeClock(1_700_000_000.0)
    generation = 0
    reached = [0, 0, 0]
    expected_registers = 0
    with EventLog(path, clock=clock, progress_interval_s=1.0) as log:
        for restart, progress, dt in history:
            if restart:
                generation += 1
                reached = [0, 0, 0]
            ranks = []
            for i, p in enumerate(progress):
                if reached[i] == 0 and p > 0:
                    expected_registers += 1
                # a rank only moves forward through its life; once ended it stays so
                reached[i] = reached[i] if reached[i] >= 3 else max(reached[i], p)
                state = (_LIFE + _ENDS)[reached[i]]
                ranks.append(
                    starting(i, generation=generation)
                    if reached[i] == 0
                    else rank(i, state=state, generation=generation)
                )
            log.observe(snapshot(ranks, generation=generation))
            clock.now += dt
    events = check_all_valid(path)
    registers = [(e["generation"], e["rank"]) for e in events if e["event"] == "register"]
    assert len(registers) == len(set(registers)) == expected_registers
    barriers = [e["generation"] for e in events if e["event"] == "barrier_open"]
    assert len(barriers) == len(set(barriers))
    ended = [(e["generation"], e["rank"]) for e in events if e["event"] == "state"]
    assert len(ended) == len(set(ended))


def test_the_documented_examples_validate_and_every_kind_is_documented() -> None:
    import re

    import ddp_launch.events as events_module

    doc = (Path(__file__).resolve().parents[2] / "docs" / "events.md").read_text()
    example = re.search(r"## Example\n\n```json\n(.*?)```", doc, re.S)
    assert example
    for line in example.group(1).strip().splitlines():
        validate_event(json.loads(line))
    for kind in EVENT_KINDS:
        assert f"| `{kind}` |" in doc
        assert re.search(rf"^{kind} ", events_module.__doc__ or "", re.M), kind


def test_events_from_a_real_registry_through_a_restart(log_path: Path) -> None:
    from ddp_launch.registry import Registry

    wall = FakeClock(1_700_000_000.0)
    mono = FakeClock(50.0)
    registry = Registry(
        run_id="r", nnodes=1, local_world_size=2, max_restarts=1, ddp_addr="127.0.0.1", ddp_port=29500, clock=mono
    )
    with EventLog(log_path, clock=wall, progress_interval_s=5.0) as log:
        for generation in (0, 1):
            if generation:
                log.emit("restart", generation=1, reason="rank 1 failed (exit code 1)")
                registry.begin_generation(1)
            log.observe(registry.snapshot())
            for r in (0, 1):
                registry.register(node_rank=0, local_rank=r, pid=100 + r, hostname="h", generation=generation)
            for step in range(1, 41):
                mono.now += 0.25
                wall.now += 0.25
                for r in (0, 1):
                    registry.heartbeat(rank=r, generation=generation, pid=100 + r, step=step, loss=1.0 / step)
                log.observe(registry.snapshot())
            registry.record_exit(1, generation, 1 if generation == 0 else 0)
            registry.record_exit(0, generation, 0)
            log.observe(registry.snapshot())
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
        ("state", 1),
        ("state", 1),
    ]
    progress = [e for e in events if e["event"] == "progress"]
    assert 4 <= len(progress) <= 8
    assert progress[-1]["ranks"][0]["step"] == 40
    assert progress[-1]["ranks"][0]["steps_per_s"] == pytest.approx(4.0)

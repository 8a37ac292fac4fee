"""OutputPump over real pipes (no processes), and the failure report from hand-built results."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ddp_launch.failure import build_report, flapping, format_report, write_json_atomic
from ddp_launch.output import TAIL_LINES, OutputPump
from ddp_launch.registry import Registry, RunSnapshot
from ddp_launch.supervisor import GenerationResult, Outcome, RunResult, WorkerExit

DEADLINE_S = 5.0

# -- OutputPump ----------------------------------------------------------------------------


class Sink:
    """Collects (rank, line, is_stderr) from the pump's thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.lines: list[tuple[int, str, bool]] = []

    def __call__(self, rank: int, line: str, is_stderr: bool) -> None:
        with self.cond:
            self.lines.append((rank, line, is_stderr))
            self.cond.notify_all()

    def wait_for(self, n: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.lines) >= n, timeout=DEADLINE_S)

    def of(self, rank: int, is_stderr: bool) -> list[str]:
        with self.cond:
            return [line for r, line, e in self.lines if r == rank and e == is_stderr]


class Pipes:
    """A worker's stdout and stderr pipes, without the worker."""

    def __init__(self) -> None:
        self.out_r, self.out_w = os.pipe()
        self.err_r, self.err_w = os.pipe()

    def out(self, data: bytes) -> None:
        os.write(self.out_w, data)

    def err(self, data: bytes) -> None:
        os.write(self.err_w, data)

    def close_writers(self) -> None:
        for name in ("out_w", "err_w"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def wait_until(predicate: Callable[[], bool]) -> bool:
    """Poll with a deadline (the pump's counters have no condition to wait on from outside)."""
    end = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > end:
            return False
        threading.Event().wait(0.002)
    return True


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def pump(tmp_path: Path, sink: Sink):
    p = OutputPump(tmp_path, sink)
    made: list[Pipes] = []

    def attach(rank: int, header: str = "generation 0, pid 4242") -> Pipes:
        pipes = Pipes()
        made.append(pipes)
        p.attach(rank, pipes.out_r, pipes.err_r, header)
        return pipes

    p.attach_pipes = attach  # type: ignore[attr-defined]
    yield p
    if p._thread.is_alive():
        p.stop()
    for pipes in made:
        pipes.close_writers()


def test_lines_reach_the_log_and_the_sink(pump: OutputPump, sink: Sink, tmp_path: Path) -> None:
    pipes = pump.attach_pipes(0)  # type: ignore[attr-defined]

    pipes.out(b"hello\nworld\n")
    pipes.err(b"Traceback (most recent call last):\n")
    pipes.close_writers()

    assert pump.wait_closed([0], timeout_s=DEADLINE_S)
    assert sink.of(0, is_stderr=False) == ["hello", "world"]
    assert sink.of(0, is_stderr=True) == ["Traceback (most recent call last):"]
    log = (tmp_path / "rank-0.log").read_text().splitlines()
    assert log[0] == "==== generation 0, pid 4242 ===="
    assert sorted(log[1:]) == sorted(["hello", "world", "Traceback (most recent call last):"])
    assert pump.log_path(0) == tmp_path / "rank-0.log"


def test_ranks_are_kept_apart(pump: OutputPump, sink: Sink, tmp_path: Path) -> None:
    a, b = pump.attach_pipes(0), pump.attach_pipes(1)  # type: ignore[attr-defined]

    a.out(b"from zero\n")
    b.out(b"from one\n")
    a.close_writers()
    b.close_writers()

    assert pump.wait_closed([0, 1], timeout_s=DEADLINE_S)
    assert sink.of(0, False) == ["from zero"] and sink.of(1, False) == ["from one"]
    assert "from one" not in (tmp_path / "rank-0.log").read_text()
    assert "from zero" not in (tmp_path / "rank-1.log").read_text()


def test_a_partial_last_line_is_emitted_at_eof(pump: OutputPump, sink: Sink) -> None:
    pipes = pump.attach_pipes(0)  # type: ignore[attr-defined]

    pipes.out(b"epoch 1\nepoch 2 (no newline")
    assert sink.wait_for(1)
    pipes.close_writers()

    assert pump.wait_closed([0], timeout_s=DEADLINE_S)
    assert sink.of(0, False) == ["epoch 1", "epoch 2 (no newline"]


def test_a_line_split_across_writes_is_one_line(pump: OutputPump, sink: Sink) -> None:
    pipes = pump.attach_pipes(0)  # type: ignore[attr-defined]

    pipes.out(b"hel")
    pipes.out(b"lo\r\n")  # a CRLF line loses its \r
    pipes.out(b"caf\xc3\xa9 \xff\n")  # invalid UTF-8 is replaced, not fatal
    pipes.close_writers()

    assert pump.wait_closed([0], timeout_s=DEADLINE_S)
    assert sink.of(0, False) == ["hello", "café \ufffd"]


def test_tail_lines_seen_and_lines_since(pump: OutputPump) -> None:
    pipes = pump.attach_pipes(3)  # type: ignore[attr-defined]
    pipes.out(b"".join(b"line %d\n" % i for i in range(5)))
    assert wait_until(lambda: pump.lines_seen(3) == 5)
    mark = pump.lines_seen(3)

    pipes.err(b"dump 1\ndump 2\n")
    assert wait_until(lambda: pump.lines_seen(3) == 7)

    assert pump.lines_since(3, mark) == ["dump 1", "dump 2"]
    assert pump.lines_since(3, 7) == []
    assert pump.tail(3, 3) == ["line 4", "dump 1", "dump 2"]
    assert pump.tail(3) == [f"line {i}" for i in range(5)] + ["dump 1", "dump 2"]
    # A rank the pump never saw.
    assert (pump.tail(9), pump.lines_seen(9), pump.lines_since(9, 0)) == ([], 0, [])


def test_tail_keeps_the_last_lines_only(pump: OutputPump) -> None:
    pipes = pump.attach_pipes(0)  # type: ignore[attr-defined]
    n = TAIL_LINES + 50

    pipes.out(b"".join(b"%d\n" % i for i in range(n)))
    pipes.close_writers()

    assert pump.wait_closed([0], timeout_s=DEADLINE_S)
    assert pump.lines_seen(0) == n
    assert pump.tail(0, n) == [str(i) for i in range(50, n)]
    assert pump.lines_since(0, 0) == [str(i) for i in range(50, n)]  # "as far as kept"


def test_wait_closed_waits_for_both_streams(pump: OutputPump) -> None:
    pipes = pump.attach_pipes(0)  # type: ignore[attr-defined]

    os.close(pipes.out_w)
    pipes.out_w = -1
    assert not pump.wait_closed([0], timeout_s=0.05)  # stderr is still open

    pipes.close_writers()
    assert pump.wait_closed([0], timeout_s=DEADLINE_S)
    assert pump.wait_closed([5], timeout_s=0)  # an unknown rank has nothing open


def test_a_restarted_rank_appends_to_its_log(pump: OutputPump, tmp_path: Path) -> None:
    first = pump.attach_pipes(0, "generation 0")  # type: ignore[attr-defined]
    first.out(b"before\n")
    first.close_writers()
    assert pump.wait_closed([0], timeout_s=DEADLINE_S)

    second = pump.attach_pipes(0, "generation 1")  # type: ignore[attr-defined]
    second.out(b"after\n")
    second.close_writers()
    assert pump.wait_closed([0], timeout_s=DEADLINE_S)

    assert (tmp_path / "rank-0.log").read_text().splitlines() == [
        "==== generation 0 ====",
        "before",
        "==== generation 1 ====",
        "after",
    ]


def test_a_broken_sink_does_not_stop_logging(tmp_path: Path) -> None:
    def broken(rank: int, line: str, is_stderr: bool) -> None:
        raise OSError("console gone")

    pump = OutputPump(tmp_path, broken)
    pipes = Pipes()
    try:
        pump.attach(0, pipes.out_r, pipes.err_r, "h")
        pipes.out(b"a\nb\n")
        pipes.close_writers()
        assert pump.wait_closed([0], timeout_s=DEADLINE_S)
        assert pump.tail(0) == ["a", "b"]
    finally:
        pump.stop()
        pipes.close_writers()
    assert (tmp_path / "rank-0.log").read_text().splitlines() == ["==== h ====", "a", "b"]


def test_stop_drains_and_closes_everything(tmp_path: Path, sink: Sink) -> None:
    pump = OutputPump(tmp_path, sink)
    pipes = Pipes()
    pump.attach(0, pipes.out_r, pipes.err_r, "h")
    pipes.out(b"said\nhalf a line")
    pipes.err(b"on stderr\n")
    try:
        # The writers stay open (a worker that is still alive): stop must not wait for EOF.
        pump.stop()

        assert not pump._thread.is_alive()
        assert not [t for t in threading.enumerate() if t.name == "ddp-launch-output"]
        assert sink.of(0, False) == ["said", "half a line"]
        assert sink.of(0, True) == ["on stderr"]
        with pytest.raises(BrokenPipeError):  # the pump closed its read ends
            pipes.out(b"x")
        with pytest.raises(BrokenPipeError):
            pipes.err(b"x")
        assert pump._ranks[0].log.closed
        assert (tmp_path / "rank-0.log").read_text().count("half a line") == 1
    finally:
        pipes.close_writers()


def test_stop_with_nothing_attached(tmp_path: Path, sink: Sink) -> None:
    pump = OutputPump(tmp_path, sink)
    pump.stop()
    assert not pump._thread.is_alive()
    assert sink.lines == []


def test_tail_of_zero_lines_is_empty(pump: OutputPump) -> None:
    pipes = pump.attach_pipes(0)  # type: ignore[attr-defined]
    pipes.out(b"a\nb\n")
    pipes.close_writers()
    assert pump.wait_closed([0], timeout_s=DEADLINE_S)

    assert pump.tail(0, 0) == []


# -- the failure report --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


TRACEBACK = """\
Traceback (most recent call last):
  File "/home/user/train.py", line 41, in <module>
    loss = model(batch).sum()
RuntimeError: CUDA error: an illegal memory access was encountered
"""


class History:
    """Generations played on a real Registry with a fake clock."""

    def __init__(self, world: int = 2) -> None:
        self.clock = FakeClock()
        self.registry = Registry(
            run_id="run-1",
            nnodes=1,
            local_world_size=world,
            max_restarts=3,
            ddp_addr="127.0.0.1",
            port_picker=lambda host: 29500,
            clock=self.clock,
        )
        self.world = world

    def pid(self, rank: int) -> int:
        return 4000 + 10 * self.registry.generation + rank

    def play(self, steps: list[int], *, begin: bool = False) -> None:
        """Register every rank, then a heartbeat at step 0 and at its step."""
        if begin:
            self.registry.begin_generation(self.registry.generation + 1)
        g = self.registry.generation
        for rank in range(self.world):
            self.registry.register(node_rank=0, local_rank=rank, pid=self.pid(rank), hostname="node-a", generation=g)
        for rank, step in enumerate(steps):
            self.registry.heartbeat(rank=rank, generation=g, pid=self.pid(rank), step=0)
            self.clock.now += 1.0
            self.registry.heartbeat(rank=rank, generation=g, pid=self.pid(rank), step=step)

    def failed(self, root: int, code: int, *, also: dict[int, int] | None = None) -> GenerationResult:
        g = self.registry.generation
        failures = [WorkerExit(root, self.pid(root), code, at=1_764_000_000.0)]
        failures += [WorkerExit(r, self.pid(r), c, at=1_764_000_001.0) for r, c in (also or {}).items()]
        snapshot = self.registry.snapshot()
        for f in failures:
            self.registry.record_exit(f.rank, g, f.exit_code)
        return GenerationResult(
            g,
            Outcome.FAILED,
            failures=failures,
            root_rank=root,
            message=f"rank {root} failed ({failures[0].description})",
            snapshot=snapshot,
        )


def test_the_report_of_a_failed_run(tmp_path: Path) -> None:
    h = History()
    h.play([7, 7])
    h.registry.report_failure(rank=1, generation=0, pid=h.pid(1), exception_type="RuntimeError", traceback=TRACEBACK)
    g = h.failed(1, 1, also={0: -signal.SIGTERM})
    result = RunResult(Outcome.FAILED, [g], wall_s=12.34567)
    tails = {0: ["rank 0 says hi"], 1: [f"line {i}" for i in range(30)]}

    report = build_report(result, tails)

    assert json.loads(json.dumps(report)) == report  # plain JSON data
    assert report["outcome"] == "failed"
    assert report["message"] == "rank 1 failed (exit code 1)"
    assert report["wall_s"] == 12.346
    assert report["restarts"] == 0 and report["flapping"] is False
    cause = report["root_cause"]
    assert cause["rank"] == 1 and cause["node_rank"] == 0 and cause["hostname"] == "node-a"
    assert cause["pid"] == h.pid(1) and cause["generation"] == 0 and cause["step"] == 7
    assert (cause["exit_code"], cause["exit"]) == (1, "exit code 1")
    assert "signal" not in cause
    assert cause["exception_type"] == "RuntimeError" and cause["traceback"] == TRACEBACK
    assert cause["log_tail"] == [f"line {i}" for i in range(10, 30)]
    assert report["consequences"] == [{"rank": 0, "pid": h.pid(0), "exit": "signal SIGTERM", "exit_code": -15}]
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert report["generations"] == [
        {"generation": 0, "outcome": "failed", "message": "rank 1 failed (exit code 1)", "root_rank": 1}
    ]

    text = format_report(report, tmp_path)
    lines = text.splitlines()
    assert lines[0] == "ddp-launch: run failed: rank 1 failed (exit code 1)"
    assert f"  root cause: rank 1 on node-a (node 0), pid {h.pid(1)}, generation 0: exit code 1" in lines
    at = lines.index("  traceback (from the worker):")
    assert lines[at + 1 : at + 5] == ["    " + t for t in TRACEBACK.rstrip().splitlines()]
    assert "last lines of" not in text  # the traceback says it better
    assert "  rank 0 then ended too (signal SIGTERM), as a consequence" in lines
    assert lines[-1] == f"  report: {tmp_path / 'failure.json'}; logs: {tmp_path}/rank-<i>.log"
    assert "after" not in lines[1]  # no restarts line


def test_a_death_by_signal_without_traceback_shows_the_log_tail(tmp_path: Path) -> None:
    h = History()
    h.play([3, 3])
    g = h.failed(0, -signal.SIGKILL)
    report = build_report(RunResult(Outcome.FAILED, [g], wall_s=1.0), {0: ["loading shard 7", "Killed"]})

    cause = report["root_cause"]
    assert (cause["exit"], cause["signal"]) == ("signal SIGKILL", "SIGKILL")
    assert "traceback" not in cause
    text = format_report(report, tmp_path)
    assert ": signal SIGKILL" in text
    assert "  last lines of rank-0.log:\n    loading shard 7\n    Killed" in text


def test_the_report_of_a_hang(tmp_path: Path) -> None:
    h = History()
    h.play([5, 5])
    h.clock.now += 400.0
    verdicts = h.registry.find_hung(300.0)
    stack = 'Current thread 0x1 (most recent call first):\n  File "/home/user/data.py", line 17 in load_shard'
    g = GenerationResult(
        0,
        Outcome.HUNG,
        hung=verdicts,
        stacks={1: stack},
        root_rank=1,
        message=f"rank 1 hung: {verdicts[1].reason}",
        snapshot=h.registry.snapshot(),
    )

    report = build_report(RunResult(Outcome.HUNG, [g], wall_s=420.0), {})

    cause = report["root_cause"]
    assert cause["hang"] == next(v.reason for v in verdicts if v.rank == 1)
    assert cause["hang"].startswith("no heartbeat for")
    assert cause["stack"] == stack
    assert "exit" not in cause and report["consequences"] == []
    text = format_report(report, tmp_path)
    assert "generation 0: no heartbeat for" in text
    assert "  where it was stuck (Python stacks, all threads):" in text
    assert '    File "/home/user/data.py", line 17 in load_shard' in text
    # A hang lists every rank's state for the reader.
    assert "  rank 0: training, step 5, last heartbeat 401.0 s ago" in text
    assert "  rank 1: training, step 5, last heartbeat 400.0 s ago" in text


def test_an_interrupted_run_has_no_root_cause(tmp_path: Path) -> None:
    h = History()
    g = GenerationResult(
        0,
        Outcome.INTERRUPTED,
        signal_number=signal.SIGINT,
        message="stopped by SIGINT",
        snapshot=h.registry.snapshot(),
    )

    report = build_report(RunResult(Outcome.INTERRUPTED, [g], wall_s=3.0), {})

    assert report["root_cause"] is None
    text = format_report(report, tmp_path)
    assert text.splitlines()[0] == "ddp-launch: run interrupted: stopped by SIGINT"
    assert "root cause" not in text
    assert "  rank 0: starting, step 0, no heartbeat" in text


def test_three_generations_failing_at_step_zero_are_flapping(tmp_path: Path) -> None:
    h = History()
    generations = []
    for i in range(3):
        h.play([0, 0], begin=i > 0)
        generations.append(h.failed(1, 1))
    result = RunResult(Outcome.FAILED, generations, wall_s=5.0)

    assert flapping(result)
    report = build_report(result, {})
    assert report["restarts"] == 2 and report["flapping"] is True
    assert [g["generation"] for g in report["generations"]] == [0, 1, 2]
    text = format_report(report, tmp_path)
    assert "  after 2 restart(s)" in text
    assert "restarts made no progress" in text


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([0, 0], False),  # two generations are not enough to call it flapping
        ([10, 20, 30], False),  # each restart got further
        ([50, 50, 40], True),
        ([0, 5, 0], False),
    ],
)
def test_flapping_needs_three_generations_without_progress(steps: list[int], expected: bool) -> None:
    h = History()
    generations = []
    for i, s in enumerate(steps):
        h.play([s, s], begin=i > 0)
        generations.append(h.failed(0, 1))

    assert flapping(RunResult(Outcome.FAILED, generations, wall_s=1.0)) is expected


def test_a_succeeded_generation_does_not_count_for_flapping() -> None:
    snap = RunSnapshot("r", 1, 0, 3, 0.0, 0, True, ())
    gens = [GenerationResult(i, Outcome.FAILED, snapshot=snap) for i in range(2)]
    gens.append(GenerationResult(2, Outcome.SUCCEEDED, snapshot=snap))

    assert not flapping(RunResult(Outcome.SUCCEEDED, gens, wall_s=1.0))


def test_write_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "failure.json"
    path.write_text("old")

    write_json_atomic(path, {"a": 1, "when": Path("x")})

    assert json.loads(path.read_text()) == {"a": 1, "when": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["failure.json"]  # no temporary left

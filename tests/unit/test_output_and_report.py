"""OutputPump over real pipes (no processes), and the failure report from hand-built results."""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from ddp_launch.config import LogOptions
from ddp_launch.observe.failure import build_report, flapping, format_report
from ddp_launch.progress import Progress
from ddp_launch.registry import Registry, RunSnapshot
from ddp_launch.run.output import MAX_LINE_BYTES, PIPE, TAIL_LINES, TERMINAL, LivePolicy, OutputPump, collapse
from ddp_launch.run.result import GenerationResult, Outcome, RunResult, WorkerExit
from ddp_launch.run.torchrun_logs import FilterTap
from ddp_launch.rundir import write_json_atomic
from tests.fakes import FakeClock

DEADLINE_S = 5.0

# -- OutputPump ----------------------------------------------------------------------------


class Sink:
    """Collects (rank, line, is_stderr) from the pump's thread, and each call's batch."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.lines: list[tuple[int, str, bool]] = []
        self.batches: list[tuple[int, list[str], bool]] = []

    def __call__(self, rank: int, lines: Sequence[str], is_stderr: bool) -> None:
        with self.cond:
            self.batches.append((rank, list(lines), is_stderr))
            self.lines += [(rank, line, is_stderr) for line in lines]
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
    def broken(rank: int, lines: Sequence[str], is_stderr: bool) -> None:
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


def test_a_carriage_return_line_is_logged_as_a_terminal_shows_it(pump: OutputPump, sink: Sink, tmp_path: Path) -> None:
    pipes = pump.attach_pipes(0)  # type: ignore[attr-defined]

    pipes.out(b"".join(b"\r%d%%" % i for i in range(0, 101, 10)) + b"\n")  # tqdm's way
    pipes.out(b"".join(b"step %d\r" % i for i in range(5)) + b"\n")  # print(..., end="\r")
    pipes.out(b"done\r\n")
    pipes.out(b"\r\r\n")  # nothing but carriage returns: an empty line
    pipes.close_writers()

    assert pump.wait_closed([0], timeout_s=DEADLINE_S)
    expected = ["100%", "step 4", "done", ""]
    assert sink.of(0, False) == expected
    assert pump.tail(0) == expected and pump.lines_seen(0) == 4
    assert (tmp_path / "rank-0.log").read_text().splitlines()[1:] == expected


def test_a_bar_redrawn_for_long_on_one_line_stays_small(pump: OutputPump, sink: Sink) -> None:
    pipes = pump.attach_pipes(0)  # type: ignore[attr-defined]
    states = b"".join(b"\rbatch %d/200000" % i for i in range(200_000))  # 3 MB, no newline

    writer = threading.Thread(target=pipes.out, args=(states,))
    writer.start()
    writer.join(timeout=DEADLINE_S)
    assert wait_until(lambda: any(s.partial.endswith(b"199999/200000") for s in _streams(pump)))

    assert max(len(s.partial) for s in _streams(pump)) < 100  # only what can still be shown
    pipes.out(b"\n")
    assert sink.wait_for(1)
    assert sink.of(0, False) == ["batch 199999/200000"]


def test_a_line_that_never_ends_is_cut(pump: OutputPump, sink: Sink) -> None:
    pipes = pump.attach_pipes(0)  # type: ignore[attr-defined]

    writer = threading.Thread(target=pipes.out, args=(b"." * (MAX_LINE_BYTES + 10),))
    writer.start()
    assert sink.wait_for(1)
    writer.join(timeout=DEADLINE_S)
    pipes.close_writers()

    assert pump.wait_closed([0], timeout_s=DEADLINE_S)
    assert sum(len(line) for line in sink.of(0, False)) == MAX_LINE_BYTES + 10
    assert max(len(line) for line in sink.of(0, False)) <= MAX_LINE_BYTES


def test_a_character_split_across_reads_is_whole(pump: OutputPump, sink: Sink) -> None:
    pipes = pump.attach_pipes(0)  # type: ignore[attr-defined]

    pipes.out(b"caf\xc3")
    assert wait_until(lambda: any(s.partial for s in _streams(pump)))
    pipes.out(b"\xa9\n")
    pipes.close_writers()

    assert pump.wait_closed([0], timeout_s=DEADLINE_S)
    assert sink.of(0, False) == ["café"]


@pytest.mark.parametrize(
    ("line", "shown"),
    [("plain", "plain"), ("a\rb", "b"), ("50%\r", "50%"), ("a\rb\r\r", "b"), ("\r\r", ""), ("", ""), ("\rx", "x")],
)
def test_collapse(line: str, shown: str) -> None:
    assert collapse(line) == shown


def _streams(pump: OutputPump) -> list:
    return [key.data for key in pump._selector.get_map().values() if key.data is not None]


# -- live states: the line so far, before its newline ------------------------------------------------


class Live:
    """Collects live(rank, state, is_stderr) calls, with when they came."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.calls: list[tuple[int, str | None, bool]] = []
        self.at: list[float] = []

    def __call__(self, rank: int, state: str | None, is_stderr: bool) -> None:
        with self.cond:
            self.calls.append((rank, state, is_stderr))
            self.at.append(time.monotonic())
            self.cond.notify_all()

    def wait_for(self, call: tuple[int, str | None, bool]) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: call in self.calls, timeout=DEADLINE_S)

    def states(self) -> list[str | None]:
        with self.cond:
            return [state for _, state, _ in self.calls]


@pytest.fixture
def live_pump(tmp_path: Path, sink: Sink):
    """A pump with a live callback; `make(policy)` builds it."""
    made: list[tuple[OutputPump, Pipes]] = []

    def make(policy: LivePolicy = TERMINAL, **kw) -> tuple[OutputPump, Pipes, Live]:
        live = Live()
        p = OutputPump(tmp_path, sink, live=live, live_policy=policy, **kw)
        pipes = Pipes()
        made.append((p, pipes))
        p.attach(0, pipes.out_r, pipes.err_r, "generation 0")
        return p, pipes, live

    yield make
    for p, pipes in made:
        p.stop()
        pipes.close_writers()


def test_a_bars_states_are_shown_live_and_taken_down_at_its_newline(live_pump, sink: Sink, tmp_path: Path) -> None:
    pump, pipes, live = live_pump(LivePolicy(bar_interval_s=0, bar_settle_s=0, prompt_settle_s=0))

    pipes.err(b"\r 10%|#         |")
    assert live.wait_for((0, " 10%|#         |", True))
    pipes.err(b"\r 20%|##        |")
    assert live.wait_for((0, " 20%|##        |", True))
    assert sink.lines == []  # nothing is complete yet
    pipes.err(b"\r100%|##########|\n")

    assert live.wait_for((0, None, True))
    assert sink.wait_for(1)
    assert sink.lines == [(0, "100%|##########|", True)]
    assert live.states()[-1] is None
    pipes.close_writers()
    assert pump.wait_closed([0], timeout_s=DEADLINE_S)
    assert (tmp_path / "rank-0.log").read_text().splitlines()[1:] == ["100%|##########|"]


def test_a_prompt_is_shown_before_its_newline(live_pump, sink: Sink) -> None:
    pump, pipes, live = live_pump(PIPE)

    pipes.out(b"> /train.py(12)<module>()\n-> loss = model(x)\n(Pdb) ")

    assert live.wait_for((0, "(Pdb) ", False))
    assert sink.of(0, False) == ["> /train.py(12)<module>()", "-> loss = model(x)"]
    pipes.out(b"p loss\n")  # the user's answer, echoed by the script
    assert live.wait_for((0, None, False))
    assert sink.wait_for(3)
    assert sink.of(0, False)[-1] == "(Pdb) p loss"


def test_on_a_pipe_a_bar_is_shown_at_most_once_an_interval(live_pump) -> None:
    interval_s = 0.4
    pump, pipes, live = live_pump(LivePolicy(bar_interval_s=interval_s, bar_settle_s=0.05, prompt_settle_s=0.05))

    end = time.monotonic() + 1.0
    i = 0
    while time.monotonic() < end:
        pipes.err(b"\rstep %d" % i)
        i += 1
        threading.Event().wait(0.01)  # a bar redrawn 100 times a second
    with live.cond:
        assert live.cond.wait_for(lambda: len(live.calls) >= 2, timeout=DEADLINE_S)

    shown = live.states()
    assert 2 <= len(shown) <= 4
    assert all(s is not None and s.startswith("step ") for s in shown)
    gaps = [b - a for a, b in zip(live.at, live.at[1:])]
    assert min(gaps) >= interval_s - 0.05
    # The last state is shown once it has settled, however early it came in the interval.
    assert live.wait_for((0, f"step {i - 1}", True))


def test_on_a_pipe_a_state_replaced_at_once_is_not_shown(live_pump, sink: Sink) -> None:
    pump, pipes, live = live_pump(PIPE)

    pipes.out(b"\rloading")
    pipes.out(b"\rloaded\n")  # within the 0.2 s a state waits on a pipe
    pipes.close_writers()

    assert pump.wait_closed([0], timeout_s=DEADLINE_S)
    assert sink.of(0, False) == ["loaded"]
    assert live.calls == []


def test_a_stream_off_the_console_shows_no_live_state(live_pump, sink: Sink) -> None:
    pump, pipes, live = live_pump(
        LivePolicy(bar_interval_s=0, bar_settle_s=0, prompt_settle_s=0), logs=LogOptions(redirects="2")
    )

    pipes.err(b"(Pdb) ")
    pipes.out(b"(Pdb) ")
    assert live.wait_for((0, "(Pdb) ", False))
    pipes.err(b"x\n")
    pipes.close_writers()

    assert pump.wait_closed([0], timeout_s=DEADLINE_S)
    assert all(not is_stderr for _, _, is_stderr in live.calls)
    assert sink.of(0, True) == [] and sorted(pump.tail(0)) == ["(Pdb) ", "(Pdb) x"]


# -- batching ---------------------------------------------------------------------------------------


def test_a_flood_of_lines_comes_in_batches_and_whole(pump: OutputPump, sink: Sink, tmp_path: Path) -> None:
    n = 20_000
    writers = []
    expected: dict[tuple[int, bool], list[str]] = {}
    for rank in (0, 1):
        pipes = pump.attach_pipes(rank)  # type: ignore[attr-defined]
        for is_stderr in (False, True):
            lines = [f"rank {rank} {'err' if is_stderr else 'out'} line {i} " + "x" * (i % 97) for i in range(n)]
            expected[(rank, is_stderr)] = lines
            write = pipes.err if is_stderr else pipes.out

            def flood(write=write, lines=lines) -> None:
                for k in range(0, n, 50):  # as a line-buffered worker writes: many small writes
                    write("".join(f"{line}\n" for line in lines[k : k + 50]).encode())

            writers.append(threading.Thread(target=flood))
        writers.append(pipes)  # type: ignore[arg-type]
    threads = [w for w in writers if isinstance(w, threading.Thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for w in writers:
        if isinstance(w, Pipes):
            w.close_writers()

    assert pump.wait_closed([0, 1], timeout_s=30)
    for (rank, is_stderr), lines in expected.items():
        assert sink.of(rank, is_stderr) == lines  # nothing lost, torn, reordered or crossed over
    assert len(sink.batches) < 4 * n // 50  # whole reads, not lines, reach the console
    for rank in (0, 1):
        logged = (tmp_path / f"rank-{rank}.log").read_text().splitlines()[1:]
        assert sorted(logged) == sorted(expected[(rank, False)] + expected[(rank, True)])


def test_the_log_is_flushed_while_the_worker_lives(pump: OutputPump) -> None:
    pipes = pump.attach_pipes(0)  # type: ignore[attr-defined]

    pipes.out(b"first words\n")

    # The worker is silent now: the log has the line on disk without waiting for its end.
    assert wait_until(lambda: "first words" in pump.log_path(0).read_text())


# -- torchrun's log files ---------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes | None]:
    """{relative path: contents, None for a directory} under root."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _run_pump(tmp_path: Path, logs: LogOptions, script: Callable[[Callable[..., Pipes]], None], **kw) -> Sink:
    """A pump with these options, fed by `script(attach)`; every pipe closed and drained."""
    sink = Sink()
    pump = OutputPump(tmp_path / "run", sink, logs=logs, run_id="run-7", **kw)
    made: list[tuple[int, Pipes]] = []

    def attach(rank: int, generation: int = 0) -> Pipes:
        pipes = Pipes()
        made.append((rank, pipes))
        pump.attach(rank, pipes.out_r, pipes.err_r, f"generation {generation}", generation=generation)
        return pipes

    try:
        script(attach)
        for _, pipes in made:
            pipes.close_writers()
        assert pump.wait_closed(sorted({r for r, _ in made}), timeout_s=DEADLINE_S)
    finally:
        pump.stop()
        for _, pipes in made:
            pipes.close_writers()
    return sink


def _two_ranks(attach: Callable[..., Pipes]) -> None:
    for rank in (0, 1):
        pipes = attach(rank)
        pipes.out(b"hello %d\n" % rank)
        pipes.out(b"\rbar %d 0\rbar %d 1\n" % (rank, rank))
        pipes.out(b"KEEP %d\n" % rank)
        pipes.err(b"warn %d KEEP\n" % rank)


def test_the_filter_splits_lines_as_torchruns_tailer_reads_them(tmp_path: Path) -> None:
    data = b"a KEEP\r\nb\rKEEP c\r\rd KEEP\nKEEP caf\xc3\xa9\r\n\rKEEP e\rf\nKEEP end"
    # torchrun reads the file with universal newlines and copies matching lines as read.
    reference = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace", newline=None).readlines()
    expected = "".join(f"[default1]:{line}" for line in reference if "KEEP" in line)

    for split in range(len(data) + 1):  # wherever the reads happen to end
        released: list[bool] = []
        with open(tmp_path / "filtered.log", "w", encoding="utf-8") as file:
            tap = FilterTap(("KEEP",), "[default1]:", file, functools.partial(released.append, True))
            tap.feed(data[:split])
            tap.feed(data[split:])
            tap.close()
        assert (tmp_path / "filtered.log").read_text(encoding="utf-8") == expected, split
        assert released == [True]


def test_log_dir_and_tee_write_torchruns_tree(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    logs = LogOptions(log_dir=tmp_path / "D", tee="3", duplicate_stdout_filters=("KEEP", "bar"))
    sink = _run_pump(tmp_path, logs, _two_ranks, nproc_per_node=2)

    (job,) = (tmp_path / "D").iterdir()
    assert job.name.startswith("run-7_") and len(job.name) == len("run-7_") + 8
    tree = _tree(job)
    assert tree == {
        "attempt_0": None,
        "attempt_0/0": None,
        "attempt_0/0/stderr.log": b"warn 0 KEEP\n",
        "attempt_0/0/stdout.log": b"hello 0\n\rbar 0 0\rbar 0 1\nKEEP 0\n",  # the bytes as written
        "attempt_0/1": None,
        "attempt_0/1/stderr.log": b"warn 1 KEEP\n",
        "attempt_0/1/stdout.log": b"hello 1\n\rbar 1 0\rbar 1 1\nKEEP 1\n",
        "attempt_0/filtered_stdout.log": tree["attempt_0/filtered_stdout.log"],
    }
    # torchrun's tailer: every \r piece is a line, prefixed with the role and local rank.
    filtered = tree["attempt_0/filtered_stdout.log"].decode().splitlines()  # type: ignore[union-attr]
    for rank in (0, 1):
        mine = [line for line in filtered if line.startswith(f"[default{rank}]:")]
        assert mine == [
            f"[default{rank}]:bar {rank} 0",
            f"[default{rank}]:bar {rank} 1",
            f"[default{rank}]:KEEP {rank}",
        ]
    # --tee: the console still has everything, and the run directory's logs too.
    assert sink.of(0, False) == ["hello 0", "bar 0 1", "KEEP 0"] and sink.of(1, True) == ["warn 1 KEEP"]
    assert (tmp_path / "run" / "rank-1.log").read_text().splitlines()[1:4] == ["hello 1", "bar 1 1", "KEEP 1"]


def test_redirects_without_log_dir_use_a_torchelastic_temp_dir(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "run").mkdir()
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    sink = _run_pump(tmp_path, LogOptions(redirects="3"), _two_ranks, nproc_per_node=2)

    (base,) = temp.iterdir()
    assert base.name.startswith("torchelastic_")
    (job,) = base.iterdir()
    assert sorted(_tree(job)) == [
        "attempt_0",
        "attempt_0/0",
        "attempt_0/0/stderr.log",
        "attempt_0/0/stdout.log",
        "attempt_0/1",
        "attempt_0/1/stderr.log",
        "attempt_0/1/stdout.log",
    ]
    assert sink.lines == []  # -r: files only
    assert "hello 0" in (tmp_path / "run" / "rank-0.log").read_text()  # ddp-launch's log has it all


def test_each_restart_gets_its_attempt_and_a_filter_on_the_console(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    logs = LogOptions(
        log_dir=tmp_path / "D", tee="0:3", local_ranks_filter=frozenset({0}), duplicate_stderr_filters=("KEEP",)
    )

    def two_generations(attach: Callable[..., Pipes]) -> None:
        for generation in (0, 1):
            for rank in (2, 3):  # node 1 of 2 nodes of 2: local ranks 0 and 1
                pipes = attach(rank, generation)
                pipes.out(b"gen %d rank %d\n" % (generation, rank))
                pipes.err(b"KEEP %d\n" % rank)

    sink = _run_pump(tmp_path, logs, two_generations, node_rank=1, nproc_per_node=2, role="trainer")

    (job,) = (tmp_path / "D").iterdir()
    tree = _tree(job)
    for g in (0, 1):
        assert tree[f"attempt_{g}/0/stdout.log"] == b"gen %d rank 2\n" % g
        assert tree[f"attempt_{g}/0/stderr.log"] == b"KEEP 2\n"
        assert tree[f"attempt_{g}/1"] is None  # a directory, empty: local rank 1 has no files
        assert tree[f"attempt_{g}/filtered_stderr.log"] == b"[trainer0]:KEEP 2\n"  # only what is tee'd
    assert sorted(tree) == sorted(
        f"attempt_{g}{rest}"
        for g in (0, 1)
        for rest in ("", "/0", "/0/stdout.log", "/0/stderr.log", "/1", "/filtered_stderr.log")
    )
    # --local-ranks-filter 0: local rank 1 (rank 3) stays off the console, not out of its log.
    assert {rank for rank, _, _ in sink.lines} == {2}
    assert sink.of(2, False) == ["gen 0 rank 2", "gen 1 rank 2"]
    assert "gen 1 rank 3" in (tmp_path / "run" / "rank-3.log").read_text()


def test_no_torchrun_options_no_torchrun_files(tmp_path: Path, monkeypatch) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    (tmp_path / "run").mkdir()

    _run_pump(tmp_path, LogOptions(), _two_ranks, nproc_per_node=2)

    assert list(temp.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["rank-0.log", "rank-1.log"]


# -- the failure report --------------------------------------------------------------------


TRACEBACK = """\
Traceback (most recent call last):
  File "/home/user/train.py", line 41, in <module>
    loss = model(batch).sum()
RuntimeError: CUDA error: an illegal memory access was encountered
"""


class History:
    """Generations played on a real Registry with a fake clock."""

    def __init__(self, world: int = 2) -> None:
        self.clock = FakeClock(500.0)
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
            self.registry.heartbeat(rank=rank, generation=g, pid=self.pid(rank), progress=Progress())
            self.clock.now += 1.0
            self.registry.heartbeat(
                rank=rank, generation=g, pid=self.pid(rank), progress=Progress(optimizer_steps=step)
            )

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
    assert "  rank 0: training, optimizer step 5, last heartbeat 401.0 s ago" in text
    assert "  rank 1: training, optimizer step 5, last heartbeat 400.0 s ago" in text


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
    assert "  rank 0: starting, optimizer step 0, no heartbeat" in text


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

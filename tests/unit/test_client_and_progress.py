"""The in-worker side without a master: the progress tracker and the heartbeat thread.

The heartbeat thread talks to a fake client; its waits are real but tiny (intervals of
10 ms), and every wait on it is a condition with a deadline, never a bare sleep.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import types
from collections.abc import Callable, Iterator

import grpc
import pytest

import ddp_launch
from ddp_launch import progress
from ddp_launch.control import heartbeat as client_module
from ddp_launch.control.heartbeat import HeartbeatThread, heartbeat_request
from ddp_launch.env import CONTROL_ADDR, Assignment
from ddp_launch.progress import Progress, _Tracker
from ddp_launch.proto import orchestrator_pb2 as pb

DEADLINE_S = 5.0
ADDRESS = "127.0.0.1:41234"

# -- the progress tracker ------------------------------------------------------------------


class Optimizer:
    """Stands in for a torch optimizer: the hook only needs its identity."""


def step(t: _Tracker, optimizer: object) -> None:
    # What torch's global optimizer step post-hook calls: hook(optimizer, args, kwargs).
    t.on_optimizer_step(optimizer, (), {})


def test_a_fresh_tracker_is_at_step_zero() -> None:
    snap = _Tracker().snapshot()
    assert dataclasses.replace(snap, step_age_s=0.0) == Progress(
        optimizer_steps=0, reported_step=None, samples=0, loss=None, total_steps=0, metrics={}
    )
    assert 0 <= snap.step_age_s < 5


def test_the_step_age_restarts_when_the_step_moves() -> None:
    t, opt = _Tracker(), Optimizer()
    t._last_step_at -= 100  # as if the tracker had been idle for a long time
    assert t.snapshot().step_age_s >= 100
    t.on_optimizer_step(opt, (), {})
    assert t.snapshot().step_age_s < 5


def test_steps_are_counted_from_the_optimizer_hook() -> None:
    t, opt = _Tracker(), Optimizer()

    for _ in range(3):
        step(t, opt)

    assert t.snapshot().step == 3


def test_two_optimizers_stepping_once_each_are_one_step() -> None:
    t, generator, discriminator = _Tracker(), Optimizer(), Optimizer()

    for _ in range(4):
        step(t, generator)
        step(t, discriminator)

    assert t.snapshot().step == 4


def test_an_optimizer_stepping_more_often_sets_the_pace() -> None:
    t, every_step, every_other = _Tracker(), Optimizer(), Optimizer()

    for i in range(6):
        step(t, every_step)
        if i % 2:
            step(t, every_other)

    assert t.snapshot().step == 6


def test_an_explicit_step_overrides_the_automatic_count() -> None:
    t, opt = _Tracker(), Optimizer()
    for _ in range(3):
        step(t, opt)

    t.report(step=1000, loss=None, samples=None, total_steps=None, metrics={})
    assert t.snapshot().step == 1000
    step(t, opt)
    assert t.snapshot().step == 1000  # explicit wins until the script reports again
    t.report(step=1001, loss=None, samples=None, total_steps=None, metrics={})
    assert t.snapshot().step == 1001


def test_report_stores_loss_samples_total_and_metrics() -> None:
    t = _Tracker()

    t.report(step=None, loss=0.25, samples=64, total_steps=500, metrics={"accuracy": 0.9, "lr": 1e-3})

    p = t.snapshot()
    assert (p.step, p.loss, p.samples, p.total_steps) == (0, 0.25, 64, 500)
    assert p.metrics == {"accuracy": 0.9, "lr": 1e-3}
    assert isinstance(p.loss, float) and isinstance(p.samples, int)


def test_non_finite_metrics_are_dropped() -> None:
    t = _Tracker()
    t.report(step=None, loss=None, samples=None, total_steps=None, metrics={"accuracy": 0.5})

    t.report(
        step=None,
        loss=None,
        samples=None,
        total_steps=None,
        metrics={"accuracy": math.nan, "grad_norm": math.inf, "neg": -math.inf, "lr": 0.1},
    )

    assert t.snapshot().metrics == {"accuracy": 0.5, "lr": 0.1}  # the last finite value stays


def test_none_leaves_a_value_as_it_was() -> None:
    t = _Tracker()
    t.report(step=5, loss=1.5, samples=10, total_steps=100, metrics={})

    t.report(step=None, loss=None, samples=None, total_steps=None, metrics={})

    p = t.snapshot()
    assert (p.step, p.loss, p.samples, p.total_steps) == (5, 1.5, 10, 100)


def test_a_snapshot_is_a_copy() -> None:
    t = _Tracker()
    t.report(step=None, loss=None, samples=None, total_steps=None, metrics={"a": 1.0})

    t.snapshot().metrics["a"] = 2.0

    assert t.snapshot().metrics == {"a": 1.0}


def test_a_new_optimizer_keeps_the_count_moving() -> None:
    t = _Tracker()
    first_stage = Optimizer()
    for _ in range(100):
        step(t, first_stage)
    second_stage = Optimizer()

    for _ in range(10):
        step(t, second_stage)

    assert t.snapshot().step > 100


def test_ddp_launch_report_works_outside_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONTROL_ADDR, raising=False)
    fresh = _Tracker()
    monkeypatch.setattr(progress, "tracker", fresh)

    assert ddp_launch.report() is None
    ddp_launch.report(step=3, loss=0.5, samples=96, total_steps=10, accuracy=0.75)

    p = fresh.snapshot()
    assert (p.step, p.loss, p.samples, p.total_steps, p.metrics) == (3, 0.5, 96, 10, {"accuracy": 0.75})


# -- the heartbeat thread ------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"fake {self._code.name}"


class FakeStream:
    """What stream_heartbeats() returns: a future of the call. Like gRPC, it reads the
    requests on a thread of its own; a scripted error ends it."""

    def __init__(self, client: FakeClient, requests: Iterator[pb.Heartbeat]) -> None:
        self._client = client
        self._requests = requests
        self._cancelled = False
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._callbacks: list[Callable] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._consume, daemon=True).start()

    def _consume(self) -> None:
        for request in self._requests:
            if self._cancelled:
                break
            error = self._client.record(request)
            if error is not None:
                self._error = error
                break
        self._finish()

    def _finish(self) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._done.set()
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def cancel(self) -> bool:
        self._cancelled = True
        self._finish()
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def exception(self) -> BaseException | None:
        return self._error


class FakeClient:
    """The client as HeartbeatThread uses it; `fail(n)` scripts heartbeat n (1-based): an error
    to raise (which ends a stream), or None to accept it. With answers=False the master takes
    stream heartbeats but lets every answered one time out (it hangs)."""

    address = ADDRESS

    def __init__(self, fail: Callable[[int], BaseException | None] = lambda n: None, answers: bool = True) -> None:
        self._fail = fail
        self.answers = answers
        self.answered: list[pb.Heartbeat] = []
        self._cond = threading.Condition()
        self.sent: list[pb.Heartbeat] = []
        self.streams = 0

    def record(self, request: pb.Heartbeat) -> BaseException | None:
        with self._cond:
            self.sent.append(request)
            n = len(self.sent)
            self._cond.notify_all()
        return self._fail(n)

    def heartbeat(self, a: Assignment, p: Progress) -> bool:
        request = heartbeat_request(a, p)
        if not self.answers:
            self.record(request)
            raise FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED)  # what a hung master gives
        error = self.record(request)
        if error is not None:
            raise error
        with self._cond:
            self.answered.append(request)
        return False

    def stream_heartbeats(self, requests: Iterator[pb.Heartbeat]) -> FakeStream:
        with self._cond:
            self.streams += 1
        return FakeStream(self, requests)

    @property
    def calls(self) -> int:
        with self._cond:
            return len(self.sent)

    def wait_calls(self, n: int, also: Callable[[], bool] = lambda: False) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.sent) >= n or also(), timeout=DEADLINE_S)


ASSIGNMENT = Assignment(
    rank=1,
    local_rank=1,
    world_size=2,
    local_world_size=2,
    node_rank=0,
    nnodes=1,
    ddp_addr="127.0.0.1",
    ddp_port=29500,
    run_id="run-1",
    generation=0,
    max_restarts=0,
)


class Lost:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        self.event.set()


@pytest.fixture
def heartbeats():
    made: list[HeartbeatThread] = []

    def make(client: FakeClient, read_progress: Callable[[], Progress] = Progress, **kw: float) -> tuple:
        lost = Lost()
        settings = {"interval_s": 0.01, "master_lost_timeout_s": 60.0, **kw}
        hb = HeartbeatThread(client, ASSIGNMENT, read_progress, on_master_lost=lost, **settings)  # type: ignore[arg-type]
        made.append(hb)
        hb.start()
        return hb, lost

    yield make
    for hb in made:
        hb.stop()
        assert not hb._thread.is_alive()


def test_heartbeats_are_sent_periodically_with_the_current_progress(heartbeats) -> None:
    t = _Tracker()
    client = FakeClient()
    hb, lost = heartbeats(client, t.snapshot)

    assert client.wait_calls(1)
    opt = Optimizer()
    for _ in range(3):
        step(t, opt)
    assert client.wait_calls(client.calls + 2)
    hb.stop()

    assert not hb._thread.is_alive()
    assert all((h.rank, h.generation) == (ASSIGNMENT.rank, ASSIGNMENT.generation) for h in client.sent)
    assert client.sent[-1].step == 3
    assert client.streams == 1  # one stream carries them all
    assert client.answered == client.sent[:1]  # the first is an answered RPC, the next not yet
    assert not lost.messages


def test_every_ack_interval_one_heartbeat_is_an_answered_rpc(heartbeats) -> None:
    client = FakeClient()
    hb, _ = heartbeats(client, ack_every_s=0.0)

    assert client.wait_calls(3)
    hb.stop()

    assert client.answered[:3] == client.sent[:3]
    assert client.streams == 1


def test_a_master_that_stops_answering_on_an_open_stream_is_lost(heartbeats) -> None:
    # Heartbeats are accepted (the stream stays open) but never answered: a hung master.
    client = FakeClient(answers=False)
    hb, lost = heartbeats(client, master_lost_timeout_s=0.05)

    assert lost.event.wait(DEADLINE_S)
    hb._thread.join(DEADLINE_S)
    assert not hb._thread.is_alive()
    assert lost.messages[0].startswith("lost the ddp-launch master at")


def test_transient_errors_warn_once_and_keep_going(heartbeats, capsys: pytest.CaptureFixture[str]) -> None:
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE)
    client = FakeClient(lambda n: unavailable if n <= 4 else None)
    hb, lost = heartbeats(client)

    assert client.wait_calls(8)
    hb.stop()

    assert not lost.messages
    err = capsys.readouterr().err
    assert err.count(f"heartbeat to {ADDRESS} failed; retrying") == 1


def test_a_lost_master_ends_the_worker_with_a_message(heartbeats) -> None:
    client = FakeClient(lambda n: FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    hb, lost = heartbeats(client, master_lost_timeout_s=0.05)

    assert lost.event.wait(DEADLINE_S)
    hb._thread.join(DEADLINE_S)  # the loop ends after telling

    assert not hb._thread.is_alive()
    assert len(lost.messages) == 1
    assert ADDRESS in lost.messages[0]
    assert lost.messages[0].startswith("lost the ddp-launch master at")


def test_a_pause_of_the_worker_itself_is_not_a_lost_master(heartbeats, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-Z stops the worker (and the master) for a minute; the monotonic clock goes on.
    # On waking, the silence was the worker's own: it asks the master before judging.
    jumped = [0.0]
    real = time.monotonic
    monkeypatch.setattr(client_module, "time", types.SimpleNamespace(monotonic=lambda: real() + jumped[0]))
    client = FakeClient()
    hb, lost = heartbeats(client, master_lost_timeout_s=1.0)
    assert client.wait_calls(3)
    answered = len(client.answered)

    jumped[0] = 60.0
    assert client.wait_calls(client.calls + 5, also=lost.event.is_set)
    hb.stop()

    assert not lost.messages
    assert len(client.answered) > answered  # the answered try after the pause


def test_deadline_exceeded_also_counts_as_unreachable(heartbeats) -> None:
    client = FakeClient(lambda n: FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED))
    _, lost = heartbeats(client, master_lost_timeout_s=0.05)

    assert lost.event.wait(DEADLINE_S)


def test_a_master_that_answers_no_is_not_lost(heartbeats) -> None:
    # E.g. the generation is over: the master answers (NOT_FOUND), so it is there.
    client = FakeClient(lambda n: FakeRpcError(grpc.StatusCode.NOT_FOUND))
    hb, lost = heartbeats(client, master_lost_timeout_s=0.05)

    # 30 attempts at 10 ms apart last well past the 50 ms lost timeout.
    assert client.wait_calls(30, also=lost.event.is_set)
    hb.stop()

    assert not lost.messages


def test_stop_before_start_and_twice_is_fine() -> None:
    hb = HeartbeatThread(
        FakeClient(), ASSIGNMENT, Progress, interval_s=0.01, master_lost_timeout_s=1.0, on_master_lost=Lost()
    )
    hb.stop()
    hb.stop()


def test_send_now_reports_whether_it_got_through() -> None:
    ok = HeartbeatThread(
        FakeClient(), ASSIGNMENT, Progress, interval_s=1.0, master_lost_timeout_s=1.0, on_master_lost=Lost()
    )
    failing = HeartbeatThread(
        FakeClient(lambda n: FakeRpcError(grpc.StatusCode.UNAVAILABLE)),
        ASSIGNMENT,
        Progress,
        interval_s=1.0,
        master_lost_timeout_s=1.0,
        on_master_lost=Lost(),
    )

    assert ok.send_now() is True
    assert failing.send_now() is False


def test_a_local_error_is_not_a_lost_master(heartbeats, capsys: pytest.CaptureFixture[str]) -> None:
    # protobuf refuses to build the request for report(total_steps=2**63): the master is never
    # asked, so it cannot be "lost". Every 4th heartbeat can be built, to count attempts by.
    reads = 0

    def progress() -> Progress:
        nonlocal reads
        reads += 1
        return Progress(optimizer_steps=reads, total_steps=0 if reads % 4 == 0 else 2**63)

    client = FakeClient()
    hb, lost = heartbeats(client, progress, master_lost_timeout_s=0.05)

    # 8 sent of 32 attempts at 10 ms apart last well past the 50 ms lost timeout.
    client.wait_calls(8, also=lost.event.is_set)
    hb.stop()

    assert not lost.messages
    assert capsys.readouterr().err.count("heartbeat failed (not retried loudly)") == 1


def test_report_keeps_metrics_within_what_the_master_accepts():
    from ddp_launch.progress import MAX_METRIC_NAME, MAX_METRICS, _Tracker

    t = _Tracker()
    t.report(None, None, None, None, {f"m{i}": float(i) for i in range(MAX_METRICS + 10)})
    t.report(None, None, None, None, {"m0": 5.0, "x" * 100: 1.0})
    metrics = t.snapshot().metrics
    assert len(metrics) == MAX_METRICS and metrics["m0"] == 5.0
    assert all(len(name) <= MAX_METRIC_NAME for name in metrics)

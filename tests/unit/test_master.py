"""The servicer called as a plain object (a fake context, no sockets), then one real server."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import grpc
import pytest

from ddp_launch.control.client import MasterClient
from ddp_launch.control.master import MasterServer, OrchestratorServicer
from ddp_launch.control.wire import TOKEN_METADATA_KEY
from ddp_launch.errors import ConfigError, RegistrationRejected
from ddp_launch.progress import Progress
from ddp_launch.proto import orchestrator_pb2 as pb
from ddp_launch.proto import orchestrator_pb2_grpc as pb_grpc
from ddp_launch.registry import Registry
from tests.fakes import FakeClock
from tests.unit.servicer_fakes import Aborted, FakeContext, counting_progress, run_async

DDP_PORT = 29555


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(500.0)


def make_registry(clock: FakeClock, *, nnodes: int = 1, local_world_size: int = 2) -> Registry:
    return Registry(
        run_id="run-7",
        nnodes=nnodes,
        local_world_size=local_world_size,
        max_restarts=2,
        ddp_addr="10.0.0.1",
        ddp_port=DDP_PORT,
        clock=clock,
    )


@pytest.fixture
def servicer(clock):
    s = OrchestratorServicer(make_registry(clock))
    yield s
    s.close()


def register_req(rank: int, *, lws: int = 2, pid: int | None = None, generation: int = 0) -> pb.RegisterRequest:
    return pb.RegisterRequest(
        node_rank=rank // lws,
        local_rank=rank % lws,
        pid=pid if pid is not None else 100 + rank,
        hostname=f"host-{rank}",
        generation=generation,
    )


def register_all(s: OrchestratorServicer) -> None:
    for rank in range(s.registry.world_size):
        s.Register(register_req(rank, lws=s.registry.local_world_size), FakeContext())


def rejected(call, request) -> Aborted:
    with pytest.raises(Aborted) as e:
        call(request, FakeContext())
    return e.value


# -- Register -----------------------------------------------------------------------------


def test_register_reply_carries_the_assignment(clock):
    s = OrchestratorServicer(make_registry(clock, nnodes=2, local_world_size=2))
    reply = s.Register(register_req(3), FakeContext())
    assert reply == pb.RegisterReply(
        rank=3,
        world_size=4,
        local_world_size=2,
        nnodes=2,
        generation=0,
        ddp_addr="10.0.0.1",
        ddp_port=DDP_PORT,
        run_id="run-7",
        max_restarts=2,
        node_rank=1,
        local_rank=1,
    )
    assert s.rejections == Counter()


def test_over_registration_is_already_exists_and_changes_nothing(servicer):
    register_all(servicer)
    before = servicer.registry.snapshot()
    e = rejected(servicer.Register, register_req(0, pid=999))
    assert e.code is grpc.StatusCode.ALREADY_EXISTS
    assert "already registered" in e.details
    assert servicer.registry.snapshot() == before
    assert servicer.rejections == Counter({"duplicate": 1})


def test_a_second_pid_for_a_taken_slot_is_already_exists(servicer):
    servicer.Register(register_req(1), FakeContext())
    before = servicer.registry.snapshot()
    e = rejected(servicer.Register, register_req(1, pid=555))
    assert e.code is grpc.StatusCode.ALREADY_EXISTS
    assert servicer.registry.snapshot() == before
    assert servicer.registry.snapshot().ranks[1].pid == 101
    # The same pid again (a retried RPC) is not a rejection.
    assert servicer.Register(register_req(1), FakeContext()).rank == 1
    assert servicer.rejections == Counter({"duplicate": 1})


@pytest.mark.parametrize(
    "request_",
    [
        pb.RegisterRequest(node_rank=0, local_rank=2, pid=10, generation=0),
        pb.RegisterRequest(node_rank=0, local_rank=-1, pid=10, generation=0),
        pb.RegisterRequest(node_rank=1, local_rank=0, pid=10, generation=0),
        pb.RegisterRequest(node_rank=-3, local_rank=0, pid=10, generation=0),
        pb.RegisterRequest(node_rank=0, local_rank=0, pid=0, generation=0),
    ],
    ids=["local-too-big", "local-negative", "node-too-big", "node-negative", "no-pid"],
)
def test_out_of_range_is_invalid_argument(servicer, request_):
    before = servicer.registry.snapshot()
    e = rejected(servicer.Register, request_)
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT
    assert servicer.registry.snapshot() == before
    assert servicer.rejections == Counter({"invalid": 1})


def test_a_stale_generation_is_failed_precondition(servicer):
    servicer.registry.begin_generation(1)
    before = servicer.registry.snapshot()
    e = rejected(servicer.Register, register_req(0, generation=0))
    assert e.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "generation 0" in e.details
    assert servicer.registry.snapshot() == before
    assert servicer.rejections == Counter({"stale": 1})


# -- SendHeartbeat ------------------------------------------------------------------------


def test_heartbeat_of_an_unknown_rank_is_not_found(servicer):
    servicer.Register(register_req(0), FakeContext())
    before = servicer.registry.snapshot()
    e = rejected(run_async(servicer.SendHeartbeat), pb.Heartbeat(rank=1, generation=0, pid=101, step=3))
    assert e.code is grpc.StatusCode.NOT_FOUND
    assert servicer.registry.snapshot() == before
    assert servicer.rejections == Counter({"unknown": 1})


def test_heartbeat_rejections_are_counted_and_change_nothing(servicer):
    register_all(servicer)
    before = servicer.registry.snapshot()
    cases = [
        (pb.Heartbeat(rank=0, generation=0, pid=101, step=3), grpc.StatusCode.ALREADY_EXISTS),  # wrong pid
        (pb.Heartbeat(rank=0, generation=0, pid=100, step=-1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Heartbeat(rank=7, generation=0, pid=100, step=1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Heartbeat(rank=0, generation=4, pid=100, step=1), grpc.StatusCode.FAILED_PRECONDITION),
    ]
    for request, code in cases:
        assert rejected(run_async(servicer.SendHeartbeat), request).code is code
    assert servicer.registry.snapshot() == before
    assert servicer.rejections == Counter({"duplicate": 1, "invalid": 2, "stale": 1})


def test_heartbeat_reply_says_superseded_for_an_old_generation(servicer):
    register_all(servicer)
    ok = run_async(servicer.SendHeartbeat)(pb.Heartbeat(rank=0, generation=0, pid=100, step=1), FakeContext())
    assert ok.superseded is False
    servicer.registry.begin_generation(1)
    old = run_async(servicer.SendHeartbeat)(pb.Heartbeat(rank=0, generation=0, pid=100, step=2), FakeContext())
    assert old.superseded is True
    assert servicer.rejections == Counter()


def test_a_heartbeat_without_has_loss_has_no_loss(servicer):
    register_all(servicer)
    run_async(servicer.SendHeartbeat)(pb.Heartbeat(rank=0, generation=0, pid=100, step=1, loss=0.0), FakeContext())
    assert servicer.registry.snapshot().ranks[0].loss is None
    run_async(servicer.SendHeartbeat)(pb.Heartbeat(rank=0, generation=0, pid=100, step=2, has_loss=True), FakeContext())
    assert servicer.registry.snapshot().ranks[0].loss == 0.0


# -- CanStartTraining ---------------------------------------------------------------------


def test_can_start_training_opens_once_all_registered(servicer):
    servicer.Register(register_req(0), FakeContext())
    closed = servicer.CanStartTraining(pb.BarrierRequest(rank=0, generation=0, wait_s=0), FakeContext())
    assert (closed.open, closed.superseded) == (False, False)
    servicer.Register(register_req(1), FakeContext())
    for rank in (0, 1):
        r = servicer.CanStartTraining(pb.BarrierRequest(rank=rank, generation=0, wait_s=0), FakeContext())
        assert (r.open, r.superseded) == (True, False)


def test_can_start_training_of_an_old_generation_is_superseded(servicer):
    register_all(servicer)
    servicer.registry.begin_generation(1)
    r = servicer.CanStartTraining(pb.BarrierRequest(rank=0, generation=0, wait_s=0), FakeContext())
    assert (r.open, r.superseded) == (False, True)


def test_can_start_training_of_an_unregistered_rank_is_not_found(servicer):
    servicer.Register(register_req(0), FakeContext())
    e = rejected(servicer.CanStartTraining, pb.BarrierRequest(rank=1, generation=0, wait_s=0))
    assert e.code is grpc.StatusCode.NOT_FOUND
    assert servicer.rejections == Counter({"unknown": 1})


# -- GetStatus and ReportFailure ----------------------------------------------------------


def test_get_status_has_one_rank_status_per_rank_with_the_heartbeat_values(clock):
    s = OrchestratorServicer(make_registry(clock, local_world_size=3))
    s.Register(register_req(0, lws=3), FakeContext())
    s.Register(register_req(1, lws=3), FakeContext())
    s.Register(register_req(2, lws=3), FakeContext())
    run_async(s.SendHeartbeat)(pb.Heartbeat(rank=1, generation=0, pid=101, step=0), FakeContext())
    clock.now += 2
    hb = pb.Heartbeat(
        rank=1,
        generation=0,
        pid=101,
        step=40,
        samples=1280,
        has_loss=True,
        loss=0.125,
        total_steps=500,
        metrics={"lr": 0.01},
    )
    run_async(s.SendHeartbeat)(hb, FakeContext())
    clock.now += 0.5
    status = s.GetStatus(pb.StatusRequest(), FakeContext())
    assert (status.run_id, status.world_size, status.generation, status.max_restarts) == ("run-7", 3, 0, 2)
    assert status.total_steps == 500
    assert [r.rank for r in status.ranks] == [0, 1, 2]
    r1 = status.ranks[1]
    assert (r1.node_rank, r1.local_rank, r1.pid, r1.hostname) == (0, 1, 101, "host-1")
    assert (r1.state, r1.generation, r1.step, r1.samples) == ("training", 0, 40, 1280)
    assert (r1.has_loss, r1.loss) == (True, 0.125)
    assert dict(r1.metrics) == {"lr": 0.01}
    assert r1.steps_per_s == pytest.approx(20.0)
    assert r1.heartbeat_age_s == pytest.approx(0.5)
    r0 = status.ranks[0]
    assert (r0.step, r0.has_loss, r0.steps_per_s) == (0, False, 0.0)
    assert r0.heartbeat_age_s == pytest.approx(2.5)  # since the barrier opened


def test_get_status_before_registration_marks_missing_heartbeats(servicer):
    status = servicer.GetStatus(pb.StatusRequest(), FakeContext())
    assert [(r.rank, r.state, r.pid, r.heartbeat_age_s) for r in status.ranks] == [
        (0, "starting", 0, -1.0),
        (1, "starting", 0, -1.0),
    ]


def test_report_failure_is_acknowledged_and_stored(servicer):
    register_all(servicer)
    report = pb.FailureReport(rank=1, generation=0, pid=101, exception_type="RuntimeError", traceback="tb...")
    assert servicer.ReportFailure(report, FakeContext()) == pb.Ack()
    r1 = servicer.registry.snapshot().ranks[1]
    assert (r1.exception_type, r1.traceback) == ("RuntimeError", "tb...")
    stranger = pb.FailureReport(rank=1, generation=0, pid=7, exception_type="X", traceback="y")
    assert rejected(servicer.ReportFailure, stranger).code is grpc.StatusCode.ALREADY_EXISTS


# -- one real server ----------------------------------------------------------------------


@pytest.fixture
def server(clock):
    srv = MasterServer(make_registry(clock), token="secret", host="127.0.0.1", port=0)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.mark.timeout(30)
def test_a_real_server_serves_a_client_refuses_a_wrong_token_and_owns_its_port(server):
    assert server.port > 0
    address = f"127.0.0.1:{server.port}"
    assert server.address == address
    registry = server.registry

    # A client with the wrong token, or none, is turned away before any handler runs.
    channel = grpc.insecure_channel(address)
    try:
        stub = pb_grpc.OrchestratorStub(channel)
        intruder = register_req(1, pid=31337)
        for metadata in (((TOKEN_METADATA_KEY, "wrong"),), ((TOKEN_METADATA_KEY, "secre"),), ()):
            with pytest.raises(grpc.RpcError) as e:
                stub.Register(intruder, metadata=metadata, timeout=5)
            assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.GetStatus(pb.StatusRequest(), metadata=(("authorization", "secret"),), timeout=5)
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()
    assert registry.unregistered_ranks() == [0, 1]
    assert all(r.pid != 31337 for r in registry.snapshot().ranks)
    assert server.interceptor.denied == 4
    assert server.servicer.rejections == Counter()

    bad = MasterClient(address, token="wrong")
    try:
        with pytest.raises(RegistrationRejected):
            bad.register(node_rank=0, local_rank=1, generation=0, deadline_s=5, pid=31337)
    finally:
        bad.close()
    assert registry.unregistered_ranks() == [0, 1]

    client = MasterClient(address, token="secret")
    try:
        a = client.register(node_rank=0, local_rank=0, generation=0, deadline_s=10)
        assert (a.rank, a.world_size, a.ddp_addr, a.ddp_port, a.run_id) == (
            0,
            2,
            "10.0.0.1",
            DDP_PORT,
            "run-7",
        )
        assert registry.snapshot().ranks[0].pid == os.getpid()
        client.register(node_rank=0, local_rank=1, generation=0, deadline_s=10, pid=os.getpid() + 1)
        client.wait_barrier(rank=0, generation=0, deadline_s=10)  # returns: the world is complete
        progress = Progress(reported_step=12, samples=384, loss=0.5, total_steps=100, metrics={"acc": 0.75})
        assert client.heartbeat(a, progress) is False
        r0 = registry.snapshot().ranks[0]
        assert (r0.step, r0.samples, r0.loss, dict(r0.metrics)) == (12, 384, 0.5, {"acc": 0.75})
        status = client.get_status()
        assert [(r.rank, r.step) for r in status.ranks] == [(0, 12), (1, 0)]
        assert status.total_steps == 100
    finally:
        client.close()

    # The port is taken: a second master must say so, not share it silently.
    other = MasterServer(make_registry(FakeClock(500.0)), token="secret", host="127.0.0.1", port=server.port)
    try:
        with pytest.raises(ConfigError, match=f"127.0.0.1:{server.port}"):
            other.start()
    finally:
        other.stop()


class CallContext(FakeContext):
    """Runs what a handler registered with add_callback when the call ends."""

    def __init__(self) -> None:
        self.callbacks: list = []

    def add_callback(self, callback) -> bool:
        self.callbacks.append(callback)
        return True

    def end(self) -> None:
        for callback in self.callbacks:
            callback()


def test_report_exit_records_a_remote_ranks_end_and_rejects_unknown_ranks(servicer):
    register_all(servicer)
    servicer.ReportExit(pb.ExitReport(rank=1, generation=0, exit_code=-9), FakeContext())
    assert [(r.rank, r.pid, r.exit_code) for r in servicer.registry.failed_ranks()] == [(1, 101, -9)]
    err = rejected(servicer.ReportExit, pb.ExitReport(rank=1, generation=5, exit_code=0))  # not begun
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "generation 5 has not begun" in err.details
    assert [(r.rank, r.pid, r.exit_code) for r in servicer.registry.failed_ranks()] == [(1, 101, -9)]
    servicer.registry.begin_generation(1)
    servicer.ReportExit(pb.ExitReport(rank=1, generation=0, exit_code=-15), FakeContext())  # old: ignored
    assert servicer.registry.failed_ranks() == []
    err = rejected(servicer.ReportExit, pb.ExitReport(rank=7, generation=0, exit_code=0))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT


def test_registering_a_rank_that_ended_before_registering_says_so(servicer):
    servicer.ReportExit(pb.ExitReport(rank=1, generation=0, exit_code=1), FakeContext())  # died on import
    err = rejected(servicer.Register, register_req(1))
    assert err.code == grpc.StatusCode.ALREADY_EXISTS
    assert err.details == "rank 1 already ended in generation 0 (exit code 1) before it registered"


def _watch(
    servicer: OrchestratorServicer, steps, *, node_rank: int = 1, agent_id: str = "h1:1", nproc: int = 2
) -> list:
    """Drive WatchRun (an async generator on the server's loop) through `steps`: each is
    called before the next message is read; returns the messages and what was left."""

    async def go() -> list:
        request = pb.WatchRequest(node_rank=node_rank, agent_id=agent_id, hostname="h1", nproc_per_node=nproc)
        stream = servicer.WatchRun(request, CallContext())
        seen = []
        for step in steps:
            step(stream)
            try:
                seen.append(await asyncio.wait_for(stream.__anext__(), timeout=5))
            except StopAsyncIteration:
                seen.append(None)
        await stream.aclose()
        return seen

    return asyncio.run(go())


def test_watch_run_streams_restarts_and_ends_with_the_run(clock):
    servicer = OrchestratorServicer(make_registry(clock, nnodes=2))

    def nothing(stream):
        pass

    def restart(stream):
        servicer.registry.begin_generation(1)

    def end(stream):
        servicer.registry.end_run("failed", "rank 3 failed (exit code 1)", 1)

    try:
        first, second, last, after = _watch(servicer, [nothing, restart, end, nothing])
    finally:
        servicer.close()
    assert (first.generation, first.state, first.node_rank, first.nnodes, first.run_id) == (0, "running", 1, 2, "run-7")
    assert (second.generation, second.state) == (1, "running")
    assert (last.state, last.exit_code, last.message) == ("failed", 1, "rank 3 failed (exit code 1)")
    assert after is None  # the stream ends with the run
    assert servicer.registry.lost_nodes() == []  # a stream that ended with the run lost nobody


def test_a_watch_that_ends_while_the_run_goes_on_is_a_lost_node(clock):
    # The client cancels (its launcher stopped, or keepalive found its host silent): the
    # stream's coroutine is closed, and the master records node 1 as lost.
    servicer = OrchestratorServicer(make_registry(clock, nnodes=2))
    try:
        (first,) = _watch(servicer, [lambda stream: None])
    finally:
        servicer.close()
    assert first.state == "running"
    assert [(n.node_rank, n.hostname) for n in servicer.registry.lost_nodes()] == [(1, "h1")]
    servicer.registry.begin_generation(1)  # a new generation forgets it
    assert servicer.registry.lost_nodes() == []


def test_a_node_without_a_rank_gets_the_lowest_free_one_and_another_nproc_is_refused(clock):
    servicer = OrchestratorServicer(make_registry(clock, nnodes=3))
    try:
        (first,) = _watch(servicer, [lambda stream: None], node_rank=-1, agent_id="a")
        # the stream ended: rank 1 is free again for the next node that joins
        (again,) = _watch(servicer, [lambda stream: None], node_rank=-1, agent_id="b")
        with pytest.raises(Aborted) as refused:
            _watch(servicer, [lambda stream: None], node_rank=-1, agent_id="c", nproc=4)
    finally:
        servicer.close()
    assert (first.node_rank, first.nnodes, again.node_rank) == (1, 3, 1)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "--nproc-per-node 4; the run has 2 per node" in refused.value.details


def test_in_an_elastic_run_a_node_waits_until_a_generation_names_it(clock):
    registry = Registry(
        run_id="run-7",
        nnodes=3,
        min_nodes=2,
        local_world_size=2,
        max_restarts=2,
        ddp_addr="10.0.0.1",
        ddp_port=DDP_PORT,
        clock=clock,
    )
    servicer = OrchestratorServicer(registry)

    def admit(stream):
        registry.begin_generation(0, ["node-0", "h1:1"])

    try:
        waiting, admitted = _watch(servicer, [lambda stream: None, admit], node_rank=-1)
    finally:
        servicer.close()
    assert (waiting.generation, waiting.node_rank) == (-1, -1)
    assert (admitted.generation, admitted.node_rank, admitted.nnodes) == (0, 1, 2)


def _beats(*requests: pb.Heartbeat):
    yield from requests


METADATA = ((TOKEN_METADATA_KEY, "secret"),)


@pytest.fixture
def stub(server):
    """A stub on the real server, with ranks 0 and 1 registered (pids 100 and 101)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = pb_grpc.OrchestratorStub(channel)
        for rank in range(2):
            stub.Register(register_req(rank), metadata=METADATA, timeout=5)
        yield stub
    finally:
        channel.close()


@pytest.mark.timeout(30)
def test_the_heartbeat_stream_records_every_heartbeat_and_ends_on_a_refusal(server, stub):
    registry = server.registry
    beats = [pb.Heartbeat(rank=0, pid=100, step=s) for s in range(1, 6)]
    beats.append(pb.Heartbeat(rank=1, pid=101, step=9))
    reply = stub.StreamHeartbeats(_beats(*beats), metadata=METADATA, timeout=10)
    assert reply.superseded is False
    assert [(r.rank, r.step) for r in registry.snapshot().ranks] == [(0, 5), (1, 9)]

    # A heartbeat from a pid that does not hold the slot ends the stream with the error;
    # what came after it is not recorded.
    bad = [pb.Heartbeat(rank=0, pid=100, step=6), pb.Heartbeat(rank=1, pid=999, step=10)]
    bad.append(pb.Heartbeat(rank=0, pid=100, step=50))
    with pytest.raises(grpc.RpcError) as e:
        stub.StreamHeartbeats(_beats(*bad), metadata=METADATA, timeout=10)
    assert e.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert [(r.rank, r.step) for r in registry.snapshot().ranks] == [(0, 6), (1, 9)]
    assert server.servicer.rejections == Counter({"duplicate": 1})

    # A stream of a superseded generation says so when it ends.
    registry.begin_generation(1)
    reply = stub.StreamHeartbeats(_beats(pb.Heartbeat(rank=0, pid=100)), metadata=METADATA, timeout=10)
    assert reply.superseded is True

    # No token, no stream.
    before = registry.snapshot()
    with pytest.raises(grpc.RpcError) as e:
        stub.StreamHeartbeats(_beats(pb.Heartbeat(rank=0, pid=100, step=99)), timeout=10)
    assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert registry.snapshot() == before


@pytest.mark.timeout(30)
def test_a_node_heartbeat_stream_records_each_rank_and_skips_only_the_refused(server, stub):
    registry = server.registry
    batches = [
        pb.HeartbeatBatch(heartbeats=[pb.Heartbeat(rank=0, pid=100, step=1), pb.Heartbeat(rank=1, pid=101, step=2)]),
        # A stranger's heartbeat for rank 1, then rank 0's: the stranger is refused and
        # counted, rank 0's still recorded, the stream goes on.
        pb.HeartbeatBatch(heartbeats=[pb.Heartbeat(rank=1, pid=999, step=50), pb.Heartbeat(rank=0, pid=100, step=7)]),
        pb.HeartbeatBatch(heartbeats=[pb.Heartbeat(rank=1, pid=101, step=8, has_loss=True, loss=0.5)]),
    ]
    assert stub.StreamNodeHeartbeats(_beats(*batches), metadata=METADATA, timeout=10) == pb.Ack()
    ranks = registry.snapshot().ranks
    assert [(r.rank, r.step) for r in ranks] == [(0, 7), (1, 8)]
    assert ranks[1].loss == 0.5
    assert server.servicer.rejections == Counter({"duplicate": 1})

    # No token, no stream.
    before = registry.snapshot()
    with pytest.raises(grpc.RpcError) as e:
        stub.StreamNodeHeartbeats(_beats(batches[0]), timeout=10)
    assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert registry.snapshot() == before


@pytest.mark.timeout(30)
def test_a_worker_heartbeat_thread_streams_to_a_real_master(server):
    from ddp_launch.control.heartbeat import HeartbeatThread

    registry = server.registry
    client = MasterClient(f"127.0.0.1:{server.port}", token="secret")
    lost: list[str] = []
    try:
        a = client.register(node_rank=0, local_rank=0, generation=0, deadline_s=10)
        hb = HeartbeatThread(
            client, a, counting_progress(), interval_s=0.01, master_lost_timeout_s=5.0, on_master_lost=lost.append
        )
        hb.start()
        deadline = time.monotonic() + 10
        while registry.snapshot().ranks[0].step < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        hb.stop()
        assert not hb._thread.is_alive()
        assert registry.snapshot().ranks[0].step >= 20
        assert lost == []
    finally:
        client.close()


@pytest.mark.timeout(30)
def test_an_oversized_request_is_refused_by_the_server(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")  # no client-side limit
    try:
        stub = pb_grpc.OrchestratorStub(channel)
        big = pb.FailureReport(rank=0, generation=0, pid=1, traceback="x" * (300 * 1024))
        with pytest.raises(grpc.RpcError) as e:
            stub.ReportFailure(big, timeout=10, metadata=((TOKEN_METADATA_KEY, "secret"),))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        channel.close()


def test_a_worker_started_by_hand_gets_the_lowest_free_rank(clock):
    servicer = OrchestratorServicer(make_registry(clock, nnodes=2))
    ranks = []
    for pid in (101, 102, 103, 104):
        request = pb.RegisterRequest(node_rank=0, local_rank=0, pid=pid, hostname="h", generation=0, any_slot=True)
        reply = servicer.Register(request, FakeContext())
        ranks.append((reply.rank, reply.node_rank, reply.local_rank))
    assert ranks == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    again = servicer.Register(
        pb.RegisterRequest(pid=102, hostname="h", generation=0, any_slot=True), FakeContext()
    )  # a retried RPC: the same rank again
    assert again.rank == 1
    err = rejected(servicer.Register, pb.RegisterRequest(pid=105, hostname="h", generation=0, any_slot=True))
    assert err.code == grpc.StatusCode.ALREADY_EXISTS and "taken" in err.details

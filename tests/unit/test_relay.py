"""A node's heartbeat relay, against a real master on loopback (no workers, no torch)."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from ddp_launch.control.client import MasterClient
from ddp_launch.control.heartbeat import HeartbeatThread
from ddp_launch.control.master import MasterServer
from ddp_launch.control.relay import HeartbeatRelay
from ddp_launch.control.wire import TOKEN_METADATA_KEY
from ddp_launch.proto import orchestrator_pb2 as pb
from ddp_launch.proto import orchestrator_pb2_grpc as pb_grpc
from ddp_launch.registry import Registry
from tests.e2e.launch import free_port
from tests.unit.servicer_fakes import counting_progress

TOKEN = "secret"
METADATA = ((TOKEN_METADATA_KEY, TOKEN),)


def two_node_registry() -> Registry:
    return Registry(run_id="r", nnodes=2, local_world_size=2, max_restarts=0, ddp_addr="127.0.0.1")


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def register_node_1(master: MasterServer) -> None:
    client = MasterClient(master.address, TOKEN)
    try:
        for local_rank in range(2):
            client.register(node_rank=1, local_rank=local_rank, generation=0, deadline_s=10, pid=200 + local_rank)
    finally:
        client.close()


def send_stream(address: str, beats: list[pb.Heartbeat], metadata=METADATA) -> pb.HeartbeatReply:
    channel = grpc.insecure_channel(address)
    try:
        return pb_grpc.OrchestratorStub(channel).StreamHeartbeats(iter(beats), metadata=metadata, timeout=10)
    finally:
        channel.close()


def steps(registry: Registry) -> dict[int, int]:
    return {r.rank: r.step for r in registry.snapshot().ranks}


@pytest.fixture
def master():
    server = MasterServer(two_node_registry(), TOKEN, "127.0.0.1", 0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_relay(master_address: str, interval_s: float = 0.1, said: list[str] | None = None) -> HeartbeatRelay:
    return HeartbeatRelay(
        node_rank=1,
        master_address=master_address,
        token=TOKEN,
        interval_s=interval_s,
        say=(said if said is not None else []).append,
    )


def test_a_batch_holds_the_latest_heartbeat_per_rank_and_ages_its_step_by_the_wait():
    relay = make_relay("127.0.0.1:1")  # never started: the batch is built by hand
    relay._hold(pb.Heartbeat(rank=2, step=1))
    relay._hold(pb.Heartbeat(rank=3, step=9, step_age_s=1.0))
    relay._hold(pb.Heartbeat(rank=2, step=2))
    time.sleep(0.05)
    batch = relay.take_batch()
    assert batch.node_rank == 1
    assert [(h.rank, h.step) for h in batch.heartbeats] == [(2, 2), (3, 9)]
    assert batch.heartbeats[1].step_age_s >= 1.05  # held 50 ms on top of the worker's 1 s
    assert batch.heartbeats[0].step_age_s >= 0.05
    assert relay.take_batch().heartbeats == []  # what was sent is not sent again


@pytest.mark.timeout(30)
def test_a_relay_forwards_its_workers_stream_heartbeats_to_the_master(master):
    register_node_1(master)
    relay = make_relay(master.address)
    relay.start()
    try:
        beats = [pb.Heartbeat(rank=2, pid=200, step=s) for s in range(1, 6)]
        beats.append(pb.Heartbeat(rank=3, pid=201, step=9, has_loss=True, loss=0.25))
        assert send_stream(relay.address, beats) == pb.HeartbeatReply()
        assert wait_for(lambda: steps(master.registry) == {0: 0, 1: 0, 2: 5, 3: 9})
        assert master.registry.snapshot().ranks[3].loss == 0.25
        assert 2 <= relay.forwarded <= 6 and relay.dropped == 0

        # A heartbeat the master refuses (a pid that does not hold the slot) is counted
        # there and dropped; the next one of the same rank still gets through.
        send_stream(relay.address, [pb.Heartbeat(rank=2, pid=999, step=50)])
        assert wait_for(lambda: master.servicer.rejections["duplicate"] == 1)
        send_stream(relay.address, [pb.Heartbeat(rank=2, pid=200, step=6)])
        assert wait_for(lambda: steps(master.registry)[2] == 6)
    finally:
        relay.stop()


@pytest.mark.timeout(30)
def test_a_relay_wants_the_token_and_serves_only_heartbeat_streams(master):
    relay = make_relay(master.address)
    relay.start()
    try:
        with pytest.raises(grpc.RpcError) as e:
            send_stream(relay.address, [pb.Heartbeat(rank=2, pid=200, step=1)], metadata=((TOKEN_METADATA_KEY, "x"),))
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
        client = MasterClient(relay.address, TOKEN)
        try:
            with pytest.raises(grpc.RpcError) as e:
                client.get_status(timeout_s=5)
            assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED
        finally:
            client.close()
        assert relay.address.startswith("127.0.0.1:")  # loopback only
    finally:
        relay.stop()


@pytest.mark.timeout(60)
def test_a_relay_says_once_that_the_master_stayed_away_and_resumes_when_it_comes(tmp_path):
    port = free_port()
    said: list[str] = []
    relay = make_relay(f"127.0.0.1:{port}", said=said)
    relay._say_after_s = 2.0
    relay.start()
    master = MasterServer(two_node_registry(), TOKEN, "127.0.0.1", port)
    try:
        send_stream(relay.address, [pb.Heartbeat(rank=2, pid=200, step=1)])
        assert wait_for(lambda: relay.dropped >= 1)
        assert said == []  # a short outage (e.g. the master stopping at the end of a run) is not news

        def keep_sending() -> bool:
            send_stream(relay.address, [pb.Heartbeat(rank=2, pid=200, step=2)])
            return len(said) == 1

        assert wait_for(keep_sending, timeout_s=20)
        assert f"127.0.0.1:{port}" in said[0] and "UNAVAILABLE" in said[0] and "still trying" in said[0]

        master.start()
        register_node_1(master)
        assert wait_for(
            lambda: (
                send_stream(relay.address, [pb.Heartbeat(rank=2, pid=200, step=7)]) is not None
                and steps(master.registry)[2] == 7
            )
        )
        assert len(said) == 1  # one line per outage, not one per try
    finally:
        relay.stop()
        master.stop()


@pytest.mark.timeout(30)
def test_a_worker_heartbeat_thread_streams_through_the_relay_and_asks_the_master_directly(master):
    relay = make_relay(master.address)
    relay.start()
    client = MasterClient(master.address, TOKEN)
    via_relay = MasterClient(relay.address, TOKEN)
    lost: list[str] = []
    try:
        a = client.register(node_rank=1, local_rank=0, generation=0, deadline_s=10)
        hb = HeartbeatThread(
            client,
            a,
            counting_progress(),
            interval_s=0.01,
            master_lost_timeout_s=5.0,
            on_master_lost=lost.append,
            ack_every_s=60.0,  # one answered heartbeat (the first), then the stream only
            stream_client=via_relay,
        )
        hb.start()
        assert wait_for(lambda: steps(master.registry)[2] >= 30)
        hb.stop()
        assert relay.forwarded >= 1
        assert lost == []
    finally:
        via_relay.close()
        client.close()
        relay.stop()

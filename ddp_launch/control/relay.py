"""A node's heartbeat relay: its workers' stream heartbeats reach node 0's master batched.

On a node other than node 0, the launcher serves a local endpoint (loopback only) that its
workers send their stream heartbeats to. Once per heartbeat interval the relay forwards the
latest heartbeat of each worker that sent one, all in one message on one long-lived stream
to the master (StreamNodeHeartbeats). The master's cost of a heartbeat is nearly all gRPC's
per-message machinery, so it then reads one message per node instead of one per worker.

What does not go through the relay: registration, the start barrier, failure reports, and
each worker's answered heartbeat (one every few seconds, and the last one), which go to the
master directly. A worker's check that its master is alive is therefore unchanged, and a
heartbeat the master refuses still reaches the worker on its answered one.

A batch goes every interval even when no worker sent anything (between generations, while
the node waits to be admitted): it is the node's own heartbeat, by which the master tells in
seconds that a node is gone, where a cut link would leave its connections open for minutes.

A heartbeat waits here for up to one interval: the relay adds the time it held it to the
heartbeat's step age, so a stall is still dated from the worker's own clock. While the
master cannot be reached, what is held is dropped (each heartbeat carries the worker's
whole state, so the next one makes up for it) and the stream is opened again. The relay says
so only when that lasts (`say_after_s`): a master that is gone for good is reported by the
node's launcher itself (it follows the run on a stream of its own), and at the end of a run
the master stops a moment before every node has heard that the run is over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

from ddp_launch.control.server import ServerThread
from ddp_launch.control.wire import TOKEN_METADATA_KEY, channel_options
from ddp_launch.proto import orchestrator_pb2 as pb
from ddp_launch.proto import orchestrator_pb2_grpc as pb_grpc


class _RelayServicer(pb_grpc.OrchestratorServicer):
    """Serves StreamHeartbeats only; every other method answers UNIMPLEMENTED."""

    def __init__(self, hold: Callable[[pb.Heartbeat], None]) -> None:
        self._hold = hold

    async def StreamHeartbeats(self, request_iterator: AsyncIterator[pb.Heartbeat], context: Any) -> pb.HeartbeatReply:
        async for request in request_iterator:
            self._hold(request)
        return pb.HeartbeatReply()


class HeartbeatRelay:
    """Takes this node's workers' stream heartbeats and forwards them to the master.

    Args:
        node_rank: this node's rank (sent with each batch; an elastic run's changes).
        agent_id: this node launcher's identity in the run's membership.
        master_address: host:port of node 0's master.
        token: the run's secret: the workers must send it here, the relay sends it on.
        interval_s: how often a batch goes to the master (the workers' heartbeat interval).
        tls_ca: the CA that signed the master's certificate, when the master serves TLS.
        say: prints one line for the user: that heartbeats could not be relayed for
            `say_after_s` (once per outage).
    """

    def __init__(
        self,
        *,
        node_rank: int,
        master_address: str,
        token: str,
        interval_s: float,
        tls_ca: str | None = None,
        say: Callable[[str], None] = lambda message: None,
        say_after_s: float = 10.0,
        agent_id: str = "",
    ) -> None:
        self.node_rank = node_rank
        self.agent_id = agent_id
        self.master_address = master_address
        self.interval_s = interval_s
        self._metadata = ((TOKEN_METADATA_KEY, token),)
        self._tls_ca = tls_ca
        self._say = say
        self._say_after_s = say_after_s
        self._held: dict[int, tuple[pb.Heartbeat, float]] = {}  # rank -> (latest, when received)
        self.forwarded = 0  # heartbeats sent on to the master
        self.dropped = 0  # heartbeats held while the master could not be reached
        self._server = ServerThread(
            lambda server: pb_grpc.add_OrchestratorServicer_to_server(_RelayServicer(self._hold), server),
            token,
            "127.0.0.1",
            pool_threads=1,
            on_started=self._forward_forever,
            name="ddp-launch-relay",
        )

    @property
    def address(self) -> str:
        """Where this node's workers send their stream heartbeats (after start())."""
        return self._server.address

    def start(self) -> int:
        """Serve on a free loopback port and start forwarding; returns the port.

        Raises:
            ConfigError: no port could be bound.
        """
        return self._server.start()

    def stop(self) -> None:
        self._server.stop(grace_s=0.2)

    # Everything below runs on the server's event loop: no locks needed.

    def _hold(self, heartbeat: pb.Heartbeat) -> None:
        self._held[heartbeat.rank] = (heartbeat, time.monotonic())

    def take_batch(self) -> pb.HeartbeatBatch:
        """What is held, as one message; each heartbeat's step age grows by the time it waited."""
        now = time.monotonic()
        batch = pb.HeartbeatBatch(node_rank=self.node_rank, agent_id=self.agent_id)
        for heartbeat, received in self._held.values():
            heartbeat.step_age_s += now - received
            batch.heartbeats.append(heartbeat)
        self._held.clear()
        return batch

    def _channel(self) -> Any:
        if self._tls_ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(self._tls_ca).read_bytes())
            return grpc.aio.secure_channel(self.master_address, credentials, options=channel_options(keepalive=True))
        return grpc.aio.insecure_channel(self.master_address, options=channel_options(keepalive=True))

    async def _forward_forever(self) -> None:
        loop = asyncio.get_running_loop()
        async with self._channel() as channel:
            stub = pb_grpc.OrchestratorStub(channel)
            outage_since: float | None = None
            said = False
            next_at = loop.time()
            while True:
                call = stub.StreamNodeHeartbeats(metadata=self._metadata)
                batch = pb.HeartbeatBatch()
                try:
                    while True:
                        next_at = max(next_at + self.interval_s, loop.time())
                        await asyncio.sleep(next_at - loop.time())
                        batch = self.take_batch()
                        await call.write(batch)
                        self.forwarded += len(batch.heartbeats)
                        batch = pb.HeartbeatBatch()
                        outage_since, said = None, False
                except asyncio.CancelledError:
                    call.cancel()
                    raise
                except Exception as e:  # the stream broke: drop what was held, open it again
                    self.dropped += len(batch.heartbeats) + len(self._held)
                    self._held.clear()
                    why = (await call.code()).name if call.done() else type(e).__name__
                    call.cancel()
                    outage_since = outage_since if outage_since is not None else loop.time()
                    lasted_s = loop.time() - outage_since
                    if not said and lasted_s >= self._say_after_s:
                        self._say(
                            f"could not relay heartbeats to the master at {self.master_address} "
                            f"for {lasted_s:.0f} s ({why}); still trying"
                        )
                        said = True
                    await asyncio.sleep(self.interval_s)

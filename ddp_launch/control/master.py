"""The gRPC master: the servicer (RPC -> registry) and the server's lifecycle.

The servicer holds no state of its own beyond counters; the registry is the run's state.
Every RPC must carry the run's token (checked by an interceptor before any handler runs);
anything the registry refuses becomes a clear gRPC error and changes nothing.

The server is gRPC's asyncio server, run on an event loop in a thread of its own
(server_thread). Heartbeats are served on that loop (on a stream, one message read per
heartbeat, or per node when a node's launcher relays them); every other RPC is a plain
function run in a thread pool, because some of them wait (the start barrier, WatchRun) and
all of them are rare.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc

from ddp_launch.config import TlsFiles
from ddp_launch.control import wire
from ddp_launch.control.server import ServerThread
from ddp_launch.proto import orchestrator_pb2 as pb
from ddp_launch.proto import orchestrator_pb2_grpc as pb_grpc
from ddp_launch.registry import RUNNING, Registry, Rejected, RunState

MAX_BARRIER_WAIT_S = 10.0
WATCH_WAKE_S = 1.0  # how often a WatchRun stream checks that its client is still there

_CODES = {
    Rejected.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Rejected.STALE: grpc.StatusCode.FAILED_PRECONDITION,
    Rejected.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    Rejected.UNKNOWN: grpc.StatusCode.NOT_FOUND,
}


class OrchestratorServicer(pb_grpc.OrchestratorServicer):
    """Turns RPCs into registry calls. Called directly (no sockets) in unit tests."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.rejections: Counter[str] = Counter()
        self._lock = threading.Lock()
        # One thread per following node, each waiting on the registry a second at a time.
        self._watch_pool = futures.ThreadPoolExecutor(
            max_workers=max(2, registry.nnodes + 1), thread_name_prefix="ddp-launch-watch"
        )

    def close(self) -> None:
        """End the WatchRun waits' threads (each returns within WATCH_WAKE_S)."""
        self._watch_pool.shutdown(wait=True, cancel_futures=True)

    def _count(self, e: Rejected) -> None:
        with self._lock:
            self.rejections[e.reason] += 1

    @contextlib.contextmanager
    def _rejections_as_errors(self, context: Any) -> Iterator[None]:
        """A request the registry refuses becomes a gRPC error with a matching code."""
        try:
            yield
        except Rejected as e:
            self._count(e)
            context.abort(_CODES[e.reason], str(e))
            raise  # unreachable with a real context: abort() raises

    def Register(self, request: pb.RegisterRequest, context: Any) -> pb.RegisterReply:
        with self._rejections_as_errors(context):
            a = self.registry.register(
                node_rank=request.node_rank,
                local_rank=request.local_rank,
                pid=request.pid,
                hostname=request.hostname,
                generation=request.generation,
                any_slot=request.any_slot,
            )
        return wire.assignment_to_proto(a)

    def CanStartTraining(self, request: pb.BarrierRequest, context: Any) -> pb.BarrierReply:
        with self._rejections_as_errors(context):
            r = self.registry.wait_barrier(
                rank=request.rank,
                generation=request.generation,
                timeout_s=min(max(request.wait_s, 0.0), MAX_BARRIER_WAIT_S),
            )
        return pb.BarrierReply(open=r.open, superseded=r.superseded)

    # The heartbeat RPCs run on the server's event loop, not in its thread pool: the registry
    # call is short and never waits, and a hop to a thread would cost more than it.

    async def SendHeartbeat(self, request: pb.Heartbeat, context: Any) -> pb.HeartbeatReply:
        return pb.HeartbeatReply(superseded=await self._heartbeat_or_abort(request, context))

    async def StreamHeartbeats(self, request_iterator: AsyncIterator[pb.Heartbeat], context: Any) -> pb.HeartbeatReply:
        superseded = False
        async for request in request_iterator:
            superseded = await self._heartbeat_or_abort(request, context)
        return pb.HeartbeatReply(superseded=superseded)

    async def StreamNodeHeartbeats(self, request_iterator: AsyncIterator[pb.HeartbeatBatch], context: Any) -> pb.Ack:
        async for batch in request_iterator:
            if batch.agent_id:
                self.registry.node_seen(batch.agent_id)
            for request in batch.heartbeats:
                try:
                    self._record_heartbeat(request)
                except Rejected as e:  # one rank's stale heartbeat must not stop the others'
                    self._count(e)
        return pb.Ack()

    async def _heartbeat_or_abort(self, request: pb.Heartbeat, context: Any) -> bool:
        try:
            return self._record_heartbeat(request)
        except Rejected as e:
            self._count(e)
            await context.abort(_CODES[e.reason], str(e))
            raise  # unreachable with a real context: abort() raises

    def _record_heartbeat(self, request: pb.Heartbeat) -> bool:
        return self.registry.heartbeat(
            rank=request.rank,
            generation=request.generation,
            pid=request.pid,
            progress=wire.progress_from_proto(request),
        )

    def ReportFailure(self, request: pb.FailureReport, context: Any) -> pb.Ack:
        with self._rejections_as_errors(context):
            self.registry.report_failure(
                rank=request.rank,
                generation=request.generation,
                pid=request.pid,
                exception_type=request.exception_type,
                traceback=request.traceback,
            )
        return pb.Ack()

    def GetStatus(self, request: pb.StatusRequest, context: Any) -> pb.RunStatus:
        return wire.snapshot_to_proto(self.registry.snapshot())

    def ReportExit(self, request: pb.ExitReport, context: Any) -> pb.Ack:
        with self._rejections_as_errors(context):
            self.registry.record_exit(request.rank, request.generation, request.exit_code, request.exited_at or None)
        return pb.Ack()

    async def WatchRun(self, request: pb.WatchRequest, context: Any) -> AsyncIterator[pb.RunState]:
        # The stream is the node's membership: it joins when it opens and leaves when it ends.
        # On the event loop, not in the thread pool: a stream the client cancels (its launcher
        # stopped, its connection closed, or the keepalive pings of wire.server_options found
        # it silent) cancels this coroutine, which is the one way to notice it. The waits on
        # the registry run in a thread each, a second at a time.
        agent_id = request.agent_id or f"node-rank-{request.node_rank}"
        try:
            serial = self.registry.join(agent_id, request.hostname, request.nproc_per_node, request.node_rank)
        except Rejected as e:
            self._count(e)
            await context.abort(_CODES[e.reason], str(e))
            raise  # unreachable with a real context: abort() raises
        loop = asyncio.get_running_loop()
        seen: RunState | None = None
        try:
            while True:
                state = await loop.run_in_executor(self._watch_pool, self.registry.wait_run_change, seen, WATCH_WAKE_S)
                if state != seen:
                    yield wire.run_state_to_proto(state, agent_id, self.registry.run_id)
                    seen = state
                if state.state != RUNNING:
                    return
                if self.registry.evicted(agent_id, serial):
                    # Its link came back before its launcher noticed the loss: make it join
                    # again, as a node of a later generation.
                    await context.abort(
                        grpc.StatusCode.ABORTED, "this node was dropped from the run for its silence; join again"
                    )
        finally:
            # While the run goes on, a node of its generation whose launcher has gone is lost:
            # its workers cannot be supervised any more, and node 0's supervisor acts on it.
            self.registry.leave(agent_id, serial)


class MasterServer(ServerThread):
    """The gRPC server of one run, on an event loop in a thread of this process.

    Args:
        registry: the run's state.
        token: the secret every RPC must carry.
        host: the address to bind (127.0.0.1 for a single node).
        port: the port, or 0 for a free one (the chosen port is `self.port` after start()).
        max_workers: threads for the plain RPCs; barrier waits hold one each, so at least the
            world size.
        tls: certificate and key to serve TLS with (plain TCP when none).
    """

    def __init__(
        self,
        registry: Registry,
        token: str,
        host: str,
        port: int = 0,
        max_workers: int = 16,
        tls: TlsFiles | None = None,
    ) -> None:
        self.registry = registry
        self.servicer = OrchestratorServicer(registry)
        super().__init__(
            lambda server: pb_grpc.add_OrchestratorServicer_to_server(self.servicer, server),
            token,
            host,
            port,
            pool_threads=max(max_workers, registry.world_size + 8),
            tls=tls,
            name="ddp-launch-master",
        )

    def stop(self, grace_s: float = 0.5) -> None:
        super().stop(grace_s)
        self.servicer.close()

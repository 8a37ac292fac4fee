"""The gRPC master: the servicer (RPC -> registry) and the server's lifecycle.

The servicer holds no state of its own beyond counters; the registry is the run's state.
Every RPC must carry the run's token (checked by an interceptor before any handler runs);
anything the registry refuses becomes a clear gRPC error and changes nothing.

The server is gRPC's asyncio server, run on an event loop in a thread of its own. Heartbeats
are served on that loop (on a stream, one message read per heartbeat, no thread per worker);
every other RPC is a plain function run in a thread pool, because some of them wait (the
start barrier, WatchRun) and all of them are rare.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc

from ddp_launch.client import MAX_REPLY_BYTES, MAX_REQUEST_BYTES, TOKEN_METADATA_KEY
from ddp_launch.config import TlsFiles, check_can_listen
from ddp_launch.errors import ConfigError
from ddp_launch.proto import orchestrator_pb2 as pb
from ddp_launch.proto import orchestrator_pb2_grpc as pb_grpc
from ddp_launch.registry import RUNNING, Registry, Rejected, RunSnapshot

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
        return pb.RegisterReply(
            rank=a.rank,
            world_size=a.world_size,
            local_world_size=a.local_world_size,
            nnodes=a.nnodes,
            generation=a.generation,
            ddp_addr=a.ddp_addr,
            ddp_port=a.ddp_port,
            run_id=a.run_id,
            max_restarts=a.max_restarts,
            node_rank=a.node_rank,
            local_rank=a.local_rank,
        )

    def CanStartTraining(self, request: pb.BarrierRequest, context: Any) -> pb.BarrierReply:
        with self._rejections_as_errors(context):
            r = self.registry.wait_barrier(
                rank=request.rank,
                generation=request.generation,
                timeout_s=min(max(request.wait_s, 0.0), MAX_BARRIER_WAIT_S),
            )
        return pb.BarrierReply(open=r.open, superseded=r.superseded)

    # The two heartbeat RPCs run on the server's event loop, not in its thread pool: the
    # registry call is short and never waits, and a hop to a thread would cost more than it.

    async def SendHeartbeat(self, request: pb.Heartbeat, context: Any) -> pb.HeartbeatReply:
        return pb.HeartbeatReply(superseded=await self._heartbeat_or_abort(request, context))

    async def StreamHeartbeats(self, request_iterator: AsyncIterator[pb.Heartbeat], context: Any) -> pb.HeartbeatReply:
        superseded = False
        async for request in request_iterator:
            superseded = await self._heartbeat_or_abort(request, context)
        return pb.HeartbeatReply(superseded=superseded)

    async def _heartbeat_or_abort(self, request: pb.Heartbeat, context: Any) -> bool:
        try:
            return self.registry.heartbeat(
                rank=request.rank,
                generation=request.generation,
                pid=request.pid,
                step=request.step,
                samples=request.samples,
                loss=request.loss if request.has_loss else None,
                metrics=request.metrics,
                total_steps=request.total_steps,
                step_age_s=request.step_age_s,
            )
        except Rejected as e:
            self._count(e)
            await context.abort(_CODES[e.reason], str(e))
            raise  # unreachable with a real context: abort() raises

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
        return snapshot_to_proto(self.registry.snapshot())

    def ReportExit(self, request: pb.ExitReport, context: Any) -> pb.Ack:
        with self._rejections_as_errors(context):
            self.registry.record_exit(request.rank, request.generation, request.exit_code)
        return pb.Ack()

    def WatchRun(self, request: pb.WatchRequest, context: Any) -> Iterator[pb.RunState]:
        ended = threading.Event()
        context.add_callback(ended.set)  # the client went away, or the server stops
        seen = None
        while not ended.is_set():
            state = self.registry.wait_run_change(seen, timeout_s=WATCH_WAKE_S)
            if state != seen:
                yield pb.RunState(
                    generation=state.generation, state=state.state, message=state.message, exit_code=state.exit_code
                )
                seen = state
            if state.state != RUNNING:
                return


def snapshot_to_proto(snap: RunSnapshot) -> pb.RunStatus:
    return pb.RunStatus(
        run_id=snap.run_id,
        world_size=snap.world_size,
        generation=snap.generation,
        restarts=snap.generation,
        max_restarts=snap.max_restarts,
        elapsed_s=snap.elapsed_s,
        total_steps=snap.total_steps,
        ranks=[
            pb.RankStatus(
                rank=r.rank,
                node_rank=r.node_rank,
                local_rank=r.local_rank,
                pid=r.pid,
                hostname=r.hostname,
                state=r.state.value,
                generation=r.generation,
                step=r.step,
                samples=r.samples,
                steps_per_s=r.steps_per_s,
                has_loss=r.loss is not None,
                loss=r.loss or 0.0,
                rss_bytes=r.rss_bytes,
                cpu_percent=r.cpu_percent,
                heartbeat_age_s=r.heartbeat_age_s if r.heartbeat_age_s is not None else -1.0,
                metrics=r.metrics,
                straggler=r.straggler,
            )
            for r in snap.ranks
        ],
    )


class _TokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects any call without the run's token before a handler sees it."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

        async def deny(request: Any, context: Any) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong run token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self.denied = 0

    async def intercept_service(self, continuation, handler_call_details):
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY and hmac.compare_digest(str(value).encode(), self._token):
                return await continuation(handler_call_details)
        self.denied += 1
        return self._deny


class MasterServer:
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
        self.interceptor = _TokenInterceptor(token)
        self.host = host
        self.port = port
        self.tls = tls or TlsFiles()
        self._pool = futures.ThreadPoolExecutor(
            max_workers=max(max_workers, registry.world_size + 8), thread_name_prefix="ddp-launch-rpc"
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> int:
        """Bind and serve; returns the port.

        Raises:
            ConfigError: the address cannot be bound (e.g. the port is in use).
        """
        if self.port:
            check_can_listen(self.host, self.port)  # a clear error instead of gRPC's C-core log
        started: futures.Future[int] = futures.Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(started,), name="ddp-launch-master", daemon=True)
        self._thread.start()
        try:
            self.port = started.result()
        except ConfigError:
            self._thread.join()
            raise
        return self.port

    def _serve(self, started: futures.Future[int]) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            bound = loop.run_until_complete(self._bind_and_start())
        except BaseException as e:  # hand the failure to start(), never leave it waiting
            started.set_exception(e)
            loop.close()
            return
        started.set_result(bound)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _bind_and_start(self) -> int:
        self._server = grpc.aio.server(
            migration_thread_pool=self._pool,
            interceptors=[self.interceptor],
            options=[
                ("grpc.max_send_message_length", MAX_REPLY_BYTES),
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                # Without this a second server could silently share a port already in use.
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_OrchestratorServicer_to_server(self.servicer, self._server)
        try:
            if self.tls.cert is not None and self.tls.key is not None:
                credentials = grpc.ssl_server_credentials(
                    [(self.tls.key.read_bytes(), self.tls.cert.read_bytes())],
                    # Clients prove themselves with the run's token; TLS keeps it (and the
                    # traffic) private and lets them check they talk to the real master.
                    require_client_auth=False,
                )
                bound = self._server.add_secure_port(self.address, credentials)
            else:
                bound = self._server.add_insecure_port(self.address)
        except RuntimeError:
            bound = 0
        if not bound:
            raise ConfigError(f"cannot listen on {self.address}: address in use or unavailable")
        await self._server.start()
        return bound

    def stop(self, grace_s: float = 0.5) -> None:
        """Stop serving (calls in flight get `grace_s` to finish) and end the loop's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        stopping = asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), loop)
        with contextlib.suppress(Exception):
            stopping.result(grace_s + 1.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(grace_s + 1.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

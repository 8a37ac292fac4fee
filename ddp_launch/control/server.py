"""A gRPC asyncio server on an event loop in a thread of this process.

The master and a node's heartbeat relay are both served this way: the launcher's main
thread stays free for supervision, heartbeats are read on the loop (one message read per
heartbeat, no thread per worker), and plain RPCs that may wait run in a thread pool.
Every call must carry the run's token, checked before any handler runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
from collections.abc import Callable, Coroutine
from concurrent import futures
from typing import Any

import grpc

from ddp_launch.config import PortInUse, TlsFiles, check_can_listen
from ddp_launch.control.wire import TOKEN_METADATA_KEY, server_options
from ddp_launch.errors import ConfigError


class TokenInterceptor(grpc.aio.ServerInterceptor):
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


class ServerThread:
    """Serves what `add_servicers(server)` adds, on a loop thread of its own.

    Args:
        add_servicers: called with the grpc.aio server before it binds.
        token: the secret every RPC must carry.
        host: the address to bind.
        port: the port, or 0 for a free one (the chosen port is `self.port` after start()).
        pool_threads: threads for the handlers that are plain functions (those that wait).
        tls: certificate and key to serve TLS with (plain TCP when none).
        on_started: a coroutine to run as a task on the loop once serving (e.g. a forwarder).
    """

    def __init__(
        self,
        add_servicers: Callable[[Any], None],
        token: str,
        host: str,
        port: int = 0,
        pool_threads: int = 16,
        tls: TlsFiles | None = None,
        on_started: Callable[[], Coroutine[Any, Any, None]] | None = None,
        name: str = "ddp-launch-server",
    ) -> None:
        self._add_servicers = add_servicers
        self.interceptor = TokenInterceptor(token)
        self.host = host
        self.port = port
        self.tls = tls or TlsFiles()
        self._on_started = on_started
        self._name = name
        self._pool = futures.ThreadPoolExecutor(max_workers=pool_threads, thread_name_prefix=f"{name}-rpc")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._task: asyncio.Task | None = None

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
        self._thread = threading.Thread(target=self._serve, args=(started,), name=self._name, daemon=True)
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
        if self._on_started is not None:
            self._task = loop.create_task(self._on_started())
        started.set_result(bound)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _bind_and_start(self) -> int:
        self._server = grpc.aio.server(
            migration_thread_pool=self._pool,
            interceptors=[self.interceptor],
            # Without so_reuseport 0 a second server could silently share a port already in use.
            options=[*server_options(), ("grpc.so_reuseport", 0)],
        )
        self._add_servicers(self._server)
        try:
            if self.tls.cert is not None and self.tls.key is not None:
                credentials = grpc.ssl_server_credentials(
                    [(self.tls.key.read_bytes(), self.tls.cert.read_bytes())],
                    # Clients prove themselves with the run's token; TLS keeps it (and the
                    # traffic) private and lets them check they talk to the real server.
                    require_client_auth=False,
                )
                bound = self._server.add_secure_port(self.address, credentials)
            else:
                bound = self._server.add_insecure_port(self.address)
        except RuntimeError:
            bound = 0
        if not bound:
            raise PortInUse(f"cannot listen on {self.address}: address in use or unavailable")
        await self._server.start()
        return bound

    def stop(self, grace_s: float = 0.5) -> None:
        """Stop serving (calls in flight get `grace_s` to finish) and end the loop's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        stopping = asyncio.run_coroutine_threadsafe(self._stop(grace_s), loop)
        with contextlib.suppress(Exception):
            stopping.result(grace_s + 1.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(grace_s + 1.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _stop(self, grace_s: float) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self._server.stop(grace_s)

"""A connection to the master: `MasterClient`, used by workers, node launchers and the
status command. Every unary RPC has a deadline; registration retries while the master is
unreachable. The protocol's constants and message conversions live in wire.py, the
worker's heartbeat thread in heartbeat.py.

Created only after the worker is forked (a gRPC channel made before a fork breaks the
child).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from ddp_launch.control import wire
from ddp_launch.env import Assignment
from ddp_launch.errors import MasterUnavailable, RegistrationRejected
from ddp_launch.progress import Progress
from ddp_launch.proto import orchestrator_pb2 as pb
from ddp_launch.proto import orchestrator_pb2_grpc as pb_grpc

RPC_TIMEOUT_S = 5.0

# Codes that mean "try again later" rather than "you are wrong".
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class MasterClient:
    """A connection to the master, authenticated with the run's token; over TLS when
    `tls_ca` (a PEM file of the CA that signed the master's certificate) is given."""

    def __init__(self, address: str, token: str, *, tls_ca: str | None = None, keepalive: bool = False) -> None:
        self.address = address
        self._metadata = ((wire.TOKEN_METADATA_KEY, token),)
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self._channel = grpc.secure_channel(address, credentials, options=wire.channel_options(keepalive=keepalive))
        else:
            self._channel = grpc.insecure_channel(address, options=wire.channel_options(keepalive=keepalive))
        self._stub = pb_grpc.OrchestratorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def connect(self, timeout_s: float) -> bool:
        """Open the connection now (a channel connects at its first call otherwise);
        whether it is up within `timeout_s`."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
            return True
        except grpc.FutureTimeoutError:
            return False

    def _call(self, method: Callable, request: object, timeout_s: float = RPC_TIMEOUT_S):
        return method(request, timeout=timeout_s, metadata=self._metadata)

    def register(
        self,
        *,
        node_rank: int,
        local_rank: int,
        generation: int,
        deadline_s: float,
        pid: int | None = None,
        any_slot: bool = False,
    ) -> Assignment:
        """Register, retrying while the master is unreachable, until `deadline_s` from now.

        Raises:
            RegistrationRejected: the master answered no.
            MasterUnavailable: it did not answer in time.
        """
        request = pb.RegisterRequest(
            node_rank=node_rank,
            local_rank=local_rank,
            pid=pid or os.getpid(),
            hostname=os.uname().nodename,
            generation=generation,
            any_slot=any_slot,
        )
        r = self._retry_transient(lambda: self._call(self._stub.Register, request), deadline_s, "register")
        return wire.assignment_from_proto(r)

    def wait_barrier(self, *, rank: int, generation: int, deadline_s: float) -> None:
        """Return when every rank has registered.

        Raises:
            RegistrationRejected: the generation is over (a restart began) or unknown.
            MasterUnavailable: the barrier did not open within `deadline_s`.
        """
        end = time.monotonic() + deadline_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise MasterUnavailable(f"the start barrier did not open within {deadline_s:.0f} s")
            wait_s = min(5.0, left)
            request = pb.BarrierRequest(rank=rank, generation=generation, wait_s=wait_s)
            reply = self._retry_transient(
                lambda r=request, w=wait_s: self._call(self._stub.CanStartTraining, r, timeout_s=w + RPC_TIMEOUT_S),
                left,
                "wait at the start barrier",
            )
            if reply.superseded:
                raise RegistrationRejected(f"generation {generation} was superseded by a restart")
            if reply.open:
                return

    def heartbeat(self, a: Assignment, progress: Progress) -> bool:
        """Send one heartbeat and wait for the answer; True when this generation is over."""
        request = wire.heartbeat_to_proto(rank=a.rank, generation=a.generation, pid=os.getpid(), progress=progress)
        return self._call(self._stub.SendHeartbeat, request).superseded

    def stream_heartbeats(self, requests: Iterator[pb.Heartbeat]) -> Any:
        """Send `requests` on one stream (gRPC reads them from a thread of its own).

        Returns the call as a future (done(), exception(), add_done_callback(), cancel()); it
        ends when `requests` does, or with the error of a refused heartbeat.
        """
        return self._stub.StreamHeartbeats.future(requests, metadata=self._metadata)

    def report_failure(self, a: Assignment, exception_type: str, traceback: str) -> None:
        request = pb.FailureReport(
            rank=a.rank, generation=a.generation, pid=os.getpid(), exception_type=exception_type, traceback=traceback
        )
        self._call(self._stub.ReportFailure, request)

    def report_exit(self, rank: int, generation: int, exit_code: int, exited_at: float = 0.0) -> None:
        request = pb.ExitReport(rank=rank, generation=generation, exit_code=exit_code, exited_at=exited_at)
        self._call(self._stub.ReportExit, request)

    def watch_run(self, *, node_rank: int, agent_id: str, nproc_per_node: int):
        """Join the run and follow it: the master's RunState messages as they come (a
        restart, the end); iterate it. The node is a member while the stream is open."""
        request = pb.WatchRequest(
            node_rank=node_rank, agent_id=agent_id, hostname=os.uname().nodename, nproc_per_node=nproc_per_node
        )
        return self._stub.WatchRun(request, metadata=self._metadata)

    def get_status(self, timeout_s: float = RPC_TIMEOUT_S) -> pb.RunStatus:
        return self._call(self._stub.GetStatus, pb.StatusRequest(), timeout_s)

    def wait_for_status(self, deadline_s: float) -> pb.RunStatus:
        """The run's status once the master answers, retrying while it cannot be reached.

        Raises:
            grpc.RpcError: it refused (a wrong token), or did not answer within `deadline_s`.
        """
        end = time.monotonic() + deadline_s
        delay_s = 0.05
        while True:
            try:
                return self.get_status()
            except grpc.RpcError as e:
                if e.code() not in TRANSIENT or time.monotonic() + delay_s > end:
                    raise
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 1.0)

    def _retry_transient(self, call: Callable, deadline_s: float, what: str):
        end = time.monotonic() + deadline_s
        delay_s = 0.05
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                code = e.code()
                if code not in TRANSIENT:
                    raise RegistrationRejected(f"master at {self.address} refused to {what}: {e.details()}") from None
                if time.monotonic() + delay_s > end:
                    raise MasterUnavailable(
                        f"could not {what}: master at {self.address} unreachable for {deadline_s:.0f} s"
                    ) from None
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 1.0)

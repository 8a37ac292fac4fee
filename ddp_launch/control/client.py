"""The worker's side of the control protocol: a gRPC client and the heartbeat thread.

The protocol's constants and message conversions live in wire.py.

Created only after the worker is forked (a gRPC channel made before a fork breaks the
child). Every unary RPC has a deadline. Heartbeats go on one long-lived stream, except one
every `ACK_EVERY_S`, which is sent as an answered RPC. A failed stream warns and is opened
again, it never stops training, but a master that has not answered for longer than
`master_lost_timeout_s` ends the worker with a clear message instead of leaving it to hang.

No thread of ours ever waits for a reply on the stream: a thread blocked in a gRPC stream
read wakes every 100 ms to take the GIL, and with that running, examples/train_mlp.py -n 4
hung at exit in 4 runs of 8 (torch's gloo teardown deadlock, which the worker otherwise
sidesteps: see worker._yield_gil_after_destroy_process_group). The stream is
client-streaming and only its end is watched, through a done-callback.
"""

from __future__ import annotations

import os
import sys
import threading
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
# How often a worker's heartbeat is an answered RPC instead of a stream message: often enough
# to notice a lost master well within its timeout, rarely enough that the RPCs cost the master
# little next to the stream.
ACK_EVERY_S = 5.0

# Codes that mean "try again later" rather than "you are wrong".
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class MasterClient:
    """A connection to the master, authenticated with the run's token; over TLS when
    `tls_ca` (a PEM file of the CA that signed the master's certificate) is given."""

    def __init__(self, address: str, token: str, *, tls_ca: str | None = None) -> None:
        self.address = address
        self._metadata = ((wire.TOKEN_METADATA_KEY, token),)
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self._channel = grpc.secure_channel(address, credentials, options=wire.channel_options())
        else:
            self._channel = grpc.insecure_channel(address, options=wire.channel_options())
        self._stub = pb_grpc.OrchestratorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

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
        return self._call(self._stub.SendHeartbeat, heartbeat_request(a, progress)).superseded

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

    def report_exit(self, rank: int, generation: int, exit_code: int) -> None:
        self._call(self._stub.ReportExit, pb.ExitReport(rank=rank, generation=generation, exit_code=exit_code))

    def watch_run(self, node_rank: int):
        """The master's RunState messages as they come (a restart, the end); iterate it."""
        return self._stub.WatchRun(pb.WatchRequest(node_rank=node_rank), metadata=self._metadata)

    def get_status(self, timeout_s: float = RPC_TIMEOUT_S) -> pb.RunStatus:
        return self._call(self._stub.GetStatus, pb.StatusRequest(), timeout_s)

    def _retry_transient(self, call: Callable, deadline_s: float, what: str):
        end = time.monotonic() + deadline_s
        delay_s = 0.05
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                code = e.code()
                if code not in _TRANSIENT:
                    raise RegistrationRejected(f"master at {self.address} refused to {what}: {e.details()}") from None
                if time.monotonic() + delay_s > end:
                    raise MasterUnavailable(
                        f"could not {what}: master at {self.address} unreachable for {deadline_s:.0f} s"
                    ) from None
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 1.0)


def heartbeat_request(a: Assignment, progress: Progress) -> pb.Heartbeat:
    return wire.heartbeat_to_proto(rank=a.rank, generation=a.generation, pid=os.getpid(), progress=progress)


class HeartbeatThread:
    """Sends the worker's progress every `interval_s`, off the training thread: on a stream,
    and every `ack_every_s` (the first one too) as an answered RPC.

    The stream goes to `stream_client` when given (this node's heartbeat relay), else to the
    master; the answered RPCs always go to the master, so they alone say whether it is there.

    When the master has not answered for `master_lost_timeout_s`, the worker cannot be
    supervised any more: it says so on stderr and ends itself (`on_master_lost`).
    """

    def __init__(
        self,
        client: MasterClient,
        assignment: Assignment,
        read_progress: Callable[[], Progress],
        *,
        interval_s: float,
        master_lost_timeout_s: float,
        on_master_lost: Callable[[str], None],
        ack_every_s: float = ACK_EVERY_S,
        stream_client: MasterClient | None = None,
    ) -> None:
        self._client = client
        self._stream_client = stream_client or client
        self._assignment = assignment
        self._read_progress = read_progress
        self._interval_s = interval_s
        self._lost_timeout_s = master_lost_timeout_s
        self._on_master_lost = on_master_lost
        self._ack_every_s = ack_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ddp-launch-heartbeat", daemon=True)
        self._call_lock = threading.Lock()
        self._call: Any = None
        self._last_ok = time.monotonic()
        self._warned = False  # about the current outage
        self._local_error_reported = False

    def start(self) -> None:
        self._thread.start()

    def send_now(self) -> bool:
        """One answered heartbeat from the calling thread; False when it did not get through."""
        try:
            self._client.heartbeat(self._assignment, self._read_progress())
        except grpc.RpcError as e:
            if e.code() not in _TRANSIENT:
                # The master knows us no more (e.g. a restart began): that is not "lost".
                self._last_ok = time.monotonic()
            return False
        except Exception as e:  # never let progress reporting kill training
            self._local_error(e)
            return False
        self._last_ok = time.monotonic()
        self._warned = False
        return True

    def stop(self) -> None:
        self._stop.set()
        self._cancel_call()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=RPC_TIMEOUT_S + 1)

    def _local_error(self, e: Exception) -> None:
        # The master was not even asked: this says nothing about losing it.
        self._last_ok = time.monotonic()
        if not self._local_error_reported:
            print(f"[ddp-launch] heartbeat failed (not retried loudly): {e!r}", file=sys.stderr, flush=True)
            self._local_error_reported = True

    def _master_silent_for(self) -> float:
        """Seconds since the master last answered; past the lost timeout, only after one
        more answered try has failed: the silence may have been this process's own (the run
        paused with Ctrl-Z, a suspended machine), during which nothing was asked."""
        if time.monotonic() - self._last_ok > self._lost_timeout_s:
            self.send_now()
        return time.monotonic() - self._last_ok

    def _cancel_call(self) -> None:
        with self._call_lock:
            if self._call is not None:
                self._call.cancel()

    def _beats(self) -> Iterator[pb.Heartbeat]:
        """The stream's requests, read by gRPC's own thread: one per interval until stopped;
        every `ack_every_s` (the first time too) the heartbeat is sent as an answered RPC."""
        next_ack_at = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._master_silent_for() > self._lost_timeout_s:
                self._cancel_call()  # no answer for too long: the loop says so
                return
            if now >= next_ack_at:
                next_ack_at = now + self._ack_every_s
                self.send_now()
            else:
                try:
                    request = heartbeat_request(self._assignment, self._read_progress())
                except Exception as e:  # never let progress reporting kill training
                    self._local_error(e)
                else:
                    yield request
            self._stop.wait(self._interval_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            ended = threading.Event()
            with self._call_lock:
                self._call = self._stream_client.stream_heartbeats(self._beats())
                call = self._call
            call.add_done_callback(lambda _, ended=ended: ended.set())
            ended.wait()  # stop() cancels the call, which ends it too
            if self._stop.is_set():
                return
            error = call.exception() if not call.cancelled() else None
            if isinstance(error, grpc.RpcError) and error.code() not in _TRANSIENT:
                # The master answered no (e.g. a restart began): it is there, not "lost".
                self._last_ok = time.monotonic()
            silent_s = self._master_silent_for()
            if silent_s > self._lost_timeout_s:
                self._on_master_lost(
                    f"lost the ddp-launch master at {self._client.address} "
                    f"(no answer for {silent_s:.0f} s); stopping this worker"
                )
                return
            if not self._warned:
                print(
                    f"[ddp-launch] heartbeat to {self._stream_client.address} failed; retrying",
                    file=sys.stderr,
                    flush=True,
                )
                self._warned = True
            self._stop.wait(self._interval_s)

"""The worker's heartbeat thread: its progress to the master, off the training thread.

Heartbeats go on one long-lived stream, except one every `ACK_EVERY_S`, which is sent as an
answered RPC. A failed stream warns and is opened again, it never stops training, but a
master that has not answered for longer than `master_lost_timeout_s` ends the worker with a
clear message instead of leaving it to hang.

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
from typing import Any

import grpc

from ddp_launch.control import wire
from ddp_launch.control.client import RPC_TIMEOUT_S, TRANSIENT, MasterClient
from ddp_launch.env import Assignment
from ddp_launch.progress import Progress
from ddp_launch.proto import orchestrator_pb2 as pb

# How often a worker's heartbeat is an answered RPC instead of a stream message: often enough
# to notice a lost master well within its timeout, rarely enough that the RPCs cost the master
# little next to the stream.
ACK_EVERY_S = 5.0


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
            if e.code() not in TRANSIENT:
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
            if isinstance(error, grpc.RpcError) and error.code() not in TRANSIENT:
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

"""The control protocol's home: the token key, message limits, channel options, and every
conversion between its protobuf messages and the package's own values.

The messages are defined in protos/orchestrator.proto. Nothing outside this module builds
or reads a field of a message that carries progress, an assignment or a rank's state, so a
field is named and converted once.
"""

from __future__ import annotations

from ddp_launch.env import Assignment
from ddp_launch.progress import Progress
from ddp_launch.proto import orchestrator_pb2 as pb
from ddp_launch.record import RankRecord, RankState
from ddp_launch.registry import RunSnapshot, RunState

TOKEN_METADATA_KEY = "x-ddp-launch-token"
# Requests are small (a heartbeat is ~100 bytes, a traceback at most 64 KiB); replies can be
# larger (the status of a big world). The master refuses anything bigger.
MAX_REQUEST_BYTES = 256 * 1024
MAX_REPLY_BYTES = 16 * 1024 * 1024


# A node's connection to the master (the follower's WatchRun, the relay's stream) pings it
# this often when idle and gives it this long to answer: a master whose host vanished (its
# link cut, no reset ever sent) is noticed in about KEEPALIVE_S + KEEPALIVE_TIMEOUT_S, not
# never. Workers' own connections need none: their answered heartbeats have deadlines.
KEEPALIVE_S = 5.0
KEEPALIVE_TIMEOUT_S = 5.0
MAX_RECONNECT_BACKOFF_S = 2.0


def channel_options(*, keepalive: bool = False) -> list[tuple[str, int]]:
    """A client channel's options: the same message limits as the master's, and with
    `keepalive` the pings of a node's long-lived connection."""
    options = [
        ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
    ]
    if keepalive:
        options += [
            ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # After an outage (a cut link that comes back) the node reconnects within about a
            # second, not after gRPC's backoff has grown towards its two minutes.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", int(MAX_RECONNECT_BACKOFF_S * 1000)),
        ]
    return options


def server_options() -> list[tuple[str, int]]:
    """The master's: the message limits; it accepts the nodes' keepalive pings (gRPC
    otherwise answers pings more frequent than every 5 minutes with GOAWAY)..."""
    return [
        ("grpc.max_send_message_length", MAX_REPLY_BYTES),
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(KEEPALIVE_S * 1000) // 2),
        ("grpc.http2.max_ping_strikes", 0),
        # and pings them: a node whose host vanished closes its WatchRun (it leaves the run) in
        # about KEEPALIVE_S + KEEPALIVE_TIMEOUT_S, where TCP alone would wait many minutes.
        ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
    ]


# -- heartbeats ------------------------------------------------------------------------------


def heartbeat_to_proto(*, rank: int, generation: int, pid: int, progress: Progress) -> pb.Heartbeat:
    reported = progress.reported_step is not None
    return pb.Heartbeat(
        rank=rank,
        generation=generation,
        pid=pid,
        step=progress.step,
        step_reported=reported,
        optimizer_steps=progress.optimizer_steps if reported else 0,
        samples=progress.samples,
        has_loss=progress.loss is not None,
        loss=progress.loss if progress.loss is not None else 0.0,
        metrics=progress.metrics,
        total_steps=progress.total_steps,
        step_age_s=progress.step_age_s,
    )


def progress_from_proto(m: pb.Heartbeat) -> Progress:
    """A heartbeat's progress (values are checked by the registry, not here)."""
    return Progress(
        optimizer_steps=m.optimizer_steps if m.step_reported else m.step,
        reported_step=m.step if m.step_reported else None,
        samples=m.samples,
        loss=m.loss if m.has_loss else None,
        total_steps=m.total_steps,
        metrics=dict(m.metrics),
        step_age_s=m.step_age_s,
    )


# -- registration ----------------------------------------------------------------------------


def assignment_to_proto(a: Assignment) -> pb.RegisterReply:
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


def assignment_from_proto(r: pb.RegisterReply) -> Assignment:
    return Assignment(
        rank=r.rank,
        local_rank=r.local_rank,
        world_size=r.world_size,
        local_world_size=r.local_world_size,
        node_rank=r.node_rank,
        nnodes=r.nnodes,
        ddp_addr=r.ddp_addr,
        ddp_port=r.ddp_port,
        run_id=r.run_id,
        generation=r.generation,
        max_restarts=r.max_restarts,
    )


# -- status ----------------------------------------------------------------------------------


def record_to_proto(r: RankRecord) -> pb.RankStatus:
    reported = r.reported_step is not None
    return pb.RankStatus(
        rank=r.rank,
        node_rank=r.node_rank,
        local_rank=r.local_rank,
        pid=r.pid,
        hostname=r.hostname,
        state=r.state.value,
        generation=r.generation,
        step=r.step,
        step_reported=reported,
        optimizer_steps=r.optimizer_steps,
        samples=r.samples,
        steps_per_s=r.steps_per_s,
        has_loss=r.loss is not None,
        loss=r.loss or 0.0,
        rss_bytes=r.rss_bytes,
        cpu_percent=r.cpu_percent,
        heartbeat_age_s=r.heartbeat_age_s if r.heartbeat_age_s is not None else -1.0,
        metrics=r.metrics,
        straggler=r.straggler,
        has_exit_code=r.exit_code is not None,
        exit_code=r.exit_code or 0,
        exception_type=r.exception_type,
    )


def record_from_proto(m: pb.RankStatus) -> RankRecord:
    try:
        state = RankState(m.state)
    except ValueError:  # a newer master's state: shown as it is named, never a crash
        state = RankState.TRAINING
    return RankRecord(
        rank=m.rank,
        node_rank=m.node_rank,
        local_rank=m.local_rank,
        generation=m.generation,
        state=state,
        pid=m.pid,
        hostname=m.hostname,
        optimizer_steps=m.optimizer_steps,
        reported_step=m.step if m.step_reported else None,
        samples=m.samples,
        steps_per_s=m.steps_per_s,
        loss=m.loss if m.has_loss else None,
        metrics=dict(m.metrics),
        rss_bytes=m.rss_bytes,
        cpu_percent=m.cpu_percent,
        heartbeat_age_s=None if m.heartbeat_age_s < 0 else m.heartbeat_age_s,
        exit_code=m.exit_code if m.has_exit_code else None,
        exception_type=m.exception_type,
        straggler=m.straggler,
    )


def snapshot_to_proto(snap: RunSnapshot) -> pb.RunStatus:
    return pb.RunStatus(
        run_id=snap.run_id,
        world_size=snap.world_size,
        generation=snap.generation,
        restarts=snap.restarts,
        max_restarts=snap.max_restarts,
        elapsed_s=snap.elapsed_s,
        total_steps=snap.total_steps,
        ranks=[record_to_proto(r) for r in snap.ranks],
    )


def run_state_to_proto(state: RunState, agent_id: str, run_id: str) -> pb.RunState:
    """The run as one following node sees it: its own node rank in the generation (-1: it
    waits for a later one)."""
    return pb.RunState(
        generation=state.generation,
        state=state.state,
        message=state.message,
        exit_code=state.exit_code,
        node_rank=state.node_rank_of(agent_id),
        nnodes=len(state.nodes),
        run_id=run_id,
    )

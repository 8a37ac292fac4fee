"""The environment contract: every variable a worker sees, built and read here only.

Workers get exactly the variables torchrun gives its workers (same names, same meanings),
so scripts written for torchrun, PyTorch Lightning and Hugging Face tools run unchanged.
ddp-launch adds a few DDP_LAUNCH_* variables of its own: the bootstrap ones tell a freshly
forked worker how to reach its master; DDP_LAUNCH_BACKEND tells the script which backend
the launcher chose.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from ddp_launch import rundir

# torchrun's variables.
RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
GROUP_RANK = "GROUP_RANK"
GROUP_WORLD_SIZE = "GROUP_WORLD_SIZE"
ROLE_RANK = "ROLE_RANK"
ROLE_WORLD_SIZE = "ROLE_WORLD_SIZE"
ROLE_NAME = "ROLE_NAME"
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
RUN_ID = "TORCHELASTIC_RUN_ID"
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
MAX_RESTARTS = "TORCHELASTIC_MAX_RESTARTS"
# "False": rank 0 hosts the DDP store itself (torchrun says "True" when its agent hosts it,
# and init_process_group would then wait for a store nobody serves).
USE_AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"
ERROR_FILE = "TORCHELASTIC_ERROR_FILE"  # where torch's @record writes a failing rank's error
NCCL_ASYNC_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"  # torchrun sets 1 unless set
OMP_NUM_THREADS = "OMP_NUM_THREADS"
SIGNALS_TO_HANDLE = "TORCHELASTIC_SIGNALS_TO_HANDLE"  # the launcher's --signals-to-handle
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"

DEFAULT_ROLE = "default"
DEFAULT_OMP_THREADS = "1"

# ddp-launch's own variables.
CONTROL_ADDR = "DDP_LAUNCH_MASTER"  # host:port of the gRPC master
TOKEN = "DDP_LAUNCH_TOKEN"  # the run's secret, sent with every RPC
NODE_RANK = "DDP_LAUNCH_NODE_RANK"
GENERATION = "DDP_LAUNCH_GENERATION"
BACKEND = "DDP_LAUNCH_BACKEND"  # what --backend asked for; the worker resolves "auto"
HEARTBEAT_INTERVAL = "DDP_LAUNCH_HEARTBEAT_INTERVAL_S"
MASTER_LOST_TIMEOUT = "DDP_LAUNCH_MASTER_LOST_TIMEOUT_S"
JOIN_TIMEOUT = "DDP_LAUNCH_JOIN_TIMEOUT_S"
RUN_DIR = "DDP_LAUNCH_RUN_DIR"
TLS_CA = "DDP_LAUNCH_TLS_CA"  # the CA that signed the master's certificate, when TLS is on
# host:port of this node's heartbeat relay (nodes other than node 0): stream heartbeats go
# there, everything else to the master.
HEARTBEAT_RELAY = "DDP_LAUNCH_HEARTBEAT_RELAY"
LAUNCHER_PID = "DDP_LAUNCH_LAUNCHER_PID"  # the launcher that asked for this worker (0: none)
VIRTUAL_LOCAL_RANK = "DDP_LAUNCH_VIRTUAL_LOCAL_RANK"  # "1": torchrun's --virtual-local-rank
# Variables the launcher set for the workers' gRPC that the script must not see (comma-separated).
UNSET = "DDP_LAUNCH_UNSET"
GRPC_FORK_SUPPORT = "GRPC_ENABLE_FORK_SUPPORT"
ATTEMPT_DIR = "DDP_LAUNCH_ATTEMPT_DIR"  # this generation's torchrun log directory (--log-dir)


def quiet_grpc_forks(environ: MutableMapping[str, str]) -> list[str]:
    """Turn gRPC's fork support off for the workers, unless the user set it; returns the
    names set here, which each worker removes again before its script runs.

    gRPC reads it when it is imported (in the warm process, or a spawned worker). With it
    on, every fork() a script makes (DataLoader workers, Pools) while a heartbeat is in a
    call prints "skipping fork() handlers" on the rank's stderr; the children never use the
    worker's channel, so the handlers are not needed.
    """
    if GRPC_FORK_SUPPORT in environ:
        return []
    environ[GRPC_FORK_SUPPORT] = "false"
    return [GRPC_FORK_SUPPORT]


def node_env(nproc_per_node: int, environ: Mapping[str, str], role: str, signal_names: str) -> dict[str, str]:
    """What torchrun's agent puts in its own environment for every worker of a node.

    OMP_NUM_THREADS is torchrun's rule: 1 when more than one worker shares the node and the
    user set none; a single worker keeps torch's default (all cores), as under torchrun.
    """
    found = {ROLE_NAME: role, SIGNALS_TO_HANDLE: signal_names}
    if OMP_NUM_THREADS not in environ and nproc_per_node > 1:
        found[OMP_NUM_THREADS] = DEFAULT_OMP_THREADS
    return found


@dataclass(frozen=True)
class Bootstrap:
    """What a freshly forked worker needs before it has a rank: read from its environment."""

    control_addr: str
    token: str
    node_rank: int
    local_rank: int
    generation: int
    backend: str
    heartbeat_interval_s: float
    master_lost_timeout_s: float
    join_timeout_s: float
    run_dir: str = ""
    tls_ca: str = ""
    heartbeat_relay: str = ""
    launcher_pid: int = 0
    virtual_local_rank: bool = False
    unset_env: tuple[str, ...] = ()
    attempt_dir: str = ""  # this generation's directory in torchrun's log tree, if any

    def to_env(self) -> dict[str, str]:
        return {
            TLS_CA: self.tls_ca,
            CONTROL_ADDR: self.control_addr,
            TOKEN: self.token,
            NODE_RANK: str(self.node_rank),
            LOCAL_RANK: str(self.local_rank),
            GENERATION: str(self.generation),
            BACKEND: self.backend,
            HEARTBEAT_INTERVAL: repr(self.heartbeat_interval_s),
            MASTER_LOST_TIMEOUT: repr(self.master_lost_timeout_s),
            JOIN_TIMEOUT: repr(self.join_timeout_s),
            RUN_DIR: self.run_dir,
            HEARTBEAT_RELAY: self.heartbeat_relay,
            LAUNCHER_PID: str(self.launcher_pid),
            VIRTUAL_LOCAL_RANK: "1" if self.virtual_local_rank else "0",
            UNSET: ",".join(self.unset_env),
            ATTEMPT_DIR: self.attempt_dir,
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Bootstrap:
        e = os.environ if environ is None else environ
        return cls(
            control_addr=e[CONTROL_ADDR],
            token=e.get(TOKEN, ""),
            node_rank=int(e.get(NODE_RANK, "0")),
            local_rank=int(e[LOCAL_RANK]),
            generation=int(e.get(GENERATION, "0")),
            backend=e.get(BACKEND, "auto"),
            heartbeat_interval_s=float(e.get(HEARTBEAT_INTERVAL, "1.0")),
            master_lost_timeout_s=float(e.get(MASTER_LOST_TIMEOUT, "30")),
            join_timeout_s=float(e.get(JOIN_TIMEOUT, "300")),
            run_dir=e.get(RUN_DIR, ""),
            tls_ca=e.get(TLS_CA, ""),
            heartbeat_relay=e.get(HEARTBEAT_RELAY, ""),
            launcher_pid=int(e.get(LAUNCHER_PID, "0")),
            virtual_local_rank=e.get(VIRTUAL_LOCAL_RANK, "0") == "1",
            unset_env=tuple(name for name in e.get(UNSET, "").split(",") if name),
            attempt_dir=e.get(ATTEMPT_DIR, ""),
        )


@dataclass(frozen=True)
class Assignment:
    """A registered worker's place in the world, as the master handed it out."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    nnodes: int
    ddp_addr: str
    ddp_port: int
    run_id: str
    generation: int
    max_restarts: int


def error_file(run_dir: str, a: Assignment, attempt_dir: str = "") -> str:
    """TORCHELASTIC_ERROR_FILE: torchrun's attempt_<g>/<local rank>/error.json when the run
    writes torchrun's log tree (--log-dir, -r, -t), else below the run directory."""
    if attempt_dir:
        return os.path.join(attempt_dir, str(a.local_rank), "error.json")
    return rundir.error_file(run_dir, a.generation, a.rank)


def torchrun_env(
    a: Assignment,
    environ: Mapping[str, str],
    run_dir: str = "",
    *,
    virtual_local_rank: bool = False,
    attempt_dir: str = "",
    agent_store: bool = False,
) -> dict[str, str]:
    """The variables torchrun would set for this worker, to be merged into its environment.

    `agent_store`: the DDP store at MASTER_PORT is up before the script starts (rank 0's
    worker hosts it), so every rank's init_process_group connects to it as a client, as
    under torchrun's own agent store (TORCHELASTIC_USE_AGENT_STORE=True).

    Args:
        a: the worker's assignment from the master.
        environ: the worker's environment so far (node_env's variables and the user's
            TORCH_NCCL_ASYNC_ERROR_HANDLING are kept).
        run_dir: the run directory; TORCHELASTIC_ERROR_FILE goes below it when given.
        attempt_dir: this generation's directory in torchrun's log tree, if the run writes
            one: TORCHELASTIC_ERROR_FILE goes there instead, as torchrun puts it.
        virtual_local_rank: torchrun's --virtual-local-rank: LOCAL_RANK is 0 and the worker
            sees only its own GPU.
    """
    # One role holds every worker, so role ranks equal global ranks.
    extra = {ERROR_FILE: error_file(run_dir, a, attempt_dir)} if run_dir or attempt_dir else {}
    if virtual_local_rank:
        extra[CUDA_VISIBLE_DEVICES] = _nth_visible_device(environ.get(CUDA_VISIBLE_DEVICES), a.local_rank)
    return extra | {
        RANK: str(a.rank),
        LOCAL_RANK: "0" if virtual_local_rank else str(a.local_rank),
        WORLD_SIZE: str(a.world_size),
        LOCAL_WORLD_SIZE: str(a.local_world_size),
        GROUP_RANK: str(a.node_rank),
        GROUP_WORLD_SIZE: str(a.nnodes),
        ROLE_RANK: str(a.rank),
        ROLE_WORLD_SIZE: str(a.world_size),
        ROLE_NAME: environ.get(ROLE_NAME) or DEFAULT_ROLE,
        MASTER_ADDR: a.ddp_addr,
        MASTER_PORT: str(a.ddp_port),
        RUN_ID: a.run_id,
        RESTART_COUNT: str(a.generation),
        MAX_RESTARTS: str(a.max_restarts),
        USE_AGENT_STORE: str(agent_store),
        NCCL_ASYNC_ERROR_HANDLING: environ.get(NCCL_ASYNC_ERROR_HANDLING) or "1",
    }


def _nth_visible_device(visible: str | None, local_rank: int) -> str:
    """The device a worker with this local rank owns, in CUDA_VISIBLE_DEVICES' terms."""
    if not visible:
        return str(local_rank)
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    return devices[local_rank] if local_rank < len(devices) else str(local_rank)


def in_worker(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a process started by ddp-launch."""
    e = os.environ if environ is None else environ
    return CONTROL_ADDR in e

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExitReport(_message.Message):
    __slots__ = ("rank", "generation", "exit_code", "exited_at")
    RANK_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    EXITED_AT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    generation: int
    exit_code: int
    exited_at: float
    def __init__(self, rank: _Optional[int] = ..., generation: _Optional[int] = ..., exit_code: _Optional[int] = ..., exited_at: _Optional[float] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("node_rank", "agent_id", "hostname", "nproc_per_node")
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    NPROC_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    node_rank: int
    agent_id: str
    hostname: str
    nproc_per_node: int
    def __init__(self, node_rank: _Optional[int] = ..., agent_id: _Optional[str] = ..., hostname: _Optional[str] = ..., nproc_per_node: _Optional[int] = ...) -> None: ...

class RunState(_message.Message):
    __slots__ = ("generation", "state", "message", "exit_code", "node_rank", "nnodes", "run_id")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    NNODES_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    generation: int
    state: str
    message: str
    exit_code: int
    node_rank: int
    nnodes: int
    run_id: str
    def __init__(self, generation: _Optional[int] = ..., state: _Optional[str] = ..., message: _Optional[str] = ..., exit_code: _Optional[int] = ..., node_rank: _Optional[int] = ..., nnodes: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node_rank", "local_rank", "pid", "hostname", "generation", "any_slot")
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ANY_SLOT_FIELD_NUMBER: _ClassVar[int]
    node_rank: int
    local_rank: int
    pid: int
    hostname: str
    generation: int
    any_slot: bool
    def __init__(self, node_rank: _Optional[int] = ..., local_rank: _Optional[int] = ..., pid: _Optional[int] = ..., hostname: _Optional[str] = ..., generation: _Optional[int] = ..., any_slot: _Optional[bool] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("rank", "world_size", "local_world_size", "nnodes", "generation", "ddp_addr", "ddp_port", "run_id", "max_restarts", "node_rank", "local_rank")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NNODES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DDP_ADDR_FIELD_NUMBER: _ClassVar[int]
    DDP_PORT_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    local_world_size: int
    nnodes: int
    generation: int
    ddp_addr: str
    ddp_port: int
    run_id: str
    max_restarts: int
    node_rank: int
    local_rank: int
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ..., local_world_size: _Optional[int] = ..., nnodes: _Optional[int] = ..., generation: _Optional[int] = ..., ddp_addr: _Optional[str] = ..., ddp_port: _Optional[int] = ..., run_id: _Optional[str] = ..., max_restarts: _Optional[int] = ..., node_rank: _Optional[int] = ..., local_rank: _Optional[int] = ...) -> None: ...

class BarrierRequest(_message.Message):
    __slots__ = ("rank", "generation", "wait_s")
    RANK_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    rank: int
    generation: int
    wait_s: float
    def __init__(self, rank: _Optional[int] = ..., generation: _Optional[int] = ..., wait_s: _Optional[float] = ...) -> None: ...

class BarrierReply(_message.Message):
    __slots__ = ("open", "superseded")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    open: bool
    superseded: bool
    def __init__(self, open: _Optional[bool] = ..., superseded: _Optional[bool] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("rank", "generation", "pid", "step", "samples", "has_loss", "loss", "metrics", "total_steps", "step_age_s", "step_reported", "optimizer_steps")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RANK_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    HAS_LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_AGE_S_FIELD_NUMBER: _ClassVar[int]
    STEP_REPORTED_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEPS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    generation: int
    pid: int
    step: int
    samples: int
    has_loss: bool
    loss: float
    metrics: _containers.ScalarMap[str, float]
    total_steps: int
    step_age_s: float
    step_reported: bool
    optimizer_steps: int
    def __init__(self, rank: _Optional[int] = ..., generation: _Optional[int] = ..., pid: _Optional[int] = ..., step: _Optional[int] = ..., samples: _Optional[int] = ..., has_loss: _Optional[bool] = ..., loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., total_steps: _Optional[int] = ..., step_age_s: _Optional[float] = ..., step_reported: _Optional[bool] = ..., optimizer_steps: _Optional[int] = ...) -> None: ...

class HeartbeatBatch(_message.Message):
    __slots__ = ("node_rank", "heartbeats", "agent_id")
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    node_rank: int
    heartbeats: _containers.RepeatedCompositeFieldContainer[Heartbeat]
    agent_id: str
    def __init__(self, node_rank: _Optional[int] = ..., heartbeats: _Optional[_Iterable[_Union[Heartbeat, _Mapping]]] = ..., agent_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("superseded",)
    SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    superseded: bool
    def __init__(self, superseded: _Optional[bool] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("rank", "generation", "pid", "exception_type", "traceback")
    RANK_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXCEPTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    rank: int
    generation: int
    pid: int
    exception_type: str
    traceback: str
    def __init__(self, rank: _Optional[int] = ..., generation: _Optional[int] = ..., pid: _Optional[int] = ..., exception_type: _Optional[str] = ..., traceback: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RankStatus(_message.Message):
    __slots__ = ("rank", "node_rank", "local_rank", "pid", "hostname", "state", "generation", "step", "samples", "steps_per_s", "has_loss", "loss", "rss_bytes", "cpu_percent", "heartbeat_age_s", "metrics", "straggler", "step_reported", "optimizer_steps", "has_exit_code", "exit_code", "exception_type")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    HAS_LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STRAGGLER_FIELD_NUMBER: _ClassVar[int]
    STEP_REPORTED_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEPS_FIELD_NUMBER: _ClassVar[int]
    HAS_EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    EXCEPTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    node_rank: int
    local_rank: int
    pid: int
    hostname: str
    state: str
    generation: int
    step: int
    samples: int
    steps_per_s: float
    has_loss: bool
    loss: float
    rss_bytes: int
    cpu_percent: float
    heartbeat_age_s: float
    metrics: _containers.ScalarMap[str, float]
    straggler: bool
    step_reported: bool
    optimizer_steps: int
    has_exit_code: bool
    exit_code: int
    exception_type: str
    def __init__(self, rank: _Optional[int] = ..., node_rank: _Optional[int] = ..., local_rank: _Optional[int] = ..., pid: _Optional[int] = ..., hostname: _Optional[str] = ..., state: _Optional[str] = ..., generation: _Optional[int] = ..., step: _Optional[int] = ..., samples: _Optional[int] = ..., steps_per_s: _Optional[float] = ..., has_loss: _Optional[bool] = ..., loss: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., heartbeat_age_s: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., straggler: _Optional[bool] = ..., step_reported: _Optional[bool] = ..., optimizer_steps: _Optional[int] = ..., has_exit_code: _Optional[bool] = ..., exit_code: _Optional[int] = ..., exception_type: _Optional[str] = ...) -> None: ...

class RunStatus(_message.Message):
    __slots__ = ("run_id", "world_size", "generation", "restarts", "max_restarts", "elapsed_s", "total_steps", "ranks")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    MAX_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    world_size: int
    generation: int
    restarts: int
    max_restarts: int
    elapsed_s: float
    total_steps: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankStatus]
    def __init__(self, run_id: _Optional[str] = ..., world_size: _Optional[int] = ..., generation: _Optional[int] = ..., restarts: _Optional[int] = ..., max_restarts: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., total_steps: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ...) -> None: ...

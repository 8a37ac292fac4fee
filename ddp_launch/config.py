"""A run's settings as frozen, validated dataclasses. No I/O beyond checking that paths exist
and that the master's port is free."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ddp_launch.errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl")
# How workers start: forked from the warm process (the default), or each a fresh
# interpreter (torchrun's --start-method spawn: for a script that needs a pristine process).
START_WARM, START_SPAWN = "warm", "spawn"
# torchrun's default --signals-to-handle: each stops the run, forwarded to every worker.
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


@dataclass(frozen=True)
class Target:
    """What each worker runs: a script file or a module (as `python -m`), with its argv tail."""

    name: str
    args: tuple[str, ...] = ()
    is_module: bool = False
    no_python: bool = False  # torchrun's --no-python: `name` is a program, run as it is

    def validate(self) -> None:
        if self.no_python:
            if self.is_module:
                raise ConfigError("--no-python and -m/--module cannot be used together (as in torchrun)")
            if shutil.which(self.name) is None:
                raise ConfigError(f"--no-python: program {self.name!r} is not found or not executable")
            return
        if self.is_module:
            if not self.name:
                raise ConfigError("no module given to -m")
            # Looked up as `python -m` will in the worker: the current directory first.
            saved = list(sys.path)
            sys.path.insert(0, os.getcwd())
            try:
                spec = importlib.util.find_spec(self.name)
            except (ImportError, ValueError) as e:
                raise ConfigError(f"module {self.name!r} cannot be found: {e}") from None
            finally:
                sys.path[:] = saved
            if spec is None:
                raise ConfigError(f"module {self.name!r} cannot be found")
            return
        path = Path(self.name)
        if not path.exists():
            raise ConfigError(f"script {self.name!r} does not exist")
        if path.is_dir():
            raise ConfigError(f"script {self.name!r} is a directory, not a file")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"script {self.name!r} is not readable")

    @property
    def argv(self) -> list[str]:
        """sys.argv as the worker's script sees it (python -m puts the module's path first;
        the worker fills that in once it has found the module)."""
        return [self.name, *self.args]


HEARTBEATS_PER_HANG_TIMEOUT = 3

# torchrun's Std: which of a worker's streams --redirects / --tee take (0 none, 1 stdout,
# 2 stderr, 3 both).
STD_NONE, STD_OUT, STD_ERR, STD_ALL = 0, 1, 2, 3


def parse_std(text: str, option: str) -> dict[int, int] | int:
    """torchrun's --redirects/--tee value: one Std for every local rank ("3"), or per local
    rank ("0:1,1:2", ranks not named get 0). Returns an int or {local_rank: Std}."""
    text = text.strip()
    try:
        if ":" not in text:
            value = int(text)
            if value not in (STD_NONE, STD_OUT, STD_ERR, STD_ALL):
                raise ValueError
            return value
        per_rank: dict[int, int] = {}
        for item in text.split(","):
            rank, _, std = item.partition(":")
            per_rank[int(rank)] = int(std)
            if per_rank[int(rank)] not in (STD_NONE, STD_OUT, STD_ERR, STD_ALL) or int(rank) < 0:
                raise ValueError
        return per_rank
    except ValueError:
        raise ConfigError(
            f"{option} must be 0-3 or LOCAL_RANK:STD pairs like 0:1,1:2 (1 stdout, 2 stderr, 3 both); got {text!r}"
        ) from None


@dataclass(frozen=True)
class LogOptions:
    """torchrun's console and log-file options, with torchrun's meanings.

    - log_dir: torchrun's --log-dir; the per-attempt layout goes under it
      (<log_dir>/<run_id>_<random>/attempt_<restart>/<local_rank>/{stdout,stderr}.log).
    - redirects: these streams go to those files only, not to the console.
    - tee: these streams go to those files and to the console.
    - local_ranks_filter: only these local ranks reach the console (None: all); files are
      not filtered.
    - duplicate_*_filters: lines containing any of these strings are also copied to
      attempt_<restart>/filtered_{stdout,stderr}.log.
    The run directory's rank-<i>.log files are written whatever these say.
    """

    log_dir: Path | None = None
    redirects: str = "0"
    tee: str = "0"
    local_ranks_filter: frozenset[int] | None = None
    duplicate_stdout_filters: tuple[str, ...] = ()
    duplicate_stderr_filters: tuple[str, ...] = ()

    def streams(self, option_value: str, local_rank: int) -> int:
        """The Std that `option_value` (self.redirects or self.tee) gives this local rank."""
        parsed = parse_std(option_value, "--redirects/--tee")
        return parsed if isinstance(parsed, int) else parsed.get(local_rank, STD_NONE)

    def to_files(self, local_rank: int) -> int:
        """The streams of this local rank written to torchrun's per-attempt files."""
        return self.streams(self.redirects, local_rank) | self.streams(self.tee, local_rank)

    def to_console(self, local_rank: int) -> int:
        """The streams of this local rank shown on the console."""
        if self.local_ranks_filter is not None and local_rank not in self.local_ranks_filter:
            return STD_NONE
        return STD_ALL & ~(self.streams(self.redirects, local_rank) & ~self.streams(self.tee, local_rank))

    @property
    def wants_files(self) -> bool:
        return (
            self.log_dir is not None
            or self.redirects.strip() != "0"
            or self.tee.strip() != "0"
            or bool(self.duplicate_stdout_filters or self.duplicate_stderr_filters)
        )

    def validate(self) -> None:
        parse_std(self.redirects, "-r/--redirects")
        parse_std(self.tee, "-t/--tee")
        if self.log_dir is not None and self.log_dir.exists() and not self.log_dir.is_dir():
            raise ConfigError(f"--log-dir {str(self.log_dir)!r} is a file")


@dataclass(frozen=True)
class RestartPolicy:
    """When a failed or hung group is started again."""

    max_restarts: int = 0
    stop_grace_s: float = 5.0
    hang_timeout_s: float = 300.0  # 0 disables hang detection

    def validate(self) -> None:
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.stop_grace_s < 0:
            raise ConfigError(f"--stop-grace must be >= 0, got {self.stop_grace_s}")
        if self.hang_timeout_s < 0:
            raise ConfigError(f"--hang-timeout must be >= 0 (0 disables), got {self.hang_timeout_s}")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS on the control connection (off when none is given).

    Node 0's master serves with cert+key; every client (workers, other nodes, `status`)
    checks the master's certificate against the CA. Clients prove who they are with the
    run's token, which TLS keeps private on the wire.
    """

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def validate(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.cert is not None and self.ca is None:
            raise ConfigError("--tls-cert needs --tls-ca: the workers check the master's certificate with it")
        for name, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path is not None and not path.is_file():
                raise ConfigError(f"{name} {str(path)!r} is not a readable file")


class PortInUse(ConfigError):
    """Nothing can listen on an address this node needs (another process holds it)."""


def check_can_listen(host: str, port: int) -> None:
    """Raise PortInUse when nothing could listen on host:port (e.g. it is in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUse(f"cannot listen on {host}:{port}: {e.strerror}") from None


# RunConfig.node_rank of a node that gets its rank from the master when it joins.
NODE_BY_ARRIVAL = -1


def new_run_id() -> str:
    """Sortable and short: 20261125-142215-3f9a."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass(frozen=True)
class RunConfig:
    """Everything one node's launcher needs, decided before anything starts."""

    target: Target
    nproc_per_node: int
    run_id: str = field(default_factory=new_run_id)
    run_id_given: bool = False  # by --run-id, --rdzv-id or the scheduler, not made up here
    run_dir: Path | None = None  # None: ./runs/<run_id>
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    nnodes: int = 1  # the most nodes (--nnodes N, or MAX of MIN:MAX)
    # The fewest nodes a generation runs with (MIN of --nnodes MIN:MAX); None: nnodes. Below
    # nnodes the run is elastic: node ranks are given at each generation, nodes join and leave.
    min_nodes: int | None = None
    # NODE_BY_ARRIVAL: the master gives this node its rank when it joins (c10d rendezvous).
    node_rank: int = 0
    # Node 0 because the endpoint is on this host and was free (c10d, no is_host): when
    # another launcher here took the endpoint first, this one joins its run instead.
    host_by_guess: bool = False
    # Once min_nodes have joined, how long the master waits for more before a generation
    # starts (torchrun's last_call_timeout; --rdzv-conf last_call_timeout=S).
    last_call_s: float = 3.0
    master_addr: str = "127.0.0.1"
    # The gRPC master's port. torchrun's --master-port P is the DDP store's (ddp_port = P)
    # and the master then listens on P + 1 (see options.py).
    control_port: int | None = None  # None: a free port (single node)
    ddp_port: int | None = None  # MASTER_PORT; None: a free port per generation
    # MASTER_ADDR when it is not master_addr (torchrun's --local-addr on node 0).
    ddp_addr: str | None = None
    role: str = "default"  # ROLE_NAME
    monitor_interval_s: float = 0.25  # how often the supervisor looks between wake-ups
    start_method: str = START_WARM
    signals: tuple[int, ...] = DEFAULT_SIGNALS  # stop the run, forwarded to the workers
    virtual_local_rank: bool = False  # LOCAL_RANK=0, CUDA_VISIBLE_DEVICES=<local rank>
    backend: str = "auto"
    heartbeat_interval_s: float = 1.0
    timeout_s: float | None = None  # bound on the whole run; exit 124 when it passes
    join_timeout_s: float = 300.0
    quiet: bool = False
    straggler_fraction: float = 0.7  # below this fraction of the median step rate ...
    straggler_window_s: float = 30.0  # ... for this long, a rank is flagged a straggler
    metrics_port: int | None = None  # Prometheus metrics on the master (off by default)
    # The run's secret; a single node makes its own, several nodes share one. Never logged.
    token: str = field(default="", repr=False)
    tls: TlsFiles = field(default_factory=TlsFiles)
    logs: LogOptions = field(default_factory=LogOptions)

    def __post_init__(self) -> None:
        if self.run_dir is None:
            object.__setattr__(self, "run_dir", Path("runs") / self.run_id)

    @property
    def world_size(self) -> int:
        """The largest world: an elastic run's generations may have fewer ranks."""
        return self.nnodes * self.nproc_per_node

    @property
    def fewest_nodes(self) -> int:
        return self.nnodes if self.min_nodes is None else self.min_nodes

    @property
    def elastic(self) -> bool:
        return self.fewest_nodes < self.nnodes

    @property
    def resolved_run_dir(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir

    def validate(self) -> None:
        """Raise ConfigError on the first problem; called before anything is started."""
        if self.nproc_per_node < 1:
            raise ConfigError(f"-n/--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 1 <= self.fewest_nodes <= self.nnodes:
            raise ConfigError(f"--nnodes {self.fewest_nodes}:{self.nnodes}: needs 1 <= MIN <= MAX")
        by_arrival = self.node_rank == NODE_BY_ARRIVAL and self.nnodes > 1
        if not (by_arrival or 0 <= self.node_rank < self.nnodes):
            raise ConfigError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.last_call_s < 0:
            raise ConfigError(f"--rdzv-conf last_call_timeout must be >= 0, got {self.last_call_s:g}")
        ports = (
            ("--control-port", self.control_port),
            ("--master-port", self.ddp_port),
            ("--metrics-port", self.metrics_port),
        )
        for name, port in ports:
            if port is not None and not 1 <= port <= 65535:
                raise ConfigError(f"{name} must be in 1..65535, got {port}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.nnodes > 1:
            if self.control_port is None:
                raise ConfigError("--master-port is required with --nnodes > 1 (every node must know it)")
            if self.metrics_port is not None and self.node_rank != 0:
                raise ConfigError("--metrics-port is served by node 0's master only")
        if self.heartbeat_interval_s <= 0:
            raise ConfigError("--heartbeat-interval must be > 0")
        hang_s, interval_s = self.restart.hang_timeout_s, self.heartbeat_interval_s
        # Heartbeats reach the master up to two intervals apart (a node's relay forwards them
        # once an interval): a shorter timeout would call a rank hung between two of them.
        if 0 < hang_s < HEARTBEATS_PER_HANG_TIMEOUT * interval_s:
            raise ConfigError(
                f"--hang-timeout {hang_s:g} is shorter than {HEARTBEATS_PER_HANG_TIMEOUT} heartbeat intervals "
                f"(--heartbeat-interval {interval_s:g}): lower the interval or raise the timeout"
            )
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ConfigError(f"--timeout must be > 0, got {self.timeout_s}")
        if self.join_timeout_s <= 0:
            raise ConfigError(f"--join-timeout must be > 0, got {self.join_timeout_s}")
        if not 0 <= self.straggler_fraction < 1:
            raise ConfigError(f"--straggler-fraction must be in [0, 1) (0 disables), got {self.straggler_fraction}")
        if self.straggler_window_s < 0:
            raise ConfigError(f"--straggler-window must be >= 0, got {self.straggler_window_s}")
        self.restart.validate()
        self.tls.validate()
        self.logs.validate()
        self.target.validate()
        if self.metrics_port is not None:
            try:
                import prometheus_client  # noqa: F401
            except ImportError:
                raise ConfigError("--metrics-port needs prometheus-client: pip install 'ddp-launch[metrics]'") from None
            check_can_listen(self.master_addr, self.metrics_port)
        if self.monitor_interval_s <= 0:
            raise ConfigError(f"--monitor-interval must be > 0, got {self.monitor_interval_s:g}")
        if self.start_method not in (START_WARM, START_SPAWN):
            raise ConfigError(f"start method must be {START_WARM} or {START_SPAWN}, got {self.start_method!r}")
        if self.control_port is not None and self.node_rank == 0:
            check_can_listen(self.master_addr, self.control_port)
        if self.ddp_port is not None and self.node_rank == 0:
            # rank 0's DDP store will listen there: in use now, every generation would fail.
            check_can_listen(self.ddp_addr or self.master_addr, self.ddp_port)
        if self.resolved_run_dir.exists() and not self.resolved_run_dir.is_dir():
            raise ConfigError(f"--run-dir {str(self.resolved_run_dir)!r} exists and is not a directory")

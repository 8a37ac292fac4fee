"""A run's settings as frozen, validated dataclasses. No I/O beyond checking that paths exist
and that the master's port is free."""

from __future__ import annotations

import importlib.util
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from ddp_launch.errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class Target:
    """What each worker runs: a script file or a module (as `python -m`), with its argv tail."""

    name: str
    args: tuple[str, ...] = ()
    is_module: bool = False

    def validate(self) -> None:
        if self.is_module:
            if not self.name:
                raise ConfigError("no module given to -m")
            try:
                spec = importlib.util.find_spec(self.name)
            except (ImportError, ValueError) as e:
                raise ConfigError(f"module {self.name!r} cannot be found: {e}") from None
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


def check_can_listen(host: str, port: int) -> None:
    """Raise ConfigError when nothing could listen on host:port (e.g. it is in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def new_run_id() -> str:
    """Sortable and short: 20261125-142215-3f9a."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass(frozen=True)
class RunConfig:
    """Everything one node's launcher needs, decided before anything starts."""

    target: Target
    nproc_per_node: int
    run_id: str = field(default_factory=new_run_id)
    run_dir: Path | None = None  # None: ./runs/<run_id>
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port (single node)
    ddp_port: int | None = None  # None: a free port per generation
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

    def __post_init__(self) -> None:
        if self.run_dir is None:
            object.__setattr__(self, "run_dir", Path("runs") / self.run_id)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

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
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        ports = (
            ("--master-port", self.master_port),
            ("--ddp-port", self.ddp_port),
            ("--metrics-port", self.metrics_port),
        )
        for name, port in ports:
            if port is not None and not 1 <= port <= 65535:
                raise ConfigError(f"{name} must be in 1..65535, got {port}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.nnodes > 1:
            if self.master_port is None:
                raise ConfigError("--master-port is required with --nnodes > 1 (every node must know it)")
            if not self.token:
                raise ConfigError("--nnodes > 1 needs the run's token: --token-file FILE or DDP_LAUNCH_TOKEN")
            if self.metrics_port is not None and self.node_rank > 0:
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
        self.target.validate()
        if self.metrics_port is not None:
            try:
                import prometheus_client  # noqa: F401
            except ImportError:
                raise ConfigError("--metrics-port needs prometheus-client: pip install 'ddp-launch[metrics]'") from None
            check_can_listen(self.master_addr, self.metrics_port)
        if self.master_port is not None and self.node_rank == 0:
            check_can_listen(self.master_addr, self.master_port)
        if self.resolved_run_dir.exists() and not self.resolved_run_dir.is_dir():
            raise ConfigError(f"--run-dir {str(self.resolved_run_dir)!r} exists and is not a directory")

"""The run command's options, spelled and meant as torchrun's, turned into one RunConfig.

torchrun's options are listed in torch/distributed/run.py; every one is accepted here under
every spelling torchrun accepts (``--nproc-per-node`` and ``--nproc_per_node``) and from its
``PET_<OPTION>`` variable (the CLI declares them; an explicit flag wins). This module gives
them torchrun's meaning, or rejects them with one line naming what works instead: an option
is never accepted and then ignored.

Ports: torchrun's ``--master-port P`` (or the port of ``--rdzv-endpoint HOST:P``) is what its
users open in a firewall and what their scripts see as MASTER_PORT. Here P is the DDP store's
port (MASTER_PORT, hosted by rank 0, kept across restarts) and the gRPC master listens on
P + 1 (``--control-port`` overrides it). A firewall between nodes needs P and P + 1 open on
the master's node, plus whatever gloo/nccl use between all nodes, as under torchrun.

:func:`config_from_options` is the one place this happens (torchrun's ``config_from_args``);
it imports neither grpc nor torch, except that ``-n gpu``/``auto`` and ``--backend nccl`` ask
torch how many CUDA devices there are.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import signal
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ddp_launch.cluster import ClusterDefaults
from ddp_launch.cluster import detect as detect_cluster
from ddp_launch.config import (
    NODE_BY_ARRIVAL,
    START_SPAWN,
    START_WARM,
    LogOptions,
    RestartPolicy,
    RunConfig,
    Target,
    TlsFiles,
    check_can_listen,
)
from ddp_launch.errors import ConfigError

# torchrun's defaults where ddp-launch keeps torchrun's meaning.
C10D_DEFAULT_PORT = 29400  # torchrun's port for a c10d endpoint given without one
# Not torchrun's 30 s: a node that comes later than this is not refused, only admitted at
# a generation boundary, so the first generation need not wait long for it.
C10D_LAST_CALL_S = 3.0
RDZV_BACKENDS = ("static", "c10d")
# --rdzv-conf keys that mean something here; torchrun's others are rejected, not ignored.
RDZV_CONF_KEYS = ("is_host", "join_timeout", "last_call_timeout", "timeout")
EVENT_LOG_HANDLERS = ("null",)


def parse_nproc(value: str) -> int:
    """-n as torchrun reads it: a count, or cpu / gpu / auto (GPUs if any, else CPUs)."""
    text = value.strip().lower()
    if text == "cpu":
        return _cpu_count()
    if text in ("gpu", "auto"):
        gpus = _gpu_count()
        if text == "gpu" and gpus == 0:
            raise ConfigError("--nproc-per-node gpu: no CUDA device is visible")
        return gpus or _cpu_count()
    if text == "xpu":
        raise ConfigError("--nproc-per-node xpu: ddp-launch runs CPU (gloo) and CUDA (nccl) workers only")
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"-n/--nproc-per-node must be a positive integer, cpu, gpu or auto; got {value!r}") from None
    if n < 1:
        raise ConfigError(f"-n/--nproc-per-node must be >= 1, got {n}")
    return n


def parse_nnodes(value: str) -> tuple[int, int]:
    """torchrun's --nnodes: N, or MIN:MAX (elastic when MIN < MAX) -> (MIN, MAX)."""
    text = value.strip()
    lo, sep, hi = text.partition(":")
    try:
        first, last = (int(lo), int(hi)) if sep else (int(text), int(text))
    except ValueError:
        raise ConfigError(f"--nnodes must be N or MIN:MAX, got {value!r}") from None
    if first < 1 or last < first:
        raise ConfigError(f"--nnodes {value!r}: needs 1 <= MIN <= MAX")
    return first, last


def parse_signals(value: str) -> tuple[int, ...]:
    """torchrun's --signals-to-handle: "SIGTERM,SIGINT,..." -> signal numbers."""
    found = []
    for name in (part.strip() for part in value.split(",")):
        if not name:
            continue
        try:
            found.append(signal.Signals[name.upper()])
        except KeyError:
            raise ConfigError(f"--signals-to-handle: unknown signal {name!r}") from None
        if found[-1] in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
            raise ConfigError(f"--signals-to-handle: {name} cannot be handled")
    if not found:
        raise ConfigError("--signals-to-handle: no signal given")
    return tuple(dict.fromkeys(found))


def parse_rdzv_conf(value: str) -> dict[str, str]:
    """torchrun's --rdzv-conf "k1=v1,k2=v2" -> {k1: v1, k2: v2}; unknown keys are an error."""
    conf: dict[str, str] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--rdzv-conf must be KEY=VALUE pairs separated by commas, got {item!r}")
        if key not in RDZV_CONF_KEYS:
            raise ConfigError(
                f"--rdzv-conf {key}: not supported here (supported: {', '.join(RDZV_CONF_KEYS)}; "
                "hang and heartbeat timing: --hang-timeout, --heartbeat-interval)"
            )
        conf[key] = val.strip()
    return conf


def _bool(key: str, value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "t", "yes", "y"):
        return True
    if text in ("0", "false", "f", "no", "n"):
        return False
    raise ConfigError(f"--rdzv-conf {key}={value!r} is not a boolean")


def split_endpoint(endpoint: str, default_port: int) -> tuple[str, int]:
    """ "host:port", "host", "[v6]:port", "[v6]" -> (host, port), parsed as torchrun's
    parse_rendezvous_endpoint does (the text after the last colon is the port)."""
    text = endpoint.strip()
    if text.startswith("[") and text.endswith("]"):
        host, port_text = text, None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, None
    if len(host) > 1 and host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if port_text is None:
        port = default_port
    else:
        try:
            port = int(port_text)
        except ValueError:
            port = -1
        if not 0 <= port <= 65535:
            raise ConfigError(f"--rdzv-endpoint {endpoint!r}: the port must be a number in 0..65535")
    if not host:
        raise ConfigError(f"--rdzv-endpoint {endpoint!r}: no host")
    return host, port


def is_local_host(host: str) -> bool:
    """Whether `host` names this machine (torchrun's c10d decides who hosts the store so)."""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    for address in addresses:
        try:
            if ipaddress.ip_address(address).is_loopback:
                return True
        except ValueError:
            continue
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.bind((address, 0))  # only a local address can be bound
                return True
            except OSError:
                continue
    return False


def _cpu_count() -> int:
    """The CPUs this process may run on (taskset, cgroups' cpusets), as torch counts them."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _can_listen(host: str, port: int) -> bool:
    try:
        check_can_listen(host, port)
    except ConfigError:
        return False
    return True


def _gpu_count() -> int:
    # Only -n gpu/auto and --backend nccl pay for importing torch in the launcher.
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _first(*values):
    """Explicit option (or its PET_ variable), else the cluster's variable, else the default."""
    return next((v for v in values if v is not None), None)


def read_token(token_file: Path | None, environ: Mapping[str, str]) -> str:
    """The run's shared secret: --token-file, else $DDP_LAUNCH_TOKEN, else none."""
    if token_file is None:
        return environ.get("DDP_LAUNCH_TOKEN", "").strip()
    try:
        token = token_file.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read --token-file {str(token_file)!r}: {e.strerror}") from None
    if not token:
        raise ConfigError(f"--token-file {str(token_file)!r} is empty")
    return token


def shared_token(control_addr: str, control_port: int, run_id: str | None) -> str:
    """The token of a multi-node run given none: every node derives the same one from what a
    torchrun line shares (the endpoint and --rdzv-id). It keeps apart runs at different
    endpoints; it is no secret, so the control plane is then as open as torchrun's store."""
    text = f"ddp-launch|{control_addr}:{control_port}|{run_id or ''}"
    return hashlib.sha256(text.encode()).hexdigest()


def _reject(o: Mapping[str, Any]) -> None:
    """torchrun options that cannot mean here what they mean there: one line each."""
    if o["logs_specs"] is not None:
        raise ConfigError(
            "--logs-specs: torchrun's log plugins are not supported; ddp-launch writes rank logs in "
            "its run directory and torchrun's layout with --log-dir/--redirects/--tee"
        )
    if o["numa_binding"] is not None:
        raise ConfigError(
            "--numa-binding is not supported; bind with numactl instead: "
            "ddp-launch --no-python numactl --cpunodebind=0 python train.py"
        )
    if o["event_log_handler"] not in EVENT_LOG_HANDLERS:
        raise ConfigError(
            f"--event-log-handler {o['event_log_handler']!r} is not supported: "
            "ddp-launch writes its events to <run-dir>/events.jsonl"
        )
    if o["rdzv_backend"] not in RDZV_BACKENDS:
        raise ConfigError(
            f"--rdzv-backend {o['rdzv_backend']!r} is not supported: use c10d or static "
            "(ddp-launch's own master is the rendezvous)"
        )
    if o["no_python"] and o["is_module"] and not o["run_path"]:
        raise ConfigError("don't use both --no-python and -m/--module (torchrun rejects this pair too)")


def _rendezvous(
    o: Mapping[str, Any], conf: Mapping[str, str], cluster: ClusterDefaults, nnodes: int
) -> tuple[str, int | None, int | None, int | None, bool]:
    """(master address, DDP store port, control port, node rank from the rendezvous, whether
    that rank 0 is a guess) from --standalone, --rdzv-* (`conf` is --rdzv-conf parsed) and
    --master-*, as torchrun reads them."""
    if o["standalone"] and nnodes > 1:
        raise ConfigError("--standalone runs one node; drop it or --nnodes")
    addr = _first(o["master_addr"], cluster.master_addr, "127.0.0.1")
    port = _first(o["master_port"], cluster.master_port)
    endpoint = o["rdzv_endpoint"]
    if o["standalone"]:
        # torchrun: a local store on free ports, whatever --rdzv-* says. An explicit
        # --master-port is kept (torchrun would drop it without a word).
        addr = "127.0.0.1"
    elif endpoint:
        default_port = C10D_DEFAULT_PORT if o["rdzv_backend"] == "c10d" else 29500
        addr, port = split_endpoint(endpoint, default_port)
    if port == 0:  # torchrun's "localhost:0": any free port
        port = None
    if addr.startswith("[") and addr.endswith("]"):  # torchrun's IPv6 spelling of --master-addr
        addr = addr[1:-1]
    control = o["control_port"]
    if control is None and port is not None:
        if not 1 <= port <= 65534:
            raise ConfigError(f"--master-port must be in 1..65534 (the master listens on port + 1), got {port}")
        control = port + 1
    node_rank = None
    guessed = False
    guess = o["rdzv_backend"] == "c10d" and nnodes > 1 and o["node_rank"] is None and cluster.node_rank is None
    if endpoint and not o["standalone"] and guess:
        # c10d has no node rank: the node that hosts the store is node 0. As in torchrun, a
        # node at the endpoint's address hosts it unless someone already does (two nodes on
        # one machine: the first to start).
        if "is_host" in conf:
            host = _bool("is_host", conf["is_host"])
        else:
            host = guessed = is_local_host(addr) and (control is None or _can_listen(addr, control))
        # Every other node gets its rank from the master when it joins, as in torchrun's
        # rendezvous (and again at each generation of an elastic run).
        node_rank = 0 if host else NODE_BY_ARRIVAL
    return addr, port, control, node_rank, guessed


def config_from_options(o: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> RunConfig:
    """The run's config from the run command's parsed options (names are RunCommand's dests).

    Raises:
        ConfigError: bad or unsupported input, in one line.
    """
    environ = os.environ if environ is None else environ
    _reject(o)
    # --standalone is one node whatever the allocation says (torchrun reads no SLURM).
    cluster = ClusterDefaults() if o["standalone"] else detect_cluster(environ)
    if o["nnodes"] is not None:
        min_nodes, nnodes = parse_nnodes(o["nnodes"])
    else:
        min_nodes = nnodes = _first(cluster.nnodes, 1)
    conf = parse_rdzv_conf(o["rdzv_conf"] or "")
    elastic = min_nodes < nnodes
    if elastic and (o["rdzv_backend"] != "c10d" or not o["rdzv_endpoint"]):
        raise ConfigError(
            f"--nnodes {min_nodes}:{nnodes} (elastic) needs --rdzv-backend c10d and --rdzv-endpoint HOST:PORT, "
            "the host whose launcher leads the run"
        )
    addr, ddp_port, control_port, rdzv_node_rank, host_by_guess = _rendezvous(o, conf, cluster, nnodes)
    if elastic:
        # Node ranks are given at each generation; --node-rank (or SLURM's) only says which
        # node hosts the master, as is_host does.
        given = _first(o["node_rank"], cluster.node_rank)
        node_rank = rdzv_node_rank if given is None or rdzv_node_rank is not None else given
        node_rank = 0 if node_rank == 0 else NODE_BY_ARRIVAL
    else:
        node_rank = _first(o["node_rank"], rdzv_node_rank, cluster.node_rank, 0)
    last_call = C10D_LAST_CALL_S
    if "last_call_timeout" in conf:
        try:
            last_call = float(conf["last_call_timeout"])
        except ValueError:
            raise ConfigError(
                f"--rdzv-conf last_call_timeout={conf['last_call_timeout']!r} is not a number of seconds"
            ) from None
    join_timeout = o["join_timeout"]
    for key in ("join_timeout", "timeout"):
        if key in conf:
            try:
                join_timeout = float(conf[key])
            except ValueError:
                raise ConfigError(f"--rdzv-conf {key}={conf[key]!r} is not a number of seconds") from None
    run_id = o["run_id"]
    if run_id is None and o["rdzv_id"] not in (None, "none"):
        run_id = o["rdzv_id"]
    if run_id is None:
        run_id = cluster.run_id  # under SLURM every node of the job has the job's
    token = read_token(o["token_file"], environ)
    if not token and nnodes > 1 and control_port is not None:
        token = shared_token(addr, control_port, run_id)
    nproc = parse_nproc(_first(o["nproc"], cluster.nproc_per_node, "1"))
    backend = o["backend"]
    if backend == "nccl" and _gpu_count() == 0:
        raise ConfigError("--backend nccl needs CUDA, and no CUDA device is visible here: use --backend gloo")
    if o["virtual_local_rank"] and "CUDA_VISIBLE_DEVICES" in environ:
        visible = [d for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        if len(visible) < nproc:
            raise ConfigError(
                f"--virtual-local-rank: CUDA_VISIBLE_DEVICES names {len(visible)} device(s) for {nproc} workers"
            )
    start = o["start_method"]
    stop_grace = o["stop_grace"] if o["shutdown_timeout"] is None else float(o["shutdown_timeout"])
    filters = o["local_ranks_filter"]
    logs = LogOptions(
        log_dir=Path(o["log_dir"]) if o["log_dir"] else None,
        redirects=o["redirects"],
        tee=o["tee"],
        local_ranks_filter=_ranks_filter(filters) if filters else None,
        duplicate_stdout_filters=_filters(o["duplicate_stdout_filters"]),
        duplicate_stderr_filters=_filters(o["duplicate_stderr_filters"]),
    )
    extra = {"run_id": run_id, "run_id_given": True} if run_id else {}
    return RunConfig(
        target=Target(
            o["script"],
            tuple(o["script_args"]),
            is_module=o["is_module"],
            no_python=o["no_python"] and not o["run_path"],  # torchrun: --run-path takes precedence
        ),
        nproc_per_node=nproc,
        nnodes=nnodes,
        min_nodes=min_nodes,
        node_rank=node_rank,
        host_by_guess=host_by_guess and node_rank == 0,
        last_call_s=last_call,
        token=token,
        tls=TlsFiles(cert=o["tls_cert"], key=o["tls_key"], ca=o["tls_ca"]),
        run_dir=o["run_dir"],
        restart=RestartPolicy(
            max_restarts=o["max_restarts"], stop_grace_s=stop_grace, hang_timeout_s=o["hang_timeout"]
        ),
        master_addr=addr,
        control_port=control_port,
        ddp_port=ddp_port,
        ddp_addr=o["local_addr"] if o["local_addr"] and node_rank == 0 else None,
        backend=backend,
        heartbeat_interval_s=o["heartbeat_interval"],
        timeout_s=o["timeout_s"],
        join_timeout_s=join_timeout,
        straggler_fraction=o["straggler_fraction"],
        straggler_window_s=o["straggler_window"],
        metrics_port=o["metrics_port"],
        quiet=o["quiet"],
        role=o["role"],
        monitor_interval_s=o["monitor_interval"],
        start_method=START_SPAWN if start == "spawn" else START_WARM,
        signals=parse_signals(o["signals_to_handle"]),
        virtual_local_rank=o["virtual_local_rank"],
        logs=logs,
        **extra,
    )


def _ranks_filter(text: str) -> frozenset[int]:
    try:
        ranks = frozenset(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--local-ranks-filter must be comma-separated integers like 0,1,2; got {text!r}") from None
    return ranks


def _filters(text: str | None) -> tuple[str, ...]:
    """torchrun's comma-separated filter list; ",," is a literal comma."""
    if not text:
        return ()
    placeholder = "\0"
    return tuple(item.replace(placeholder, ",") for item in text.replace(",,", placeholder).split(",") if item)

"""The `ddp-launch` command: options -> RunConfig -> launcher; errors -> exit codes.

Nothing else lives here. Bad input is one line on stderr and exit code 2, before anything
is started.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ddp_launch import __version__
from ddp_launch.cluster import detect as detect_cluster
from ddp_launch.config import BACKENDS, RestartPolicy, RunConfig, Target, TlsFiles
from ddp_launch.errors import ConfigError

EXIT_USAGE = 2

RUN_HELP = """Run SCRIPT (or, with -m, a module) on N local workers, like torchrun.

Everything after SCRIPT is passed to it untouched. Each worker sees the environment
torchrun gives it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...).

\b
Example:
    ddp-launch -n 4 examples/train_mlp.py --epochs 3
    ddp-launch -n 2 --max-restarts 3 --hang-timeout 60 train.py --lr 0.1
    ddp-launch -n 2 -m my_package.train --config cfg.yaml
"""


class _RunByDefault(click.Group):
    """`ddp-launch -n 4 train.py` is the run command; a first word naming a subcommand is that
    subcommand (a script that shares a subcommand's name runs as ./name)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(
    cls=_RunByDefault,
    context_settings={"help_option_names": ["-h", "--help"]},
    help=RUN_HELP + "\nThe run options are listed by `ddp-launch run --help`.",
)
@click.version_option(__version__, prog_name="ddp-launch")
def cli() -> None:
    pass


def parse_nproc(value: str) -> int:
    """-n as torchrun reads it: a count, or cpu / gpu / auto (GPUs if any, else CPUs)."""
    text = value.strip().lower()
    if text == "cpu":
        return os.cpu_count() or 1
    if text in ("gpu", "auto"):
        gpus = _gpu_count()
        if text == "gpu" and gpus == 0:
            raise ConfigError("-n gpu: no CUDA device is visible")
        return gpus or (os.cpu_count() or 1)
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"-n/--nproc-per-node must be a positive integer, cpu, gpu or auto; got {value!r}") from None
    if n < 1:
        raise ConfigError(f"-n/--nproc-per-node must be >= 1, got {n}")
    return n


def _first(*values):
    """Explicit option, else the cluster's variable, else the default."""
    return next((v for v in values if v is not None), None)


def read_token(token_file: Path | None) -> str:
    """The run's shared secret: --token-file, else $DDP_LAUNCH_TOKEN, else none (single node)."""
    if token_file is None:
        return os.environ.get("DDP_LAUNCH_TOKEN", "").strip()
    try:
        token = token_file.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read --token-file {str(token_file)!r}: {e.strerror}") from None
    if not token:
        raise ConfigError(f"--token-file {str(token_file)!r} is empty")
    return token


def _gpu_count() -> int:
    # Only -n gpu/auto pays for importing torch in the launcher.
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@cli.command(
    "run",
    help=RUN_HELP,
    context_settings={"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]},
)
@click.option(
    "-n", "--nproc-per-node", "nproc", default="1", show_default=True, help="Workers on this node: N, cpu, gpu or auto."
)
@click.option("-m", "--module", "is_module", is_flag=True, help="SCRIPT names a module, run as `python -m` would.")
@click.option(
    "--max-restarts",
    default=0,
    show_default=True,
    type=int,
    help="Restarts of the whole group after a failure or hang.",
)
@click.option(
    "--hang-timeout",
    default=300.0,
    show_default=True,
    type=float,
    help="Seconds without heartbeat or step progress before a rank is hung (0: off); at least 3 heartbeat intervals.",
)
@click.option(
    "--stop-grace",
    default=5.0,
    show_default=True,
    type=float,
    help="Seconds between SIGTERM and SIGKILL when stopping workers.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=None,
    help="Bound on the whole run in seconds; exit 124 when it passes.",
)
@click.option(
    "--nnodes", type=int, default=None, help="Nodes in the run [default: 1, or from SLURM / PET_* variables]."
)
@click.option(
    "--node-rank",
    type=int,
    default=None,
    help="This node's rank; node 0 runs the master [default: 0, or from SLURM / PET_*].",
)
@click.option(
    "--master-addr",
    default=None,
    help="The gRPC master's address: node 0 binds it, other nodes join it [default: 127.0.0.1].",
)
@click.option(
    "--master-port", type=int, default=None, help="Port of the gRPC master [default: a free port on a single node]."
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The run's shared secret (several nodes) [default: $DDP_LAUNCH_TOKEN].",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="PEM certificate the master serves TLS with (node 0).",
)
@click.option(
    "--tls-key", type=click.Path(path_type=Path, dir_okay=False), default=None, help="PEM private key of --tls-cert."
)
@click.option(
    "--tls-ca",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="PEM CA that signed the master's certificate: turns on TLS for every client.",
)
@click.option(
    "--ddp-port",
    type=int,
    default=None,
    help="Pin MASTER_PORT, the DDP store's port [default: a free port per generation].",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="auto: nccl when every local worker has a GPU, else gloo.",
)
@click.option("--run-id", default=None, help="Run id (TORCHELASTIC_RUN_ID) [default: time-based].")
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Logs, master.json and reports [default: ./runs/<run-id>].",
)
@click.option(
    "--heartbeat-interval", default=1.0, show_default=True, type=float, help="Seconds between a worker's heartbeats."
)
@click.option(
    "--join-timeout", default=300.0, show_default=True, type=float, help="Seconds for every rank to register."
)
@click.option(
    "--straggler-fraction",
    default=0.7,
    show_default=True,
    type=float,
    help="A rank slower than this fraction of the median step rate ...",
)
@click.option(
    "--straggler-window",
    default=30.0,
    show_default=True,
    type=float,
    help="... for this many seconds is flagged a straggler.",
)
@click.option(
    "--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port (needs ddp-launch[metrics])."
)
@click.option("-q", "--quiet", is_flag=True, help="No live view; worker output still streams.")
@click.option(
    "--standalone", is_flag=True, hidden=True, help="Accepted for torchrun compatibility (always standalone)."
)
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def run_command(nproc, is_module, max_restarts, hang_timeout, stop_grace, timeout_s, nnodes, node_rank, master_addr,
                master_port, token_file, tls_cert, tls_key, tls_ca, ddp_port,
                backend, run_id, run_dir, heartbeat_interval, join_timeout, straggler_fraction, straggler_window,
                metrics_port, quiet, standalone, script, script_args) -> None:  # fmt: skip
    # Imported late: `--help` and bad input stay fast, and the forkserver starts first.
    from ddp_launch.warm import forkserver_context

    extra = {"run_id": run_id} if run_id else {}
    cluster = detect_cluster(os.environ)
    config = RunConfig(
        target=Target(script, tuple(script_args), is_module=is_module),
        nproc_per_node=parse_nproc(_first(nproc, cluster.nproc_per_node, "1")),
        nnodes=_first(nnodes, cluster.nnodes, 1),
        node_rank=_first(node_rank, cluster.node_rank, 0),
        token=read_token(token_file),
        tls=TlsFiles(cert=tls_cert, key=tls_key, ca=tls_ca),
        run_dir=run_dir,
        restart=RestartPolicy(max_restarts=max_restarts, stop_grace_s=stop_grace, hang_timeout_s=hang_timeout),
        master_addr=_first(master_addr, cluster.master_addr, "127.0.0.1"),
        master_port=_first(master_port, cluster.master_port, None),
        ddp_port=ddp_port,
        backend=backend,
        heartbeat_interval_s=heartbeat_interval,
        timeout_s=timeout_s,
        join_timeout_s=join_timeout,
        straggler_fraction=straggler_fraction,
        straggler_window_s=straggler_window,
        metrics_port=metrics_port,
        quiet=quiet,
        **extra,
    )
    config.validate()
    forkserver_context()  # its torch import overlaps the rest of the launcher's start-up
    from ddp_launch.launcher import launch

    outcome = launch(config)
    print(outcome.summary, file=sys.stderr)
    if outcome.report:
        print(outcome.report, file=sys.stderr)
    sys.exit(outcome.exit_code)


@cli.command("status", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The run's directory [default: here, or the newest under ./runs].",
)
@click.option("--master-addr", default=None, help="The master's host, instead of the run directory's master.json.")
@click.option("--master-port", type=int, default=None, help="The master's port.")
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="The run's token [default: <run-dir>/token or $DDP_LAUNCH_TOKEN].",
)
@click.option(
    "--tls-ca",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="PEM CA of the master's certificate [default: the run's, from master.json].",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the run's fields and a `ranks` list.")
def status_command(run_dir, master_addr, master_port, token_file, tls_ca, as_json) -> None:  # fmt: skip
    """Show a running run's ranks: state, step, steps/s, loss, RSS, CPU, heartbeat age.

    \b
    Example:
        ddp-launch status --run-dir runs/20261125-142215-3f9a
        ddp-launch status --json | jq '.ranks[] | select(.straggler)'
    """
    import json

    from ddp_launch.status import StatusUnavailable, fetch_status, format_table, resolve_endpoint

    try:
        address, token, ca = resolve_endpoint(run_dir, master_addr, master_port, token_file, tls_ca)
        status = fetch_status(address, token, ca)
    except StatusUnavailable as e:
        print(f"ddp-launch: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(status, indent=2) if as_json else format_table(status))


@cli.command("report", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The HTML file [default: RUN_DIR/report.html].",
)
@click.option("--png", is_flag=True, help="Also write the charts as PNG images (needs matplotlib).")
def report_command(run_dir, out, png) -> None:  # fmt: skip
    """Render a run's events.jsonl as a self-contained HTML page (no network needed to open it).

    \b
    Example:
        ddp-launch report runs/20261125-142215-3f9a
        ddp-launch report runs/20261125-142215-3f9a --png
    """
    from ddp_launch.run_report import render_html, render_png

    print(render_html(run_dir, out))
    if png:
        for path in render_png(run_dir):
            print(path)


@cli.command("master", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--world-size", type=int, required=True, help="How many workers will join.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=50051, show_default=True, help="Port to listen on.")
@click.option(
    "--run-dir", type=click.Path(path_type=Path), default=None, help="master.json and token [default: ./runs/<run-id>]."
)
@click.option(
    "--hang-timeout",
    default=300.0,
    show_default=True,
    type=float,
    help="Seconds before a silent or stalled rank ends the run (0: off).",
)
@click.option("-q", "--quiet", is_flag=True, help="No live view.")
def master_command(world_size, host, port, run_dir, hang_timeout, quiet) -> None:  # fmt: skip
    """Manual mode: a master alone, waiting for workers started by hand (`ddp-launch worker`).

    \b
    Example (terminal 1, then one worker per terminal 2-5):
        ddp-launch master --world-size 4
        ddp-launch worker examples/train_mlp.py --epochs 3
    """
    from ddp_launch.config import check_can_listen
    from ddp_launch.manual import run_master

    check_can_listen(host, port)
    sys.exit(
        run_master(
            world_size=world_size, host=host, port=port, run_dir=run_dir, hang_timeout_s=hang_timeout, quiet=quiet
        )
    )


@cli.command(
    "worker",
    context_settings={"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]},
)
@click.option(
    "--master",
    "master",
    default=None,
    help="HOST:PORT of the master [default: the newest run's here, else localhost:50051].",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="The run's token [default: $DDP_LAUNCH_TOKEN, else the run directory's].",
)
@click.option(
    "--tls-ca",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="PEM CA of the master's certificate.",
)
@click.option("-m", "--module", "is_module", is_flag=True, help="SCRIPT names a module.")
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def worker_command(master, token_file, tls_ca, is_module, script, script_args) -> None:  # fmt: skip
    """Manual mode: run SCRIPT as one worker of a `ddp-launch master`.

    \b
    Example:
        ddp-launch worker examples/train_mlp.py --epochs 3
        ddp-launch worker --master 10.0.0.5:50051 train.py
    """
    from ddp_launch.manual import DEFAULT_PORT, run_worker
    from ddp_launch.status import StatusUnavailable, resolve_endpoint

    token = read_token(token_file)
    if master is None or not token:
        try:
            found, found_token, _ = resolve_endpoint(None, None, None, None)
        except StatusUnavailable:
            found, found_token = f"localhost:{DEFAULT_PORT}", ""
        master = master or found
        token = token or found_token
    run_worker(Target(script, tuple(script_args), is_module=is_module), master, token, str(tls_ca) if tls_ca else None)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: click in non-standalone mode, so every error is one line."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = cli.main(args=args, prog_name="ddp-launch", standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:
        _fail(e.format_message())
    except ConfigError as e:
        _fail(str(e))
    except click.Abort:
        code = 130
    sys.exit(code or 0)


def _fail(message: str) -> None:
    print(f"ddp-launch: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)

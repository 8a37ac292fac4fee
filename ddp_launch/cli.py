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
from ddp_launch.config import BACKENDS, START_WARM, Target
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
    ddp-launch --standalone --nproc_per_node=8 train.py   (torchrun's own line)
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


def _pet(*names: str, dest: str, pet: str | None = None, **kwargs):
    """A torchrun option: every spelling torchrun accepts, read from PET_<OPTION> when not
    given (torchrun's argparse does the same; an explicit flag wins)."""
    return click.option(*names, dest, envvar=f"PET_{(pet or dest).upper()}", show_envvar=True, **kwargs)


class _RunCommand(click.Command):
    """argparse's `--` rule, which torchrun's scripts see: the first `--` before the script,
    or right after it, ends the launcher's options and is not passed on; any other `--` is
    the script's."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, list(args))
        tail = tuple(ctx.params.get("script_args") or ())
        script_at = len(args) - len(tail) - 1
        if tail[:1] == ("--",) and "--" not in args[:script_at]:
            ctx.params["script_args"] = tail[1:]
        return rest


# fmt: off
@cli.command(
    "run",
    cls=_RunCommand,
    help=RUN_HELP,
    context_settings={"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]},
)
# -- torchrun's options (torch/distributed/run.py), with torchrun's meanings ------------------
@_pet("-n", "--nproc-per-node", "--nproc_per_node", dest="nproc", pet="nproc_per_node", default=None,
      help="Workers on this node: N, cpu, gpu or auto [default: 1].")
@_pet("--nnodes", dest="nnodes", default=None, help="Nodes: N, or MIN:MAX with MIN == MAX [default: 1, or SLURM's].")
@_pet("--node-rank", "--node_rank", dest="node_rank", type=int, default=None,
      help="This node's rank; node 0 runs the master [default: 0, or SLURM's].")
@_pet("--master-addr", "--master_addr", dest="master_addr", default=None,
      help="Node 0's address: the master and MASTER_ADDR [default: 127.0.0.1, or SLURM's first host].")
@_pet("--master-port", "--master_port", dest="master_port", type=int, default=None,
      help="MASTER_PORT, the DDP store's port; the gRPC master listens on it + 1 [default: free ports].")
@_pet("--rdzv-backend", "--rdzv_backend", dest="rdzv_backend", default="static", show_default=True,
      help="static or c10d: both rendezvous at ddp-launch's master.")
@_pet("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint", default="",
      help="HOST[:PORT] of the rendezvous: the master's address, and PORT as --master-port.")
@_pet("--rdzv-id", "--rdzv_id", dest="rdzv_id", default=None, help="The run's id (TORCHELASTIC_RUN_ID).")
@_pet("--rdzv-conf", "--rdzv_conf", dest="rdzv_conf", default="",
      help="KEY=VALUE,...: is_host, join_timeout (= timeout).")
@_pet("--standalone", dest="standalone", is_flag=True, help="One node on free local ports (the default here).")
@_pet("--max-restarts", "--max_restarts", dest="max_restarts", default=0, show_default=True, type=int,
      help="Restarts of the whole group after a failure or hang.")
@_pet("--monitor-interval", "--monitor_interval", dest="monitor_interval", default=0.25, show_default=True,
      type=float, help="Seconds between the supervisor's checks (deaths are seen at once).")
@_pet("--start-method", "--start_method", dest="start_method", default=None,
      type=click.Choice(["spawn", "fork", "forkserver"]),
      help="spawn: a fresh interpreter per worker; fork/forkserver: forked from the warm process [default].")
@_pet("--event-log-handler", "--event_log_handler", dest="event_log_handler", default="null",
      help="Only null: ddp-launch's events go to <run-dir>/events.jsonl.")
@_pet("--role", dest="role", default="default", show_default=True, help="The workers' role (ROLE_NAME).")
@_pet("-m", "--module", dest="is_module", pet="module", is_flag=True,
      help="SCRIPT names a module, run as `python -m` would.")
@_pet("--no-python", "--no_python", dest="no_python", is_flag=True,
      help="SCRIPT is a program to run as it is, not a Python script.")
@_pet("--run-path", "--run_path", dest="run_path", is_flag=True,
      help="Run SCRIPT in an interpreter already started (what ddp-launch always does).")
@_pet("--log-dir", "--log_dir", dest="log_dir", default=None,
      help="Base directory for torchrun's per-attempt log files.")
@_pet("-r", "--redirects", dest="redirects", default="0", show_default=True,
      help="Streams to log files only: 1 stdout, 2 stderr, 3 both, or LOCAL_RANK:STD,...")
@_pet("-t", "--tee", dest="tee", default="0", show_default=True, help="Streams to log files and the console.")
@_pet("--local-ranks-filter", "--local_ranks_filter", dest="local_ranks_filter", default="",
      help="Only these local ranks (0,1,...) reach the console.")
@_pet("--duplicate-stdout-filters", "--duplicate_stdout_filters", dest="duplicate_stdout_filters", default="",
      help="Copy stdout lines containing any of these (comma-separated) to filtered_stdout.log.")
@_pet("--duplicate-stderr-filters", "--duplicate_stderr_filters", dest="duplicate_stderr_filters", default="",
      help="Copy stderr lines containing any of these to filtered_stderr.log.")
@_pet("--local-addr", "--local_addr", dest="local_addr", default=None,
      help="This node's address for the data plane (MASTER_ADDR when node 0).")
@_pet("--signals-to-handle", "--signals_to_handle", dest="signals_to_handle",
      default="SIGTERM,SIGINT,SIGHUP,SIGQUIT", show_default=True,
      help="Signals that stop the run, forwarded to every worker.")
@_pet("--shutdown-timeout", "--shutdown_timeout", dest="shutdown_timeout", type=int, default=None,
      help="Seconds between SIGTERM and SIGKILL when stopping workers (= --stop-grace).")
@_pet("--virtual-local-rank", "--virtual_local_rank", dest="virtual_local_rank", is_flag=True,
      help="LOCAL_RANK=0 in every worker, CUDA_VISIBLE_DEVICES=<its local rank>.")
@click.option("--logs-specs", "--logs_specs", "logs_specs", default=None, hidden=True)
@click.option("--numa-binding", "--numa_binding", "numa_binding", default=None, hidden=True)
# -- ddp-launch's own ------------------------------------------------------------------------------
@click.option("--hang-timeout", default=300.0, show_default=True, type=float,
              help="Seconds without heartbeat or step progress before a rank is hung (0: off); "
              "at least 3 heartbeat intervals.")
@click.option("--stop-grace", default=5.0, show_default=True, type=float,
              help="Seconds between SIGTERM and SIGKILL when stopping workers.")
@click.option("--timeout", "timeout_s", type=float, default=None,
              help="Bound on the whole run in seconds; exit 124 when it passes.")
@click.option("--control-port", type=int, default=None,
              help="Port of the gRPC master [default: --master-port + 1, else a free port].")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The run's shared secret (several nodes) [default: $DDP_LAUNCH_TOKEN].")
@click.option("--tls-cert", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="PEM certificate the master serves TLS with (node 0).")
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="PEM private key of --tls-cert.")
@click.option("--tls-ca", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="PEM CA that signed the master's certificate: turns on TLS for every client.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: nccl when every local worker has a GPU, else gloo.")
@click.option("--run-id", default=None, help="Run id (TORCHELASTIC_RUN_ID) [default: --rdzv-id, else time-based].")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="Logs, master.json and reports [default: ./runs/<run-id>].")
@click.option("--heartbeat-interval", default=1.0, show_default=True, type=float,
              help="Seconds between a worker's heartbeats.")
@click.option("--join-timeout", default=300.0, show_default=True, type=float,
              help="Seconds for every rank to register.")
@click.option("--straggler-fraction", default=0.7, show_default=True, type=float,
              help="A rank slower than this fraction of the median step rate ...")
@click.option("--straggler-window", default=30.0, show_default=True, type=float,
              help="... for this many seconds is flagged a straggler.")
@click.option("--metrics-port", type=int, default=None,
              help="Serve Prometheus metrics on this port (needs ddp-launch[metrics]).")
@click.option("-q", "--quiet", is_flag=True, help="No live view; worker output still streams.")
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
# fmt: on
def run_command(**options) -> None:
    # Imported late: `--help` and bad input stay fast, and the forkserver starts first.
    from ddp_launch.options import config_from_options

    try:
        config = config_from_options(options)
        config.validate()
    except ConfigError as e:
        raise ConfigError(_name_the_variable(str(e))) from None
    if config.start_method == START_WARM:
        from ddp_launch.run.warm import forkserver_context

        forkserver_context()  # its torch import overlaps the rest of the launcher's start-up
    from ddp_launch.launcher import launch

    outcome = launch(config)
    print(outcome.summary, file=sys.stderr)
    if outcome.report:
        print(outcome.report, file=sys.stderr)
    sys.exit(outcome.exit_code)


def _name_the_variable(message: str) -> str:
    """An error about an option that came from its PET_ variable says so."""
    ctx = click.get_current_context()
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or not param.name:
            continue
        from_env = ctx.get_parameter_source(param.name) is click.core.ParameterSource.ENVIRONMENT
        if from_env and any(name in message for name in param.opts) and isinstance(param.envvar, str):
            return f"{message} (from {param.envvar})"
    return message


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

    from ddp_launch.observe.status import StatusUnavailable, fetch_status, format_table, resolve_endpoint

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
    from ddp_launch.observe.report import render_html, render_png

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
    from ddp_launch.observe.status import StatusUnavailable, resolve_endpoint
    from ddp_launch.options import read_token

    token = read_token(token_file, os.environ)
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

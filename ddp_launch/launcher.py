"""One node's launcher: builds the parts of a run, runs it, and tears down in reverse.

    master (gRPC, a thread of this process) <- registry -> supervisor -> forkserver -> workers
                                                      \\-> live view <- output pump <- worker pipes

Everything started here is stopped here, in `finally`, whatever happened: no thread,
server or process outlives `launch()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.metadata
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import platform
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
import psutil

from ddp_launch import __version__, env, rundir, snapshots
from ddp_launch.config import NODE_BY_ARRIVAL, START_WARM, PortInUse, RunConfig
from ddp_launch.control.client import TRANSIENT, MasterClient
from ddp_launch.control.master import MasterServer
from ddp_launch.control.relay import HeartbeatRelay
from ddp_launch.errors import ConfigError
from ddp_launch.netif import socket_ifname_env
from ddp_launch.observe.events import EventLog
from ddp_launch.observe.failure import build_report, format_report
from ddp_launch.observe.view import LiveView, format_resize_line, format_restart_line, format_summary
from ddp_launch.record import RankRecord
from ddp_launch.registry import Registry, RunSnapshot
from ddp_launch.run.exits import WatchedProcess
from ddp_launch.run.follower import EXIT_MASTER_LOST, Follower
from ddp_launch.run.group import signal_quietly, stop_process_trees
from ddp_launch.run.output import PIPE, TERMINAL, OutputPump
from ddp_launch.run.result import GenerationResult, Outcome, RunResult, shell_exit_code
from ddp_launch.run.signals import signals_as_stop_requests
from ddp_launch.run.supervisor import Supervisor
from ddp_launch.run.warm import forkserver_context, quiet_grpc_forks
from ddp_launch.run.worker import standby_main, worker_main

EXIT_TIMEOUT = 124
EXIT_HUNG = 1
_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class LaunchResult:
    exit_code: int
    result: RunResult | None  # None on a node other than node 0 (it only follows the run)
    summary: str
    report: str  # empty when the run succeeded


def launch(config: RunConfig, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> LaunchResult:
    """Run `config` on this node until it succeeds, fails for good, times out or is stopped.

    Raises:
        ConfigError: the master could not listen, or the run directory cannot be made;
            nothing was started.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if config.node_rank != 0:
        config.validate()
        return _follow(config, stdout, stderr)
    token = config.token or secrets.token_urlsafe(24)
    try:
        config.validate()
        registry, server = _start_master(config, token)
    except PortInUse:
        if not config.host_by_guess:
            raise
        # Another launcher on this host took the endpoint between our look and now (nodes
        # started at once): it is node 0, and this one joins its run.
        return _follow(_joining(config), stdout, stderr)
    with contextlib.ExitStack() as teardown:
        teardown.callback(server.stop)
        run_dir = _make_run_dir(config, server, token)
        teardown.callback(rundir.remove_token, run_dir)  # last but one: status works to the end
        if config.metrics_port is not None:
            from ddp_launch.observe.metrics import MetricsServer

            metrics = MetricsServer(registry, config.master_addr, config.metrics_port)
            teardown.callback(metrics.stop)
        view = LiveView(stderr, enabled=not config.quiet)
        teardown.callback(view.close)
        # A progress sample every 2 s: short runs get usable curves; the file grows with time,
        # never with the heartbeat rate.
        events = EventLog(rundir.events_file(run_dir), progress_interval_s=2.0)
        teardown.callback(events.close)
        events.emit(
            "run_start",
            run_id=config.run_id,
            config={k: v for k, v in dataclasses.asdict(config).items() if k != "token"},
            world_size=config.world_size,
            nnodes=config.nnodes,
            min_nodes=config.fewest_nodes,
            nproc_per_node=config.nproc_per_node,
            versions=_versions(),
            host=socket.gethostname(),
        )

        def on_tick(snap: RunSnapshot) -> None:
            view.update(snap)
            events.observe(snap, registry.drain_transitions())

        def on_generation_end(result: GenerationResult, restarting: bool) -> None:
            # The generation ended between two ticks: record what happened up to its end.
            events.observe(registry.snapshot(), registry.drain_transitions())
            _reap_adopted()
            # The last generation's failure is logged with the full report, further below.
            if restarting and result.outcome is not Outcome.RESIZED:
                root = _root_record(result)
                if result.outcome in (Outcome.FAILED, Outcome.HUNG):
                    summary = {
                        "outcome": result.outcome.value,
                        "message": result.message,
                        "root_rank": result.root_rank,
                    }
                    events.emit("failure", generation=result.generation, report=summary, **summary)
                events.emit(
                    "restart",
                    generation=result.generation + 1,
                    reason=result.message,
                    rank=result.root_rank,
                    exit=root.exit if root else None,
                )
                # The next generation has not begun: this is the registry's next restart.
                view.write_line(
                    format_restart_line(
                        root, result.message, result.generation + 1, config.restart.max_restarts, registry.restarts + 1
                    )
                )

        def on_resized(result: GenerationResult) -> None:
            snap = registry.snapshot()
            events.emit(
                "resize",
                generation=snap.generation,
                reason=result.message,
                nnodes=snap.nnodes,
                world_size=snap.world_size,
            )
            view.write_line(format_resize_line(result.message, snap.generation, snap.nnodes, snap.world_size))

        def say(message: str) -> None:
            view.write_line(f"[ddp-launch] {message}")

        def sink(rank: int, lines: Sequence[str], is_stderr: bool) -> None:
            view.write_lines(lines, file=stderr if is_stderr else stdout, prefix=f"[rank {rank}] ")

        def live(rank: int, state: str | None, is_stderr: bool) -> None:
            text = None if state is None else f"[rank {rank}] {state}"
            view.write_live((rank, is_stderr), text, file=stderr if is_stderr else stdout)

        pump = OutputPump(
            run_dir,
            sink,
            live=live,
            live_policy=TERMINAL if view.interactive else PIPE,
            logs=config.logs,
            run_id=config.run_id,
            role=config.role,
            node_rank=config.node_rank,
            nproc_per_node=config.nproc_per_node,
        )
        teardown.callback(pump.stop)
        snapshot_dir = _snapshot_dir(config, run_dir)
        teardown.callback(snapshots.remove_directory, snapshot_dir)  # after the last worker
        teardown.callback(_stop_all_descendants, config.restart.stop_grace_s)
        _become_subreaper()
        bootstrap = _bootstrap(config, server.address, token, run_dir)

        start_worker = _worker_starter(config, pump, bootstrap, snapshot_dir)

        with signals_as_stop_requests(config.signals) as (wakeup_fd, requests):
            supervisor = Supervisor(
                config,
                registry,
                start_worker,
                pump,
                on_tick=on_tick,
                on_generation_end=on_generation_end,
                wakeup_fd=wakeup_fd,
                say=say,
                on_resized=on_resized,
            )
            requests.append(supervisor.request_stop)
            # SIGTSTP named in --signals-to-handle stops the run instead, as under torchrun.
            pause = signal.SIGTSTP not in config.signals
            with _terminal_stop_pauses(supervisor) if pause else contextlib.nullcontext():
                result = supervisor.run()
        final = registry.snapshot()
        view.update(final)
        view.close()
        events.observe(final, registry.drain_transitions())
        local_ranks = [config.node_rank * config.nproc_per_node + i for i in range(config.nproc_per_node)]
        pump.wait_closed(local_ranks, timeout_s=2.0)
        summary = format_summary(
            final, wall_s=result.wall_s, restarts=result.restarts, optimizer_steps_all=_optimizer_steps_all(result)
        )
        report_text = ""
        if result.outcome is not Outcome.SUCCEEDED:
            report = build_report(result, {r: pump.tail(r, 50) for r in local_ranks})
            rundir.write_json_atomic(rundir.failure_file(run_dir), report)
            report_text = format_report(report, run_dir)
            if result.outcome in (Outcome.FAILED, Outcome.HUNG):
                last = result.last
                events.emit(
                    "failure",
                    generation=last.generation,
                    report=report,
                    outcome=last.outcome.value,
                    message=last.message,
                    root_rank=last.root_rank,
                )
        exit_code = _exit_code(result)
        # Other nodes' launchers follow the run: they stop their workers and exit too.
        registry.end_run(result.outcome.value, result.last.message, exit_code)
        events.emit(
            "run_end",
            outcome=result.outcome.value,
            exit_code=exit_code,
            wall_s=round(result.wall_s, 3),
            restarts=result.restarts,
            final_step=final.step,
            summary=_summary_fields(final, result),
        )
        return LaunchResult(exit_code, result, summary, report_text)


def _follow(config: RunConfig, stdout: TextIO, stderr: TextIO) -> LaunchResult:
    """A node other than node 0: workers for the generations node 0's master names, as the
    node rank it names, until the run ends."""
    address = f"[{config.master_addr}]" if ":" in config.master_addr else config.master_addr
    address += f":{config.control_port}"
    # keepalive: a master whose host vanished is noticed in seconds, not never.
    client = MasterClient(address, config.token, tls_ca=str(config.tls.ca) if config.tls.ca else None, keepalive=True)
    agent_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    with contextlib.ExitStack() as teardown:
        teardown.callback(client.close)

        def say(message: str) -> None:
            node = "node" if config.node_rank < 0 else f"node {config.node_rank}"
            print(f"[ddp-launch] {node}: {message}", file=stderr, flush=True)

        try:
            config = _with_masters_run_id(config, client)
        except MasterUnreachable as e:
            # The whole --join-timeout went to reaching it: nothing was started.
            return LaunchResult(EXIT_MASTER_LOST, None, f"ddp-launch: {e}", "")
        run_dir = config.resolved_run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create run directory {str(run_dir)!r}: {e.strerror}") from None

        def sink(rank: int, lines: Sequence[str], is_stderr: bool) -> None:
            stream = stderr if is_stderr else stdout
            stream.write("".join(f"[rank {rank}] {line}\n" for line in lines))
            stream.flush()

        def live(rank: int, state: str | None, is_stderr: bool) -> None:
            if state is not None:  # a plain line of its own: this node draws no bars
                sink(rank, [state], is_stderr)

        # Started before any worker and stopped after the last one (teardown runs in reverse).
        relay = HeartbeatRelay(
            node_rank=config.node_rank,
            master_address=address,
            token=config.token,
            interval_s=config.heartbeat_interval_s,
            tls_ca=str(config.tls.ca) if config.tls.ca else None,
            say=say,
            agent_id=agent_id,
        )
        relay.start()
        teardown.callback(relay.stop)
        pump = OutputPump(
            run_dir,
            sink,
            live=live,
            logs=config.logs,
            run_id=config.run_id,
            role=config.role,
            node_rank=max(config.node_rank, 0),
            nproc_per_node=config.nproc_per_node,
        )
        teardown.callback(pump.stop)
        snapshot_dir = _snapshot_dir(config, run_dir)
        teardown.callback(snapshots.remove_directory, snapshot_dir)
        teardown.callback(_stop_all_descendants, config.restart.stop_grace_s)
        _become_subreaper()
        bootstrap = _bootstrap(config, address, config.token, run_dir) | {"heartbeat_relay": relay.address}
        start_worker = _worker_starter(config, pump, bootstrap, snapshot_dir)
        started = time.monotonic()
        with signals_as_stop_requests(config.signals) as (wakeup_fd, requests):
            follower = Follower(config, client, start_worker, wakeup_fd, say, agent_id=agent_id)
            requests.append(follower.request_stop)
            result = follower.run()
        node = "" if config.node_rank < 0 else f" node {config.node_rank}"
        summary = (
            f"ddp-launch{node}: {result.message} "
            f"({time.monotonic() - started:.0f} s, {result.generations} generation(s))"
        )
        return LaunchResult(result.exit_code, None, summary, "")


class MasterUnreachable(Exception):
    """A node's master did not answer within --join-timeout."""


def _start_master(config: RunConfig, token: str) -> tuple[Registry, MasterServer]:
    """Node 0's registry and its gRPC master, listening.

    Raises:
        PortInUse: the control port is taken.
    """
    registry = Registry(
        run_id=config.run_id,
        nnodes=config.nnodes,
        local_world_size=config.nproc_per_node,
        max_restarts=config.restart.max_restarts,
        ddp_addr=config.ddp_addr or config.master_addr,
        ddp_port=config.ddp_port,
        min_nodes=config.fewest_nodes,
        barrier_waits_for_rank0=True,  # rank 0's worker serves the DDP store first
    )
    server = MasterServer(registry, token, host=config.master_addr, port=config.control_port or 0, tls=config.tls)
    server.start()
    return registry, server


def _joining(config: RunConfig) -> RunConfig:
    """This node as one that joins the run of the launcher holding the endpoint."""
    return dataclasses.replace(config, node_rank=NODE_BY_ARRIVAL, host_by_guess=False)


def _with_masters_run_id(config: RunConfig, client: MasterClient) -> RunConfig:
    """Every node names its run directory and logs by the master's run id: the first answer
    of the master (within --join-timeout) tells it. A run id this node was given that is not
    the master's is an error that names both.

    Raises:
        ConfigError: the ids differ.
        MasterUnreachable: the master did not answer within --join-timeout.
    """
    try:
        status = client.wait_for_status(config.join_timeout_s)
    except grpc.RpcError as e:
        if e.code() in TRANSIENT:
            raise MasterUnreachable(
                f"the master at {client.address} could not be reached within --join-timeout "
                f"({config.join_timeout_s:g} s)"
            ) from None
        return config  # it refused (the token): the follower says so, and ends
    if status.run_id == config.run_id:
        return config
    if config.run_id_given:
        raise ConfigError(
            f"this node's run id {config.run_id!r} (--rdzv-id/--run-id) is not the master's {status.run_id!r}"
        )
    default_dir = config.resolved_run_dir == Path("runs") / config.run_id
    return dataclasses.replace(config, run_id=status.run_id, run_dir=None if default_dir else config.run_dir)


def _bootstrap(config: RunConfig, control_addr: str, token: str, run_dir: Path) -> dict:
    """What every worker of this node needs to find the master (env.Bootstrap's fields)."""
    return dict(
        control_addr=control_addr,
        token=token,
        node_rank=config.node_rank,
        generation=0,
        backend=config.backend,
        heartbeat_interval_s=config.heartbeat_interval_s,
        master_lost_timeout_s=max(30.0, 10 * config.heartbeat_interval_s),
        join_timeout_s=config.join_timeout_s,
        run_dir=str(run_dir.resolve()),
        tls_ca=str(config.tls.ca.resolve()) if config.tls.ca else "",
        launcher_pid=os.getpid(),
        virtual_local_rank=config.virtual_local_rank,
        unset_env=quiet_grpc_forks(),
    )


def _snapshot_dir(config: RunConfig, run_dir: Path) -> Path:
    """This node's memory for the workers' snapshots (ddp_launch.checkpoint.snapshot): kept
    across generations, removed when the run ends."""
    try:
        return snapshots.make_directory(config.run_id, run_dir)
    except OSError as e:
        raise ConfigError(str(e)) from None


def _worker_starter(
    config: RunConfig, pump: OutputPump, bootstrap: dict, snapshot_dir: Path | None = None
) -> _WorkerStarter:
    """start_worker(local_rank, generation, node_rank): forks one worker from the warm forkserver (or,
    with --start-method spawn, starts a fresh interpreter), its stdout and stderr on pipes
    that the output pump reads, its stdin the launcher's. Its `prepare` forks one ahead of a
    restart (see `_WorkerStarter`)."""
    context: Any = forkserver_context() if config.start_method == START_WARM else multiprocessing.get_context("spawn")
    signal_names = ",".join(signal.Signals(s).name for s in config.signals)
    node_env = env.node_env(config.nproc_per_node, os.environ, config.role, signal_names)
    if config.nnodes > 1:  # across hosts gloo and NCCL must bind what reaches the others
        node_env |= socket_ifname_env(config.ddp_addr or config.master_addr, os.environ)
    if snapshot_dir is not None:
        node_env[snapshots.SNAPSHOT_DIR_ENV] = str(snapshot_dir)
    return _WorkerStarter(config, pump, bootstrap, context, node_env)


@dataclass
class _Standby:
    process: Any
    go: multiprocessing.connection.Connection
    out_r: int
    err_r: int


class _WorkerStarter:
    """Starts workers; with `prepare`, a restart's workers are forked while the generation
    before them trains. Each such standby has done the fork and waits, idle, on a pipe: a
    restart then only tells it to go (`__call__` takes it when it is alive), and the fork no
    longer sits between a death and the next generation's barrier. `discard` kills those a
    run did not need."""

    def __init__(self, config: RunConfig, pump: OutputPump, bootstrap: dict, context: Any, node_env: dict) -> None:
        self._config, self._pump, self._bootstrap = config, pump, bootstrap
        self._context, self._node_env = context, node_env
        self._standbys: dict[tuple[int, int, int], _Standby] = {}
        # A forked worker is the forkserver's child: its exit is seen through a pidfd
        # (run/exits.py). A spawned one is this launcher's, whose own sentinel is as quick.
        self._watch = config.start_method == START_WARM

    def __call__(self, local_rank: int, generation: int, node_rank: int) -> Any:
        rank = node_rank * self._config.nproc_per_node + local_rank
        if self._pump.torchrun_logs is not None:  # attempt_<generation>, afresh, before its workers run
            self._pump.torchrun_logs.begin(generation)
        standby = self._standbys.pop((local_rank, generation, node_rank), None)
        if standby is not None:
            if self._go(standby):
                self._attach(rank, standby.out_r, standby.err_r, standby.process, generation, local_rank)
                return self._watched(standby.process)
            self._drop(standby)
        _await_dying_forkserver()

        def make() -> tuple[Any, list[Any], list[int], None]:
            env_, conns, (out_r, err_r) = self._worker_env(local_rank, generation, node_rank)
            process = self._context.Process(
                target=worker_main, args=(env_, self._config.target, *conns), name=f"ddp-launch-rank-{rank}"
            )
            return process, conns, [out_r, err_r], None

        process, (out_r, err_r), _ = _start(make)
        self._attach(rank, out_r, err_r, process, generation, local_rank)
        return self._watched(process)

    def _watched(self, process: Any) -> Any:
        return WatchedProcess(process) if self._watch else process

    def prepare(self, local_rank: int, generation: int, node_rank: int) -> None:
        """Fork the worker of (local_rank, generation, node_rank) now, to wait for its start."""
        key = (local_rank, generation, node_rank)
        if key in self._standbys:
            return

        def make() -> tuple[Any, list[Any], list[int], Any]:
            env_, conns, (out_r, err_r) = self._worker_env(local_rank, generation, node_rank)
            go_r, go_w = multiprocessing.Pipe(duplex=False)
            process = self._context.Process(
                target=standby_main,
                args=(env_, self._config.target, *conns, go_r),
                name=f"ddp-launch-standby-{local_rank}",
            )
            return process, [*conns, go_r], [out_r, err_r], go_w

        process, (out_r, err_r), go_w = _start(make)
        self._standbys[key] = _Standby(process, go_w, out_r, err_r)

    def discard(self) -> None:
        """Kill the standbys no generation took (idle: nothing of theirs is lost)."""
        for standby in self._standbys.values():
            self._drop(standby)
        for standby in self._standbys.values():
            # Reaped by the forkserver before it goes: else they outlive the run as zombies.
            standby.process.join(timeout=2.0)
        self._standbys.clear()

    def _go(self, standby: _Standby) -> bool:
        # exitcode reads the forkserver's status pipe: a standby whose forkserver died (it
        # was SIGKILLed) reads as gone, though the process itself may live on, reparented.
        if standby.process.exitcode is not None:
            return False
        try:
            standby.go.send(True)
        except OSError:
            return False
        standby.go.close()
        return True

    def _drop(self, standby: _Standby) -> None:
        with contextlib.suppress(OSError):
            standby.go.close()
        if standby.process.pid:
            signal_quietly(standby.process.pid, signal.SIGKILL)
        for fd in (standby.out_r, standby.err_r):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _worker_env(self, local_rank: int, generation: int, node_rank: int) -> tuple[dict, list, tuple[int, int]]:
        attempt_dir = ""
        if self._pump.torchrun_logs is not None:  # TORCHELASTIC_ERROR_FILE goes in torchrun's tree
            attempt_dir = str(self._pump.torchrun_logs.attempt_dir(generation).resolve())
        fields = {**self._bootstrap, "generation": generation, "attempt_dir": attempt_dir, "node_rank": node_rank}
        worker_env = self._node_env | env.Bootstrap(local_rank=local_rank, **fields).to_env()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        conns: list[Any] = [
            _shared_stdin(),
            multiprocessing.connection.Connection(out_w, readable=False),
            multiprocessing.connection.Connection(err_w, readable=False),
        ]
        return worker_env, conns, (out_r, err_r)

    def _attach(self, rank: int, out_r: int, err_r: int, process: Any, generation: int, local_rank: int) -> None:
        self._pump.attach(
            rank,
            out_r,
            err_r,
            f"generation {generation}, pid {process.pid}, {time.strftime('%c')}",
            generation=generation,
            local_rank=local_rank,
        )


Attempt = tuple[Any, list[Any], list[int], Any]  # process, its ends of the pipes, ours, and extra


def _start(make: Callable[[], Attempt]) -> tuple[Any, list[int], Any]:
    """Start the process `make()` builds; returns it, our ends of its pipes, and the extra.

    When the forkserver dies under the fork (it was killed: its workers' status pipes closed
    before it was a zombie, so a restart that came that fast found it "alive", asked it for
    a fork and read EOF), the fork is asked again, once, of the new forkserver
    multiprocessing starts once the old one is a zombie: with new pipes. The old one may
    have forked the child before it died, without saying so: that twin, now this launcher's
    orphan, keeps the first pipes, which are closed here, so it never has a go (a standby
    ends at the end of its go pipe) nor shares a pipe with the process that replaces it. A
    standby's twin sharing the go pipe could take the go, and its rank would never register:
    what the soak's wedged runs showed (three ranks at the barrier, the fourth never came).
    """
    for retry in (False, True):
        process, theirs, ours, extra = make()
        try:
            process.start()
            return process, ours, extra
        except (EOFError, OSError):
            for fd in ours:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if extra is not None:
                with contextlib.suppress(OSError):
                    extra.close()
            if retry or not _forkserver_dead():
                raise
        finally:
            for conn in theirs:
                if conn is not None:
                    conn.close()
    raise AssertionError("unreachable")


def _forkserver_dead(timeout_s: float = 10.0) -> bool:
    """Whether the warm forkserver has died: waits (up to `timeout_s`) for it to become a
    zombie, without reaping it (multiprocessing does, when it starts the next one)."""
    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    if pid is None:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _is_zombie(pid):
            return True
        time.sleep(0.01)
    return False


def _await_dying_forkserver() -> None:
    """A forkserver that is exiting (killed: Linux's PF_EXITING flag is set) is waited for
    until it is a zombie, so that multiprocessing starts a new one for the next fork
    instead of asking the dying one, which may never answer."""
    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    if pid is not None and _exiting(pid):
        _forkserver_dead()


_PF_EXITING = 0x4


def _exiting(pid: int) -> bool | None:
    """Whether the process is exiting or has exited (a zombie); None when it is gone or
    /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0] == "Z" or bool(int(fields[6]) & _PF_EXITING)
    except (OSError, IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _shared_stdin() -> multiprocessing.connection.Connection | None:
    """A copy of the launcher's stdin for one worker, or None when the launcher has none."""
    if sys.__stdin__ is None:  # fd 0 was closed when Python started: it may be anything now
        return None
    try:
        return multiprocessing.connection.Connection(os.dup(0), writable=False)
    except OSError:
        return None


def _root_record(result: GenerationResult) -> RankRecord | None:
    """The rank that ended the generation, as the snapshot taken after the stop saw it."""
    if result.root_rank is None or result.snapshot is None:
        return None
    return next((r for r in result.snapshot.ranks if r.rank == result.root_rank), None)


def _optimizer_steps_all(result: RunResult) -> int:
    """The slowest rank's optimizer steps summed over every generation (redone ones too)."""
    return sum(g.snapshot.optimizer_steps for g in result.generations if g.snapshot is not None)


def _summary_fields(snap: RunSnapshot, result: RunResult) -> dict:
    """run_end's summary: the figures of the console summary, by the same rules."""
    spread, slowest = snap.rate_spread, snap.slowest
    return {
        "final_step": snap.step,
        "step_reported": snap.step_reported,
        "optimizer_steps": snap.optimizer_steps,
        "optimizer_steps_all_generations": _optimizer_steps_all(result),
        "total_steps": snap.total_steps,
        "samples": snap.samples,
        "last_loss_mean_over_ranks": snap.loss,
        "steps_per_s": None if spread is None else dict(zip(("min", "median", "max"), spread)),
        "slowest_rank": slowest.rank if slowest else None,
        "generations": len(result.generations),
    }


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "ddp_launch": __version__, "grpc": grpc.__version__}
    try:  # without importing torch in the launcher
        found["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    return found


def _exit_code(result: RunResult) -> int:
    last = result.last
    if result.outcome is Outcome.SUCCEEDED:
        return 0
    if result.outcome is Outcome.INTERRUPTED:
        return 128 + (last.signal_number or signal.SIGTERM)
    if result.outcome is Outcome.TIMED_OUT:
        return EXIT_TIMEOUT
    if result.outcome is Outcome.FAILED and last.failures:
        return shell_exit_code(last.failures[0].exit_code)
    return EXIT_HUNG


def _make_run_dir(config: RunConfig, server: MasterServer, token: str) -> Path:
    run_dir = config.resolved_run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create run directory {str(run_dir)!r}: {e.strerror}") from None
    # The token stays out of this file: anyone who can read the run directory could use it.
    master = {"host": server.host, "port": server.port, "pid": os.getpid(), "run_id": config.run_id}
    if config.metrics_port is not None:
        master["metrics_port"] = config.metrics_port
    if config.tls.ca is not None:
        master["tls_ca"] = str(config.tls.ca.resolve())
    rundir.write_token(run_dir, token)
    rundir.write_json_atomic(rundir.master_file(run_dir), master)
    return run_dir


def _become_subreaper() -> None:
    """Orphaned grandchildren (a dead worker's DataLoader processes) are re-parented to the
    launcher instead of init, so the final clean-up still finds and stops them."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _helpers() -> set[int | None]:
    """multiprocessing's own helpers below the launcher: the forkserver, the resource tracker."""
    return {
        getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None),
        getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None),
    }


def _children() -> list[psutil.Process]:
    """This launcher's own children (the helpers, and the orphans it adopted)."""
    try:
        return psutil.Process().children(recursive=False)
    except psutil.Error:
        return []


def _reap_adopted() -> None:
    """Reap the zombies this launcher adopted as the subreaper (a dead worker's DataLoader
    processes, a standby whose forkserver died), so that they do not pile up restart after
    restart, or outlive the run. Only zombies: a worker's own Popen reaps a live child."""
    helpers, children = _helpers(), _children()
    for child in children:
        with contextlib.suppress(psutil.Error, ChildProcessError, OSError):
            if child.pid not in helpers and child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)


def _stop_all_descendants(grace_s: float) -> None:
    """The last line of defence: nothing this launcher started outlives it.

    multiprocessing's own helpers (the forkserver and the resource tracker, which ignores
    SIGTERM) hold no user state and are killed at once; anything else still here (orphaned
    grandchildren of workers) gets the usual SIGTERM and grace, and is reaped.
    """
    helpers, children = _helpers(), _children()
    for child in children:
        if child.pid in helpers:
            with contextlib.suppress(psutil.Error):
                child.kill()
    stop_process_trees([c.pid for c in children if c.pid not in helpers], grace_s)
    psutil.wait_procs([c for c in children if c.pid in helpers], timeout=2.0)
    _reap_adopted()


@contextlib.contextmanager
def _terminal_stop_pauses(supervisor: Supervisor) -> Iterator[None]:
    """Ctrl-Z (SIGTSTP) pauses the whole run, and `fg`/`bg` continues it.

    The workers are in sessions of their own, so the terminal's SIGTSTP stops only the
    launcher's group: without this, the workers would train on without a master and give
    up on it after 30 s.
    """

    def on_stop(signum: int, frame: object) -> None:
        supervisor.pause()
        os.kill(os.getpid(), signal.SIGSTOP)  # returns once the shell continues us (SIGCONT)
        supervisor.resume()

    previous = signal.signal(signal.SIGTSTP, on_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTSTP, previous)

"""The manual mode: a master alone in one terminal, workers started by hand in others.

    terminal 1:    ddp-launch master --world-size 4
    terminals 2-5: ddp-launch worker examples/train_mlp.py

Each worker registers, takes the lowest free rank, waits at the barrier and trains; the
master's terminal shows the live view and ends when every rank has ended. Nobody restarts
anything here (there is no launcher owning the workers): a failure or a hang ends the run
with a report. The master writes master.json and the token into its run directory, where
a worker started in the same directory (or beside ./runs) finds them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from ddp_launch import env, rundir
from ddp_launch.config import Target, new_run_id
from ddp_launch.control.master import MasterServer
from ddp_launch.errors import ConfigError
from ddp_launch.observe.view import LiveView, format_summary
from ddp_launch.registry import RankState, Registry
from ddp_launch.run.group import wait
from ddp_launch.run.signals import signals_as_stop_requests

DEFAULT_PORT = 50051
TICK_S = 0.25


def run_master(
    *,
    world_size: int,
    host: str,
    port: int,
    run_dir: Path | None,
    hang_timeout_s: float,
    quiet: bool,
    stderr: TextIO | None = None,
) -> int:
    """Serve one run of `world_size` hand-started workers; returns the exit code."""
    stderr = stderr or sys.stderr
    if world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    run_id = new_run_id()
    run_dir = run_dir or Path("runs") / run_id
    token = os.environ.get(env.TOKEN) or secrets.token_urlsafe(24)
    registry = Registry(
        run_id=run_id,
        nnodes=world_size,
        local_world_size=1,
        max_restarts=0,
        ddp_addr=host,
        barrier_waits_for_rank0=True,
    )
    server = MasterServer(registry, token, host, port)
    server.start()
    stop: list[int] = []
    view = LiveView(stderr, enabled=not quiet)
    started = time.monotonic()
    teardown = contextlib.ExitStack()
    try:
        wakeup_fd, requests = teardown.enter_context(signals_as_stop_requests((signal.SIGINT, signal.SIGTERM)))
        requests.append(stop.append)
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_token(run_dir, token)
        rundir.write_json_atomic(
            rundir.master_file(run_dir), {"host": host, "port": server.port, "pid": os.getpid(), "run_id": run_id}
        )
        print(
            f"[ddp-launch] master of run {run_id} listening on {server.address}, waiting for {world_size} workers:\n"
            f"[ddp-launch]   ddp-launch worker SCRIPT [ARGS]   (in {Path.cwd()}; elsewhere add --master "
            f"{server.address} and DDP_LAUNCH_TOKEN from {rundir.token_file(run_dir)})",
            file=stderr,
            flush=True,
        )
        code, message = _watch(registry, view, hang_timeout_s, stop, wakeup_fd)
        registry.end_run("succeeded" if code == 0 else "failed", message, code)
        snap = registry.snapshot()
        view.close()
        print(format_summary(snap, wall_s=time.monotonic() - started, restarts=0), file=stderr)
        if code:
            print(f"ddp-launch: run failed: {message}", file=stderr)
            failed = next((r for r in snap.ranks if r.traceback), None)
            if failed is not None:
                print(f"  traceback of rank {failed.rank}:\n" + failed.traceback.rstrip(), file=stderr)
        return code
    finally:
        view.close()
        teardown.close()  # the previous signal handlers are back
        server.stop(grace_s=1.0)
        rundir.remove_token(run_dir)


def _watch(
    registry: Registry, view: LiveView, hang_timeout_s: float, stop: list[int], wakeup_fd: int
) -> tuple[int, str]:
    while True:
        wait((), [wakeup_fd], TICK_S)  # the same wait as the supervisor's, with no workers of its own
        if stop:
            return 128 + stop[0], f"stopped by {signal.Signals(stop[0]).name}"
        snap = registry.snapshot()
        view.update(snap)
        failed = [r for r in snap.ranks if r.state is RankState.FAILED]
        if failed:
            r = failed[0]
            return 1, f"rank {r.rank} (pid {r.pid} on {r.hostname}) ended with exit code {r.exit_code}"
        if all(r.state is RankState.DONE for r in snap.ranks):
            return 0, "every rank finished"
        hung = registry.find_hung(hang_timeout_s)
        if hung:
            return 1, f"rank {hung[0].rank} hung: {hung[0].reason}"


def worker_environ(master: str, token: str, tls_ca: str | None) -> dict[str, str]:
    """The bootstrap variables of a hand-started worker: any free rank, generation 0."""
    return env.Bootstrap(
        control_addr=master,
        token=token,
        node_rank=-1,
        local_rank=0,
        generation=0,
        backend="auto",
        heartbeat_interval_s=1.0,
        master_lost_timeout_s=30.0,
        join_timeout_s=300.0,
        tls_ca=tls_ca or "",
    ).to_env()


def run_worker(target: Target, master: str, token: str, tls_ca: str | None) -> None:
    """Become a worker of the master at `master`; never returns."""
    from ddp_launch.run.worker import run_by_hand

    target.validate()
    run_by_hand(worker_environ(master, token, tls_ca), target)

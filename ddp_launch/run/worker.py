"""Inside a worker: register, take the torchrun environment, wait at the barrier, run the script.

`worker_main` is the target the supervisor forks (from a warm process that has already
imported torch). It reads everything it needs from the environment it is given (the
bootstrap variables), never from a pickled config, and ends with `os._exit` once the
script is done: interpreter teardown after gloo has been seen to abort finished runs.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import faulthandler
import functools
import os
import runpy
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from ddp_launch import env
from ddp_launch.config import Target
from ddp_launch.run import fresh

# Python stacks of every thread go to the rank's log on this signal (hang reports).
# Not SIGUSR1: PyTorch Lightning uses that one on SLURM.
STACK_DUMP_SIGNAL = signal.SIGUSR2
EXIT_BOOTSTRAP_FAILED = 1
BARRIER_MARGIN_S = 5.0  # see wait_barrier in worker_main
EXIT_MASTER_LOST = 1
STANDBY_CONNECT_S = 5.0
_connected: Any = None  # a standby's MasterClient, connected before its go
_PR_SET_PDEATHSIG = 1


def worker_main(
    environ: dict[str, str],
    target: Target,
    stdin: Connection | None,
    stdout: Connection,
    stderr: Connection,
) -> None:
    """Run one worker to the end; never returns.

    Args:
        environ: bootstrap variables (env.Bootstrap) and the node's torchrun variables, to
            add to the inherited environment.
        target: the script, module or program to run.
        stdin: the launcher's stdin (None when it has none): every worker shares it, as
            torchrun's do, so `breakpoint()` reads from the terminal.
        stdout, stderr: write ends of the pipes the launcher reads (prefixes and logs them).

    The worker leads a session of its own, as torchrun's workers do. A terminal's Ctrl-C
    then reaches the launcher alone, which forwards it once: in the launcher's process
    group a worker got it twice (from the terminal, then from the launcher), and the second
    KeyboardInterrupt cut short whatever the script does on the first, such as saving a
    checkpoint. A session is also what Linux shares CPU time between (autogroups), so under
    load the workers get the share torchrun's do.
    """
    os.setsid()
    fresh.install_stdio(stdin.fileno() if stdin is not None else None, stdout.fileno(), stderr.fileno())
    for conn in (stdin, stdout, stderr):
        if conn is not None:
            conn.close()
    # This also closes the worker's copy of the launcher's end of the forkserver's "alive"
    # pipe, which multiprocessing hands to every forked child: while a worker held it, the
    # forkserver never saw the launcher die, so it never exited, the parent-death signal
    # below never fired, and a SIGKILLed launcher left its workers running.
    fresh.reset_multiprocessing()
    warm = sys.modules.get("ddp_launch.run.warm")  # preloaded: absent in a spawned worker
    if warm is not None:
        fresh.restore_environment(warm.ENV_BEFORE_PRELOAD)
    _die_with_parent()
    _run_and_exit(environ, target)


def standby_main(
    environ: dict[str, str],
    target: Target,
    stdin: Connection | None,
    stdout: Connection,
    stderr: Connection,
    go: Connection,
) -> None:
    """A worker forked ahead of a restart: idle until the launcher says go, then
    `worker_main`. The end of `go` without a word (the run needed no restart, or the
    launcher died) ends it, having done nothing."""
    fresh.set_standby_title(environ.get(env.LOCAL_RANK, "?"))
    global _connected
    try:
        # The connection to the master is made while idle: at the restart it is there.
        from ddp_launch.control.client import MasterClient

        boot = env.Bootstrap.from_env(environ)
        _connected = MasterClient(boot.control_addr, boot.token, tls_ca=boot.tls_ca or None)
        _connected.connect(STANDBY_CONNECT_S)
    except Exception:  # the worker makes its own, as one that was not forked ahead does
        _connected = None
    try:
        go.recv()
    except (EOFError, OSError):
        os._exit(0)
    go.close()
    worker_main(environ, target, stdin, stdout, stderr)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent dies, so a killed launcher (its
    forkserver exits with it) leaves no orphan, whatever the script is doing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(EXIT_MASTER_LOST)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the pid: ours is gone
        return False
    return True


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _say(message: str) -> None:
    print(f"[ddp-launch] {message}", file=sys.stderr, flush=True)


def _run(target: Target) -> int:
    # Imported here, after the fork: gRPC must not exist in the warm parent.
    from ddp_launch.control.client import MasterClient
    from ddp_launch.control.heartbeat import HeartbeatThread
    from ddp_launch.errors import MasterUnavailable, RegistrationRejected
    from ddp_launch.progress import tracker

    boot = env.Bootstrap.from_env()
    if boot.launcher_pid and not _alive(boot.launcher_pid):
        # Forked after its launcher died (the forkserver was still importing torch when the
        # launcher was killed): it must not join whatever run now serves that address.
        _say(f"the launcher (pid {boot.launcher_pid}) that started this worker is gone; not starting")
        return EXIT_BOOTSTRAP_FAILED
    faulthandler.register(STACK_DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
    client = _connected or MasterClient(boot.control_addr, boot.token, tls_ca=boot.tls_ca or None)
    try:
        # A negative node rank: a worker started by hand, which takes any free rank.
        assignment = client.register(
            node_rank=max(boot.node_rank, 0),
            local_rank=boot.local_rank,
            generation=boot.generation,
            deadline_s=boot.join_timeout_s,
            any_slot=boot.node_rank < 0,
        )
        # The script runs in this process (not with --no-python): rank 0 hosts the DDP store
        # here, before the barrier, so nobody's init_process_group finds it missing.
        agent_store = not target.no_python
        os.environ.update(
            env.torchrun_env(
                assignment,
                os.environ,
                boot.run_dir,
                virtual_local_rank=boot.virtual_local_rank,
                attempt_dir=boot.attempt_dir,
                agent_store=agent_store,
            )
        )
        fresh.set_title(assignment.rank, target.argv, target.is_module)
        if not target.no_python:
            _configure_torch(assignment, boot.backend, boot.virtual_local_rank)
        if agent_store and assignment.rank == 0:
            _host_ddp_store(assignment)
        # A little longer than the launcher's own --join-timeout: its verdict names the ranks
        # that never came; this worker's own would only say that it waited.
        client.wait_barrier(
            rank=assignment.rank, generation=assignment.generation, deadline_s=boot.join_timeout_s + BARRIER_MARGIN_S
        )
    except (MasterUnavailable, RegistrationRejected) as e:
        _say(f"worker (local rank {boot.local_rank}) could not start: {e}")
        client.close()
        return EXIT_BOOTSTRAP_FAILED

    def master_lost(message: str) -> None:
        _say(message)
        _flush_stdio()
        os._exit(EXIT_MASTER_LOST)

    # The relay listens on loopback without TLS: the token never leaves this machine there.
    relay = MasterClient(boot.heartbeat_relay, boot.token) if boot.heartbeat_relay else None
    heartbeats = HeartbeatThread(
        client,
        assignment,
        tracker.snapshot,
        interval_s=boot.heartbeat_interval_s,
        master_lost_timeout_s=boot.master_lost_timeout_s,
        on_master_lost=master_lost,
        stream_client=relay,
    )
    from torch.optim.optimizer import register_optimizer_step_post_hook

    hook = register_optimizer_step_post_hook(tracker.on_optimizer_step)
    heartbeats.start()
    for name in boot.unset_env:  # the launcher's settings for our gRPC, not the script's
        os.environ.pop(name, None)
    try:
        code = run_target(target, on_exception=lambda e, tb: _report(client, assignment, e, tb))
        _join_script_threads()  # while the heartbeats still tell the master this rank lives
    finally:
        hook.remove()
        heartbeats.stop()
        heartbeats.send_now()
    try:
        atexit._run_exitfuncs()
    except BaseException:  # an atexit handler failing must not turn success into a crash
        traceback.print_exc()
    if boot.node_rank < 0:  # no launcher watches this process: tell the master how it ended
        try:
            client.report_exit(assignment.rank, assignment.generation, code)
        except Exception as e:
            _say(f"could not tell the master how this worker ended: {e!r}")
    if relay is not None:
        relay.close()
    client.close()
    return code


def _join_script_threads() -> None:
    """Wait for the script's non-daemon threads, as the interpreter does before its atexit
    handlers (an executor's last task, a checkpoint saved in the background). The
    launcher's own threads are daemons."""
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()


def run_by_hand(environ: dict[str, str], target: Target) -> None:
    """`ddp-launch worker`: this process is the worker (no launcher, no fork); never returns."""
    _run_and_exit(environ, target)


def _run_and_exit(environ: dict[str, str], target: Target) -> None:
    os.environ.update(environ)
    code = EXIT_BOOTSTRAP_FAILED
    try:
        code = _run(target)
    except BaseException:
        _say("the worker's bootstrap failed:")
        traceback.print_exc()
    finally:
        _flush_stdio()
        if code < 0:  # a --no-python program died of a signal: so does this worker
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
            code = 128 - code
        os._exit(code)


def _report(client, assignment, e: BaseException, tb_text: str) -> None:
    try:
        client.report_failure(assignment, type(e).__name__, tb_text)
    except Exception as rpc_error:  # the traceback is in the log anyway
        _say(f"could not send the traceback to the master: {rpc_error!r}")


_ddp_store: object = None  # rank 0's TCPStore server: it lives as long as the worker
LIBUV_STORE_FROM_RANKS = 1024


def _host_ddp_store(assignment: env.Assignment) -> None:
    """Rank 0 serves the generation's DDP store (MASTER_PORT) before the start barrier.

    When rank 0's own init_process_group started it, the other ranks' often came first and
    found nothing listening: torch's TCPStore client then retries after a back-off that cost
    about half a second in most restarts. Served here, it is up before any rank passes the
    barrier (the master opens it only once rank 0 waits there), and every rank connects as
    a client (TORCHELASTIC_USE_AGENT_STORE=True, as under torchrun's agent store).

    Raises:
        MasterUnavailable: the port cannot be bound (the generation fails at once, instead of
            every rank waiting for a store that never comes).
    """
    global _ddp_store
    import datetime

    from torch.distributed import TCPStore

    from ddp_launch.errors import MasterUnavailable

    try:
        _ddp_store = TCPStore(
            host_name=assignment.ddp_addr,
            port=assignment.ddp_port,
            world_size=assignment.world_size,
            is_master=True,
            timeout=datetime.timedelta(minutes=30),  # init_process_group's default
            wait_for_workers=False,
            multi_tenant=True,
            # torch's libuv server scales to huge worlds, but opens fds (a /dev/null among
            # them) that rank 0 of a torchrun worker would not have before its own
            # init_process_group; below that size the classic server is as fast.
            use_libuv=assignment.world_size >= LIBUV_STORE_FROM_RANKS,
        )
    except (RuntimeError, OSError) as e:
        raise MasterUnavailable(f"rank 0 cannot serve the DDP store on port {assignment.ddp_port}: {e}") from None


def _configure_torch(assignment: env.Assignment, backend: str, virtual_local_rank: bool) -> None:
    import torch

    # torch sized its thread pool when the warm parent imported it, from the launcher's
    # environment; size it from this worker's (oversubscribed spinning threads cost 10x in
    # throughput on a small machine). Without OMP_NUM_THREADS torch's default stands, as
    # in a fresh interpreter.
    with contextlib.suppress(KeyError, ValueError):
        torch.set_num_threads(max(1, int(os.environ[env.OMP_NUM_THREADS])))
    if backend == "auto":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        # With --virtual-local-rank each worker sees its own GPU only.
        needed = 1 if virtual_local_rank else assignment.local_world_size
        backend = "nccl" if gpus >= needed else "gloo"
    os.environ[env.BACKEND] = backend
    if backend == "nccl":
        torch.cuda.set_device(0 if virtual_local_rank else assignment.local_rank)
    _yield_gil_after_destroy_process_group()


# Long enough for every thread waiting for the GIL to have had it once.
GIL_YIELD_S = 0.05


def _yield_gil_after_destroy_process_group() -> None:
    """Work around a deadlock in torch at the end of a DDP script.

    torch's gloo worker thread frees each finished collective, which needs the GIL (the work
    keeps a Python object from the backward pass). When a script destroys its process group
    and then lets its DDP model go (e.g. on returning from main()), the model's reducer
    drops the last reference to the group while holding the GIL, and the group's destructor
    joins that worker thread: if it is still waiting for the GIL, neither ever moves. Any
    other Python thread in the process (our heartbeats) makes that wait likelier; it hung one
    run in ten of examples/train_mlp.py with four ranks on two cores. Sleeping for a moment
    after destroy_process_group() releases the GIL, so the worker thread finishes first.
    """
    import torch.distributed as dist

    if not dist.is_available():  # a torch built without distributed support
        return
    from torch.distributed import distributed_c10d

    destroy = distributed_c10d.destroy_process_group

    @functools.wraps(destroy)
    def destroy_process_group(*args, **kwargs):
        try:
            return destroy(*args, **kwargs)
        finally:
            time.sleep(GIL_YIELD_S)

    dist.destroy_process_group = destroy_process_group
    distributed_c10d.destroy_process_group = destroy_process_group


def run_target(target: Target, on_exception=None) -> int:
    """Run the script or module as __main__ in this process (or a --no-python program as a
    child); returns its exit code (negative: the program died of that signal).

    An exception goes to sys.excepthook, as in a plain interpreter (a script's own hook
    included), and to `on_exception(exc, traceback_text)` before the code 1 is returned.
    """
    try:
        if target.no_python:
            return _run_program(target)
        if target.is_module:
            fresh.run_module(target.name, target.args)
        else:
            fresh.run_script(target.name, target.args)
    except SystemExit as e:
        return _exit_code(e.code)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BaseException as e:
        tb_text = _format_user_traceback(e)
        if sys.excepthook is sys.__excepthook__:
            sys.stderr.write(tb_text)
        else:
            sys.excepthook(type(e), e, _user_traceback(e))
        sys.stderr.flush()
        if on_exception is not None:
            on_exception(e, tb_text)
        return 1
    return 0


def _run_program(target: Target) -> int:
    """torchrun's --no-python: the program runs as this worker's child, with its stdio and
    environment, while the worker keeps its heartbeats; a stop signal reaches the program
    directly (the supervisor signals the whole tree), so the worker only waits for it."""
    import subprocess

    process = subprocess.Popen([target.name, *target.args])
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # the program had the SIGINT too: let it finish
            continue


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _user_traceback(e: BaseException):
    """The traceback without the launcher's frames, as the script would see it."""
    tb = e.__traceback__
    ours = {__file__, fresh.__file__, runpy.__file__, "<frozen runpy>"}
    while tb is not None and tb.tb_frame.f_code.co_filename in ours:
        tb = tb.tb_next
    return tb


def _format_user_traceback(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, _user_traceback(e)))

"""The warm process every worker is forked from: a multiprocessing forkserver that has
imported torch (and what a training step imports lazily) once, so that neither the start
nor a restart of a worker pays for it.

It is started as early as possible (before the launcher imports gRPC and the rest), so
that its imports run while the launcher gets ready. It is a fresh interpreter, not a fork
of the launcher: the launcher's gRPC threads never reach it. Nothing preloaded may start
threads, open sockets or initialise CUDA at import.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import os
import shutil
import socket
import stat
import tempfile
from multiprocessing.context import BaseContext

from ddp_launch import env

# The environment before the preloads ran, as the warm process imports this module first:
# importing torch._dynamo sets TORCHINDUCTOR_CACHE_DIR, which a fresh script would not see.
ENV_BEFORE_PRELOAD = dict(os.environ)

PRELOAD = [
    "ddp_launch.run.warm",  # first: ENV_BEFORE_PRELOAD
    "torch",
    "torch.multiprocessing",  # torch's pickling of tensors for the worker's own use
    "torch.optim",
    "torch.distributed",
    "torch.nn.parallel",
    "torch._dynamo",  # the first optimizer.step() imports it: about 1 s of CPU per worker
    "ddp_launch.cli",  # every child re-imports the launcher's __main__ (multiprocessing does)
    "ddp_launch.run.worker",
    # grpc's import starts no thread and opens nothing (checked); its core starts with the
    # first channel, which each worker makes after the fork.
    "ddp_launch.control.client",
    "ddp_launch.control.heartbeat",
    "ddp_launch.progress",  # every worker's step tracker
    # A resuming script's first call; its import (dataclasses built by exec) cost a restarted
    # rank 8 ms of CPU, 4 ranks on 2 cores about 16 ms of the restart.
    "ddp_launch.checkpoint",
]


def _listening_socket_directory() -> str | None:
    """The multiprocessing temporary directory ("pymp-...") of the Unix socket this process
    listens on, or None: only the warm process, while it preloads, holds such a socket."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return None
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.family != socket.AF_UNIX or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    continue
                address = sock.getsockname()
        except (OSError, AttributeError, ValueError):
            continue
        directory = os.path.dirname(address) if isinstance(address, str) else ""
        if os.path.basename(directory).startswith("pymp-"):
            return directory
    return None


def _remove_when_orphaned(directory: str, server_pid: int, launcher_pid: int) -> None:
    if os.getpid() != server_pid:  # a worker, running the atexit handlers it inherited
        return
    if os.getppid() != launcher_pid:  # reparented: the launcher died without removing it
        shutil.rmtree(directory, ignore_errors=True)


def _clean_up_after_a_killed_launcher() -> None:
    """In the warm process: remove the launcher's socket directory when the launcher was
    killed (SIGKILL, the OOM killer), which leaves it behind in the temporary directory.

    The launcher's own exit handler removes it otherwise. The warm process ends when the
    launcher is gone (the end of multiprocessing's "alive" pipe), through the interpreter's
    exit, so its atexit handlers run; it removes the directory only once it has been
    reparented, so a launcher that is alive keeps it (it may start a new warm process in it).
    """
    directory = _listening_socket_directory()
    if directory is not None:
        atexit.register(_remove_when_orphaned, directory, os.getpid(), os.getppid())


_clean_up_after_a_killed_launcher()


_set_for_workers: tuple[str, ...] | None = None  # what quiet_grpc_forks set, once it ran


def quiet_grpc_forks() -> tuple[str, ...]:
    """env.quiet_grpc_forks on the launcher's environment, once, before any worker's gRPC is
    imported (the warm process and spawned workers inherit it); returns the names set."""
    global _set_for_workers
    if _set_for_workers is None:
        _set_for_workers = tuple(env.quiet_grpc_forks(os.environ))
    return _set_for_workers


# Linux's limit on a Unix socket's path (sun_path, 108 bytes with its NUL), and what
# multiprocessing adds to the temporary directory for the forkserver's:
# "/pymp-XXXXXXXX/listener-XXXXXXXX".
UNIX_PATH_MAX = 107
_SOCKET_SUFFIX = len("/pymp-XXXXXXXX/listener-XXXXXXXX")
SHORT_TEMP_DIRS = ("/tmp", "/dev/shm")


def _socket_directory_that_fits() -> None:
    """Where TMPDIR is too long for the forkserver's socket (a cluster's per-job directory
    can be), multiprocessing's directory goes to a short one instead: the warm start would
    fail on "AF_UNIX path too long", while torchrun, which has no socket there, runs."""
    if len(tempfile.gettempdir()) + _SOCKET_SUFFIX <= UNIX_PATH_MAX:
        return
    for candidate in SHORT_TEMP_DIRS:
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            saved = tempfile.tempdir
            tempfile.tempdir = candidate
            try:
                multiprocessing.util.get_temp_dir()  # made now, kept for the process's life
            finally:
                tempfile.tempdir = saved
            return


def forkserver_context() -> BaseContext:
    """The forkserver context, its server started (idempotent)."""
    quiet_grpc_forks()
    _socket_directory_that_fits()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return context

"""The warm process every worker is forked from: a multiprocessing forkserver that has
imported torch (and what a training step imports lazily) once, so that neither the start
nor a restart of a worker pays for it.

It is started as early as possible (before the launcher imports gRPC and the rest), so
that its imports run while the launcher gets ready. It is a fresh interpreter, not a fork
of the launcher: the launcher's gRPC threads never reach it. Nothing preloaded may start
threads, open sockets or initialise CUDA at import.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
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


_set_for_workers: tuple[str, ...] | None = None  # what quiet_grpc_forks set, once it ran


def quiet_grpc_forks() -> tuple[str, ...]:
    """env.quiet_grpc_forks on the launcher's environment, once, before any worker's gRPC is
    imported (the warm process and spawned workers inherit it); returns the names set."""
    global _set_for_workers
    if _set_for_workers is None:
        _set_for_workers = tuple(env.quiet_grpc_forks(os.environ))
    return _set_for_workers


def forkserver_context() -> BaseContext:
    """The forkserver context, its server started (idempotent)."""
    quiet_grpc_forks()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return context

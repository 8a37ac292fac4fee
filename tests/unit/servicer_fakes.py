"""What the servicer tests call it with instead of gRPC: a context, async handlers (the clock: tests.fakes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from ddp_launch.progress import Progress


class Aborted(Exception):
    """What the fake context raises, as grpc's real `abort()` raises to end the handler."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def run_async(handler):
    """A coroutine handler of the servicer (the heartbeat RPCs), called like a plain one."""
    return lambda request, context: asyncio.run(handler(request, context))


def counting_progress() -> Callable[[], Progress]:
    """A read_progress for a HeartbeatThread: one step more at each read."""
    step = 0

    def progress() -> Progress:
        nonlocal step
        step += 1
        return Progress(optimizer_steps=step, samples=step * 8)

    return progress

"""The launcher's stop signals as requests: a handler that only records the signal and a
wake-up fd that the watch loop's wait (run/group.py) wakes on."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def signals_as_stop_requests(signals: tuple[int, ...]) -> Iterator[tuple[int, list]]:
    """The signals of --signals-to-handle (SIGINT/SIGTERM/SIGHUP/SIGQUIT unless told) become
    a stop request to the supervisor, and wake its wait."""
    requests: list = []
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)

    def on_signal(signum: int, frame: object) -> None:
        for request in requests:
            request(signum)

    previous = {s: signal.signal(s, on_signal) for s in signals}
    previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield read_fd, requests
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(read_fd)
        os.close(write_fd)

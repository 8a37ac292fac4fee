"""Worker output: every line to the console, prefixed with its rank, and to the rank's log.

One thread reads every worker's stdout and stderr pipe (a selector, no thread per pipe),
so a worker that prints a lot never blocks on a full pipe, and the launcher keeps the last
lines of each rank for its failure report.
"""

from __future__ import annotations

import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

TAIL_LINES = 200
_READ_BYTES = 65536

# sink(rank, line, is_stderr): where prefixed console lines go (the live view's writer).
Sink = Callable[[int, str, bool], None]


@dataclass
class _Stream:
    rank: int
    is_stderr: bool
    partial: bytes = b""  # the start of a line whose newline has not come yet


@dataclass
class _RankOutput:
    log_path: Path
    log: TextIO
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    lines_seen: int = 0
    open_streams: int = 0


class OutputPump:
    """Reads workers' pipes on one thread; writes rank logs and feeds the console sink."""

    def __init__(self, log_dir: Path, sink: Sink) -> None:
        self._log_dir = log_dir
        self._sink = sink
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Condition()
        self._ranks: dict[int, _RankOutput] = {}
        self._pending: list[tuple[int, int, bool]] = []
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ddp-launch-output", daemon=True)
        self._thread.start()

    def log_path(self, rank: int) -> Path:
        return self._log_dir / f"rank-{rank}.log"

    def attach(self, rank: int, stdout_fd: int, stderr_fd: int, header: str) -> None:
        """Start reading a worker's pipes (read ends; the pump closes them at EOF)."""
        with self._lock:
            out = self._ranks.get(rank)
            if out is None:
                path = self.log_path(rank)
                out = _RankOutput(path, open(path, "a", encoding="utf-8", buffering=1))
                self._ranks[rank] = out
            out.log.write(f"==== {header} ====\n")
            out.open_streams += 2
            self._pending += [(rank, stdout_fd, False), (rank, stderr_fd, True)]
        os.write(self._wake_w, b"x")

    def tail(self, rank: int, n: int = 20) -> list[str]:
        with self._lock:
            out = self._ranks.get(rank)
            return list(out.tail)[-n:] if out and n > 0 else []

    def lines_seen(self, rank: int) -> int:
        with self._lock:
            out = self._ranks.get(rank)
            return out.lines_seen if out else 0

    def lines_since(self, rank: int, mark: int) -> list[str]:
        """The lines a rank printed after `lines_seen()` returned `mark` (as far as kept)."""
        with self._lock:
            out = self._ranks.get(rank)
            if out is None:
                return []
            new = out.lines_seen - mark
            return list(out.tail)[-new:] if new > 0 else []

    def wait_closed(self, ranks: list[int], timeout_s: float) -> bool:
        """Wait until the given ranks' pipes reached EOF (their last words are logged)."""
        with self._lock:
            return self._lock.wait_for(
                lambda: all(self._ranks[r].open_streams == 0 for r in ranks if r in self._ranks),
                timeout=timeout_s,
            )

    def wait_quiet(self, ranks: list[int], quiet_s: float, timeout_s: float) -> None:
        """Wait until the ranks printed nothing for `quiet_s` (e.g. after a stack dump)."""
        end = time.monotonic() + timeout_s
        last = [self.lines_seen(r) for r in ranks]
        while time.monotonic() < end:
            time.sleep(quiet_s)
            now = [self.lines_seen(r) for r in ranks]
            if now == last:
                return
            last = now

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        with self._lock:
            for out in self._ranks.values():
                out.log.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._selector.close()

    def _loop(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    os.read(self._wake_r, 4096)
                    continue
                self._read(key.fd, key.data)
            with self._lock:
                pending, self._pending = self._pending, []
                stopping = self._stopping
            for rank, fd, is_stderr in pending:
                self._selector.register(fd, selectors.EVENT_READ, _Stream(rank, is_stderr))
            if stopping:
                self._drain_all()
                return

    def _read(self, fd: int, stream: _Stream) -> None:
        try:
            data = os.read(fd, _READ_BYTES)
        except OSError:
            data = b""
        if data:
            *lines, stream.partial = (stream.partial + data).split(b"\n")
            self._emit(stream, lines)
            return
        self._selector.unregister(fd)
        os.close(fd)
        if stream.partial:
            self._emit(stream, [stream.partial])
            stream.partial = b""
        with self._lock:
            self._ranks[stream.rank].open_streams -= 1
            self._lock.notify_all()

    def _emit(self, stream: _Stream, raw_lines: list[bytes]) -> None:
        lines = [b.decode("utf-8", errors="replace").rstrip("\r") for b in raw_lines]
        with self._lock:
            out = self._ranks[stream.rank]
            for line in lines:
                out.log.write(line + "\n")
                out.tail.append(line)
            out.lines_seen += len(lines)
            self._lock.notify_all()
        for line in lines:
            try:
                self._sink(stream.rank, line, stream.is_stderr)
            except Exception:  # a broken console must not stop logging
                pass

    def _drain_all(self) -> None:
        """At stop, read what is already in the pipes without waiting for EOF."""
        for key in list(self._selector.get_map().values()):
            if key.data is None:
                continue
            os.set_blocking(key.fd, False)
            while True:
                try:
                    data = os.read(key.fd, _READ_BYTES)
                except (BlockingIOError, OSError):
                    data = None
                if not data:
                    break
                *lines, key.data.partial = (key.data.partial + data).split(b"\n")
                self._emit(key.data, lines)
            if key.data.partial:
                self._emit(key.data, [key.data.partial])
            self._selector.unregister(key.fd)
            os.close(key.fd)

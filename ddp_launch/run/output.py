"""Worker output: to the console, prefixed with its rank, to the rank's log, and to torchrun's files.

One thread reads every worker's stdout and stderr pipe (a selector, no thread per pipe),
so a worker that prints a lot never blocks on a full pipe, and the launcher keeps the last
lines of each rank for its failure report.

Output is handled a read at a time, not a line at a time: each read's complete lines are one
write to the rank's log (a buffered file, flushed whenever the pipes go quiet and at least
every `FLUSH_INTERVAL_S`) and one call of the console sink, and after short reads the loop
lets `GATHER_S` of output gather so that a read holds many lines. A worker printing as fast
as it can is then held up by its own writes, not by the launcher's.

A line is what a terminal would show of it: the text after its last carriage return, so a
`\\r` progress bar is one line in the log, not thousands of states. The text after the last
newline of a read (a bar being redrawn, a `(Pdb) ` prompt) is the rank's *live* state; it
is shown through the `live` callback before its line is complete, at the pace of the
console's `LivePolicy`:

- on a terminal, a bar's state as it changes (redrawn in place by the view), a prompt at once;
- elsewhere (a pipe, a CI log), a bar's state at most once a second, so a log shows progress
  without every redraw, and a prompt once it has waited `prompt_settle_s` for its answer.

With torchrun's --log-dir/-r/-t options, each stream also goes, byte for byte, to torchrun's
per-attempt files (see `torchrun_logs`).
"""

from __future__ import annotations

import contextlib
import math
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, TextIO

from ddp_launch import rundir
from ddp_launch.config import LogOptions
from ddp_launch.run.torchrun_logs import FilterTap, TorchrunLogs, stream_bit

TAIL_LINES = 200
FLUSH_INTERVAL_S = 0.2
GATHER_S = 0.001
_READ_BYTES = 65536
_LOG_BUFFER_BYTES = 1 << 16
# A "line" that never ends (no newline for megabytes) is cut here, so memory stays bounded.
MAX_LINE_BYTES = 1 << 20

# sink(rank, lines, is_stderr): a read's complete lines of one stream, in order (the
# console's writer; the lines carry no prefix and no newline).
Sink = Callable[[int, Sequence[str], bool], None]
# live(rank, state, is_stderr): the rank's line so far, or None once it is complete.
LiveSink = Callable[[int, str | None, bool], None]


@dataclass(frozen=True)
class LivePolicy:
    """When a live state (an unfinished line) is shown.

    A bar's state (the unfinished line has a carriage return) is shown once at least
    `bar_interval_s` has passed since its rank last showed one and it has waited
    `bar_settle_s`; a state with no carriage return (a prompt, or half a line that the next
    read completes) once it has not changed for `prompt_settle_s`.
    """

    bar_interval_s: float
    bar_settle_s: float
    prompt_settle_s: float


# The view redraws in place: show what is there, at a pace the terminal can take.
TERMINAL = LivePolicy(bar_interval_s=0.1, bar_settle_s=0.0, prompt_settle_s=0.05)
# Each state is a line of its own: one a second; a state that is replaced within 0.2 s (the
# last state of a bar before its newline) is not worth one.
# Half a line with no carriage return is shown after a second unchanged: a prompt waits that
# long for its answer, where a print split into several writes (python -u) on a loaded
# machine would otherwise show its first half as a line of its own.
PIPE = LivePolicy(bar_interval_s=1.0, bar_settle_s=0.2, prompt_settle_s=1.0)


def collapse(line: str) -> str:
    """What a terminal shows of `line`: the text after its last carriage return.

    A line ending in a carriage return (``"50%\\r"``, ``"done\\r\\n"``) shows its last
    non-empty piece.
    """
    if "\r" not in line:
        return line
    return line.rstrip("\r").rpartition("\r")[2]


def _compact(rest: bytes) -> bytes:
    """An unfinished line with only what `collapse` can still return: its last non-empty
    piece before the last carriage return, and what follows that. A bar redrawn for hours
    on one line then costs a few bytes, not all its states."""
    cr = rest.rfind(b"\r")
    if cr <= 0:
        return rest
    head = rest[:cr].rstrip(b"\r")
    return head[head.rfind(b"\r") + 1 :] + rest[cr:]


class _Flushable(Protocol):
    def flush(self) -> None: ...


@dataclass(eq=False)
class _Stream:
    """One worker pipe: where its output goes, its unfinished line and what was shown of it."""

    rank: int
    is_stderr: bool
    console: bool  # to the console sink (torchrun's --redirects / --local-ranks-filter say)
    raw: BinaryIO | None = None  # torchrun's std{out,err}.log of this attempt
    tap: FilterTap | None = None  # torchrun's filtered_std{out,err}.log of this attempt
    partial: bytes = b""  # after the last newline, compacted
    state: str | None = None  # the live state of `partial`, None when there is none
    is_prompt: bool = False  # `partial` has no carriage return
    changed_at: float = 0.0
    pending_since: float | None = None  # when a state not yet shown first arrived
    shown: str | None = None  # the state on the console now


@dataclass
class _RankOutput:
    log_path: Path
    log: TextIO
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    lines_seen: int = 0
    open_streams: int = 0


class OutputPump:
    """Reads workers' pipes on one thread; writes rank logs and feeds the console.

    Args:
        log_dir: where rank-<i>.log go (the run directory).
        sink: the console's line writer, called on the pump's thread.
        live: the console's live-state writer (None: unfinished lines wait for their newline).
        live_policy: when live states are shown: `TERMINAL` when the console redraws them in
            place, `PIPE` when each is a line of its own.
        logs: torchrun's console and file options.
        run_id: the job directory's prefix under torchrun's --log-dir.
        role: the workers' role, in torchrun's filtered files.
        node_rank, nproc_per_node: to tell a rank's local rank (torchrun's options name those).
        clock: monotonic seconds, for the live states' pace.

    Raises:
        ConfigError: torchrun's log directory cannot be made.
    """

    def __init__(
        self,
        log_dir: Path,
        sink: Sink,
        *,
        live: LiveSink | None = None,
        live_policy: LivePolicy = PIPE,
        logs: LogOptions | None = None,
        run_id: str = "",
        role: str = "default",
        node_rank: int = 0,
        nproc_per_node: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log_dir = log_dir
        self._sink = sink
        self._live = live
        self._policy = live_policy
        self._logs = logs or LogOptions()
        self._first_rank = node_rank * nproc_per_node
        self._clock = clock
        self.torchrun_logs = TorchrunLogs(self._logs, run_id, nproc_per_node, role) if self._logs.wants_files else None
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Condition()
        self._ranks: dict[int, _RankOutput] = {}
        self._pending: list[tuple[int, _Stream]] = []
        # Pump thread only: streams with a state not yet shown, when each rank last showed
        # one (the pace is per rank, whichever of its streams the bar is on), files written
        # since the last flush, and when that flush is due at the latest.
        self._waiting: set[_Stream] = set()
        self._shown_at: dict[int, float] = {}
        self._dirty: set[_Flushable] = set()
        self._flush_due = 0.0
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ddp-launch-output", daemon=True)
        self._thread.start()

    def log_path(self, rank: int) -> Path:
        return rundir.rank_log(self._log_dir, rank)

    def attach(
        self, rank: int, stdout_fd: int, stderr_fd: int, header: str, generation: int = 0, local_rank: int | None = None
    ) -> None:
        """Start reading a worker's pipes (read ends; the pump closes them at EOF).

        Args:
            rank: the worker's global rank.
            stdout_fd, stderr_fd: the read ends of its pipes.
            header: the line that starts this worker's part of rank-<rank>.log.
            generation: its restart count (torchrun's attempt_<generation> directory).
            local_rank: its local rank (default: from the node rank the pump was made with;
                an elastic run's node rank changes).
        """
        local_rank = rank - self._first_rank if local_rank is None else local_rank
        console = self._logs.to_console(local_rank)
        streams = []
        with self._lock:
            for fd, is_stderr in ((stdout_fd, False), (stderr_fd, True)):
                stream = _Stream(rank, is_stderr, console=bool(console & stream_bit(is_stderr)))
                if self.torchrun_logs is not None:
                    stream.raw = self.torchrun_logs.open_stream(generation, local_rank, is_stderr)
                    stream.tap = self.torchrun_logs.tap(generation, local_rank, is_stderr)
                streams.append((fd, stream))
            out = self._ranks.get(rank)
            if out is None:
                path = self.log_path(rank)
                out = _RankOutput(path, open(path, "a", encoding="utf-8", buffering=_LOG_BUFFER_BYTES))
                self._ranks[rank] = out
            out.log.write(f"==== {header} ====\n")
            out.log.flush()
            out.open_streams += 2
            self._pending += streams
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
            if self.torchrun_logs is not None:
                self.torchrun_logs.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._selector.close()

    # -- the pump's thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            events = self._selector.select(self._timeout_s())
            now = self._clock()
            sizes = [0]
            for key, _ in events:
                if key.data is None:
                    os.read(self._wake_r, 4096)
                else:
                    sizes.append(self._read(key.fd, key.data, now))
            if 0 < max(sizes) < _READ_BYTES:
                # The pipes were emptied by short reads: a worker that prints line by line
                # would wake this loop for every line or two. Letting a millisecond of its
                # output gather makes reads of hundreds of lines, at a small part of the CPU
                # (a pipe holds 64 KiB, far more than a millisecond of printing).
                time.sleep(GATHER_S)
            with self._lock:
                pending, self._pending = self._pending, []
                stopping = self._stopping
            for fd, stream in pending:
                self._selector.register(fd, selectors.EVENT_READ, stream)
            self._show_due(now)
            # Nothing more to read right now (the pipes went quiet), or output has flowed
            # without a pause for a while: what was written reaches the files.
            if self._dirty and (not events or now >= self._flush_due):
                self._flush()
            if stopping:
                self._drain_all()
                self._flush()
                return

    def _timeout_s(self) -> float | None:
        if self._dirty:
            return 0  # only look whether more is there; if not, flush
        if not self._waiting:
            return None
        due = min(self._due(s) for s in self._waiting)
        return max(0.0, due - self._clock())

    def _read(self, fd: int, stream: _Stream, now: float) -> int:
        """Read once from the stream; returns how much (0: it ended)."""
        try:
            data = os.read(fd, _READ_BYTES)
        except OSError:
            data = b""
        if data:
            self._take(stream, data, now)
        else:
            self._close(fd, stream)
        return len(data)

    def _take(self, stream: _Stream, data: bytes, now: float) -> None:
        # A full disk must not stop the pump: the workers' pipes would fill and the run stall.
        if stream.raw is not None:
            with contextlib.suppress(OSError):
                stream.raw.write(data)
            self._mark_dirty(stream.raw, now)
        if stream.tap is not None:
            with contextlib.suppress(OSError):
                stream.tap.feed(data)
            self._mark_dirty(stream.tap, now)
        buf = stream.partial + data if stream.partial else data
        cut = buf.rfind(b"\n")
        if cut >= 0:
            self._emit(stream, buf[:cut], now)
            buf = buf[cut + 1 :]
        buf = _compact(buf)
        while len(buf) > MAX_LINE_BYTES:
            self._emit(stream, buf[:MAX_LINE_BYTES], now)
            cut, buf = 0, buf[MAX_LINE_BYTES:]
        stream.partial = buf
        self._update_state(stream, now, line_ended=cut >= 0)

    def _emit(self, stream: _Stream, block: bytes, now: float) -> None:
        """Complete lines (`block` without its last newline) to the log, the tail and the sink."""
        text = block.decode("utf-8", errors="replace")
        lines = text.split("\n")
        if "\r" in text:
            lines = [collapse(line) for line in lines]
            text = "\n".join(lines)
        with self._lock:
            out = self._ranks[stream.rank]
            with contextlib.suppress(OSError):  # a full disk: the console and the tail go on
                out.log.write(text + "\n")
            out.tail.extend(lines)
            out.lines_seen += len(lines)
            self._lock.notify_all()
        self._mark_dirty(out.log, now)
        if stream.console:
            try:
                self._sink(stream.rank, lines, stream.is_stderr)
            except Exception:  # a broken console must not stop logging
                pass

    def _update_state(self, stream: _Stream, now: float, *, line_ended: bool) -> None:
        if line_ended:
            stream.state = stream.pending_since = None
            if stream.shown is not None:
                stream.shown = None
                self._show(stream, None)
        state = collapse(stream.partial.decode("utf-8", errors="replace")) or None
        if state == stream.state:
            return
        stream.state, stream.is_prompt, stream.changed_at = state, b"\r" not in stream.partial, now
        if state is None or state == stream.shown or not stream.console or self._live is None:
            self._waiting.discard(stream)
            return
        if stream.pending_since is None:
            stream.pending_since = now
        self._waiting.add(stream)

    def _due(self, stream: _Stream) -> float:
        policy = self._policy
        if stream.is_prompt:
            return stream.changed_at + policy.prompt_settle_s
        since = stream.pending_since if stream.pending_since is not None else stream.changed_at
        shown_at = self._shown_at.get(stream.rank, -math.inf)
        return max(shown_at + policy.bar_interval_s, since + policy.bar_settle_s)

    def _show_due(self, now: float) -> None:
        for stream in [s for s in self._waiting if self._due(s) <= now]:
            self._waiting.discard(stream)
            stream.shown, stream.pending_since = stream.state, None
            self._shown_at[stream.rank] = now
            self._show(stream, stream.state)

    def _show(self, stream: _Stream, state: str | None) -> None:
        if self._live is None or not stream.console:
            return
        try:
            self._live(stream.rank, state, stream.is_stderr)
        except Exception:  # a broken console must not stop logging
            pass

    def _mark_dirty(self, file: _Flushable, now: float) -> None:
        if not self._dirty:
            self._flush_due = now + FLUSH_INTERVAL_S
        self._dirty.add(file)

    def _flush(self) -> None:
        with self._lock:
            for file in self._dirty:
                try:
                    file.flush()
                except (OSError, ValueError):  # a full disk must not stop the console
                    pass
        self._dirty.clear()

    def _close(self, fd: int, stream: _Stream) -> None:
        """The stream's end: its unfinished line counts as a line, its files are complete."""
        self._selector.unregister(fd)
        os.close(fd)
        now = self._clock()
        if stream.partial:
            self._emit(stream, stream.partial, now)
            stream.partial = b""
        self._update_state(stream, now, line_ended=True)
        with self._lock:
            if stream.raw is not None:
                self._dirty.discard(stream.raw)
                stream.raw.close()
            if stream.tap is not None:
                self._dirty.discard(stream.tap)
                stream.tap.close()
            out = self._ranks[stream.rank]
            out.log.flush()
            out.open_streams -= 1
            self._lock.notify_all()

    def _drain_all(self) -> None:
        """At stop, read what is already in the pipes without waiting for EOF."""
        now = self._clock()
        for key in list(self._selector.get_map().values()):
            if key.data is None:
                continue
            os.set_blocking(key.fd, False)
            while True:
                try:
                    data = os.read(key.fd, _READ_BYTES)
                except OSError:  # BlockingIOError included: nothing more for now
                    data = b""
                if not data:
                    break
                self._take(key.data, data, now)
            self._close(key.fd, key.data)

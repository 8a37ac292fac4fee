"""torchrun's per-attempt log files (--log-dir, -r/--redirects, -t/--tee, --duplicate-*-filters).

The same tree, names and contents as torch.elastic's `DefaultLogsSpecs` and `PContext`
write, so tools that read torchrun's logs find them::

    <base>/<run_id>_<random>/attempt_<restart>/<local_rank>/stdout.log   # the worker's bytes, as written
    <base>/<run_id>_<random>/attempt_<restart>/<local_rank>/stderr.log
    <base>/<run_id>_<random>/attempt_<restart>/filtered_stdout.log       # "[<role><local_rank>]:<line>"
    <base>/<run_id>_<random>/attempt_<restart>/filtered_stderr.log

<base> is --log-dir, or a fresh `torchelastic_*` temporary directory when only -r/-t are
given. The job directory is made once per launcher; each restart gets its own attempt
directory, with a directory for every local rank whether or not it has files. The role is
--role ("default" unless told), as torchrun's tailer names it.

torchrun tails those files with Python's universal newlines, so the filtered files hold one
line per \\r- or \\n-ended piece of output: `FilterTap` splits the same way.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TextIO

from ddp_launch.config import STD_ERR, STD_OUT, LogOptions
from ddp_launch.errors import ConfigError


def stream_bit(is_stderr: bool) -> int:
    """The Std bit of one of a worker's streams."""
    return STD_ERR if is_stderr else STD_OUT


class FilterTap:
    """Copies the lines of one worker stream that contain any of `needles` to a shared file.

    Fed the stream's raw bytes in order; a line ends at \\n, \\r or \\r\\n, as torchrun's
    tailer reads it.
    """

    def __init__(self, needles: tuple[str, ...], prefix: str, file: TextIO, release: Callable[[], None]) -> None:
        self._needles = needles
        self._prefix = prefix
        self._file = file
        self._release = release
        self._rest = b""  # bytes after the last line end
        self._after_cr = False  # the bytes so far ended with \r: a \n next is part of that line end

    def feed(self, data: bytes) -> None:
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]
        self._after_cr = False
        if not data:
            return
        buf = self._rest + data
        cut = max(buf.rfind(b"\n"), buf.rfind(b"\r"))
        if cut < 0:
            self._rest = buf
            return
        self._after_cr = cut == len(buf) - 1 and buf[cut] == ord("\r")
        self._rest = buf[cut + 1 :]
        text = buf[: cut + 1].decode("utf-8", errors="replace")
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")[:-1]
        found = [line for line in lines if self._matches(line)]
        if found:
            self._file.write("".join(f"{self._prefix}{line}\n" for line in found))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        """The stream ended: its unterminated last line, if any, is copied as it is."""
        if self._rest:
            line = self._rest.decode("utf-8", errors="replace")
            if self._matches(line):
                self._file.write(f"{self._prefix}{line}")
            self._rest = b""
        self._file.flush()
        self._release()

    def _matches(self, line: str) -> bool:
        return any(needle in line for needle in self._needles)


class TorchrunLogs:
    """One node's torchrun-style log tree: the job directory and one directory per attempt.

    Args:
        options: the run's LogOptions (which streams of which local rank go to files).
        run_id: TORCHELASTIC_RUN_ID, the job directory's prefix.
        nproc_per_node: local ranks; each attempt has a directory for every one of them.
        role: the workers' role (--role), in the filtered files' prefix "[<role><local_rank>]:".

    Raises:
        ConfigError: the job directory cannot be made.
    """

    def __init__(self, options: LogOptions, run_id: str, nproc_per_node: int, role: str = "default") -> None:
        self._options = options
        self._nproc = nproc_per_node
        self._role = role
        try:
            if options.log_dir is not None:
                options.log_dir.mkdir(parents=True, exist_ok=True)
                base = options.log_dir
            else:
                base = Path(tempfile.mkdtemp(prefix="torchelastic_"))
            self.job_dir = Path(tempfile.mkdtemp(prefix=f"{run_id}_", dir=base))
        except OSError as e:
            raise ConfigError(f"cannot create the torchrun log directory: {e}") from None
        self._attempt: int | None = None
        # Per attempt: its filtered files, and how many streams still copy to them (an
        # attempt's last lines may still be read after the next attempt began).
        self._filtered: dict[int, dict[bool, TextIO]] = {}
        self._taps: dict[int, int] = {}

    def attempt_dir(self, generation: int) -> Path:
        return self.job_dir / f"attempt_{generation}"

    def begin(self, generation: int) -> None:
        """Make attempt_<generation> afresh (torchrun replaces one left from before), once."""
        if generation == self._attempt:
            return
        previous, self._attempt = self._attempt, generation
        if previous is not None:
            self._close_if_done(previous)
        attempt = self.attempt_dir(generation)
        shutil.rmtree(attempt, ignore_errors=True)
        attempt.mkdir(parents=True)
        for local_rank in range(self._nproc):
            (attempt / str(local_rank)).mkdir()
        # torchrun opens these when the attempt starts, so they exist even with no match.
        files: dict[bool, TextIO] = {}
        for is_stderr in (False, True):
            if self._needles(is_stderr):
                path = attempt / ("filtered_stderr.log" if is_stderr else "filtered_stdout.log")
                files[is_stderr] = open(path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115
        self._filtered[generation] = files
        self._taps[generation] = 0

    def open_stream(self, generation: int, local_rank: int, is_stderr: bool) -> BinaryIO | None:
        """attempt_<g>/<local_rank>/std{out,err}.log when that stream goes to files, else None."""
        self.begin(generation)
        if not self._options.to_files(local_rank) & stream_bit(is_stderr):
            return None
        path = self.attempt_dir(generation) / str(local_rank) / ("stderr.log" if is_stderr else "stdout.log")
        return open(path, "wb")  # noqa: SIM115 (the output pump closes it at the stream's end)

    def tap(self, generation: int, local_rank: int, is_stderr: bool) -> FilterTap | None:
        """The filter for this stream's lines, when torchrun would copy them.

        torchrun copies from the tee'd streams of the ranks it shows (--local-ranks-filter),
        never from redirect-only ones.
        """
        self.begin(generation)
        file = self._filtered[generation].get(is_stderr)
        options = self._options
        shown = options.local_ranks_filter is None or local_rank in options.local_ranks_filter
        if file is None or not shown or not options.streams(options.tee, local_rank) & stream_bit(is_stderr):
            return None
        self._taps[generation] += 1
        return FilterTap(
            self._needles(is_stderr), f"[{self._role}{local_rank}]:", file, lambda: self._release(generation)
        )

    def close(self) -> None:
        for files in self._filtered.values():
            for file in files.values():
                file.close()
        self._filtered.clear()

    def _needles(self, is_stderr: bool) -> tuple[str, ...]:
        o = self._options
        return o.duplicate_stderr_filters if is_stderr else o.duplicate_stdout_filters

    def _release(self, generation: int) -> None:
        self._taps[generation] -= 1
        self._close_if_done(generation)

    def _close_if_done(self, generation: int) -> None:
        if generation != self._attempt and self._taps.get(generation) == 0:
            for file in self._filtered.pop(generation, {}).values():
                file.close()

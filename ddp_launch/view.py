"""The launcher's live progress view, drawn only from the master's `RunSnapshot`s.

Worker stdout is never parsed: progress comes from heartbeats, so the view looks the same
whatever the training script prints. Two renderings, chosen once per view:

- On a terminal: tqdm lines on the launcher's stream. Position 0 is the world's progress
  (the slowest rank's step out of the reported total); below it one status line per rank
  for small worlds, or one aggregate line (min/median/max and the slowest rank) for large
  ones. tqdm only draws: every number shown is computed here from snapshots, because
  tqdm's own rate and ETA would measure how often `update()` is called, not training.
- Anywhere else (a pipe, a CI log): plain lines with no ANSI codes, at most one every
  `plain_interval_s`, plus one whenever the ranks' states change, so a log shows the
  moment a rank failed without being flooded.

Worker output goes through `LiveView.write_lines`, which clears and redraws the bars around
each batch of lines so lines never tear them. A worker's unfinished line (its own progress
bar, a `(Pdb) ` prompt) goes through `LiveView.write_live`: on a terminal it is one more
line below the bars, redrawn in place and removed when the line is complete; elsewhere it is
printed as a line of its own. `format_summary` renders the end-of-run summary.

Usage::

    view = LiveView(sys.stderr)
    try:
        while not stop.wait(0.3):
            view.update(registry.snapshot())
    finally:
        view.close()
    print(format_summary(registry.snapshot(), wall_s=wall_s, restarts=restarts))
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from tqdm import tqdm

from ddp_launch.registry import RATE_WINDOW_S, RankState, RankView, RunSnapshot

PREFIX = "[ddp-launch]"

# A world-step rate over less time than this is mostly quantisation noise (a step or two
# between snapshots); below it the ranks' own windowed rates are used instead.
_MIN_RATE_SPAN_S = 1.0
# A training rank that has been silent this long is flagged on its line, before the hang
# verdict (which takes the full hang timeout) arrives.
_STALE_HEARTBEAT_S = 5.0
# Failed or hung ranks named in a state summary; beyond this only the count is useful.
_MAX_NAMED_RANKS = 4
_STATE_ORDER = tuple(RankState)


# -- formatting helpers -------------------------------------------------------------------


def format_rate(steps_per_s: float) -> str:
    """Format a step rate the way tqdm users read it.

    Args:
        steps_per_s: steps per second; 0 means no progress, negative or non-finite unknown.

    Returns:
        ``"43.1 it/s"``, ``"1234 it/s"``, ``"0.52 it/s"``, or ``"12.5 s/it"`` below 0.1 it/s
        (where seconds per step is the number people can picture); ``"? it/s"`` when unknown.
    """
    if not math.isfinite(steps_per_s) or steps_per_s < 0:
        return "? it/s"
    if steps_per_s == 0:
        return "0.0 it/s"
    if steps_per_s < 0.1:
        return f"{1.0 / steps_per_s:.1f} s/it"
    return f"{_rate_number(steps_per_s)} it/s"


def _rate_number(steps_per_s: float) -> str:
    if steps_per_s >= 1000:
        return f"{steps_per_s:.0f}"
    if steps_per_s >= 1:
        return f"{steps_per_s:.1f}"
    return f"{steps_per_s:.2f}"


def format_duration(seconds: float) -> str:
    """Format a duration compactly: ``"4s"``, ``"1m05s"``, ``"2h03m"``.

    Args:
        seconds: a non-negative duration; negative values count as 0.

    Returns:
        The duration; tenths of a second only below one second.
    """
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_bytes(n_bytes: int) -> str:
    """Format a memory size in decimal units (``"312 MB"``, ``"1.2 GB"``); ``"-"`` when 0 (unknown)."""
    if n_bytes <= 0:
        return "-"
    if n_bytes >= 10**9:
        return f"{n_bytes / 1e9:.1f} GB"
    if n_bytes >= 10**6:
        return f"{n_bytes / 1e6:.0f} MB"
    return f"{n_bytes / 1e3:.0f} kB"


def format_loss(loss: float | None) -> str:
    """Four significant digits (``"0.231"``, ``"2.346"``, ``"1.235e+04"``); ``"-"`` when unknown."""
    return "-" if loss is None else f"{loss:.4g}"


def _state_counts(ranks: Sequence[RankView]) -> tuple[int, ...]:
    counts = Counter(r.state for r in ranks)
    return tuple(counts.get(s, 0) for s in _STATE_ORDER)


def format_states(ranks: Sequence[RankView]) -> str:
    """Summarise rank states: ``"4/4 training"``, or ``"3 training, 1 failed (rank 2)"``.

    Failed and hung ranks are named (the first few), since they are what the user looks for.
    """
    if not ranks:
        return "no ranks"
    counts = _state_counts(ranks)
    if max(counts) == len(ranks):
        return f"{len(ranks)}/{len(ranks)} {_STATE_ORDER[counts.index(len(ranks))].value}"
    parts = []
    for state, count in zip(_STATE_ORDER, counts):
        if not count:
            continue
        text = f"{count} {state.value}"
        if state in (RankState.FAILED, RankState.HUNG):
            named = [str(r.rank) for r in ranks if r.state is state][:_MAX_NAMED_RANKS]
            more = ", ..." if count > len(named) else ""
            text += f" (rank{'s' if count > 1 else ''} {', '.join(named)}{more})"
        parts.append(text)
    return ", ".join(parts)


def _generation_text(snap: RunSnapshot) -> str:
    if snap.generation <= 0:
        return "gen 0"
    return f"gen {snap.generation} (restart {snap.generation}/{snap.max_restarts})"


def _slowest(ranks: Sequence[RankView]) -> RankView | None:
    """The rank with the lowest step rate among those that have one; training ranks first."""
    rated = [r for r in ranks if r.steps_per_s > 0]
    training = [r for r in rated if r.state is RankState.TRAINING]
    pool = training or rated
    return min(pool, key=lambda r: (r.steps_per_s, r.step, r.rank)) if pool else None


def _median_rate(ranks: Sequence[RankView]) -> float | None:
    rates = [r.steps_per_s for r in ranks if r.steps_per_s > 0]
    return statistics.median(rates) if rates else None


def _rank_state_text(r: RankView) -> str:
    if r.state is RankState.FAILED:
        detail = [f"exit {r.exit_code}"] if r.exit_code is not None else []
        if r.exception_type:
            detail.append(r.exception_type)
        return f"failed ({', '.join(detail)})" if detail else "failed"
    if r.state is RankState.TRAINING and r.heartbeat_age_s is not None and r.heartbeat_age_s >= _STALE_HEARTBEAT_S:
        return f"training, no heartbeat for {format_duration(r.heartbeat_age_s)}"
    if r.straggler:
        return f"{r.state.value}, STRAGGLER"
    return r.state.value


def format_stragglers(ranks: Sequence[RankView]) -> str:
    """``stragglers: rank 3, rank 7`` or the empty string."""
    slow = [r.rank for r in ranks if r.straggler]
    return "stragglers: " + ", ".join(f"rank {r}" for r in slow[:8]) + (" ..." if len(slow) > 8 else "") if slow else ""


def format_rank_line(r: RankView, *, rank_width: int = 1, step_width: int = 1) -> str:
    """One rank's status line: ``rank 2  step 120  43.1 it/s  loss 0.231  rss 312 MB  cpu 98%  training``.

    Args:
        r: the rank.
        rank_width: digits to pad the rank number to, so lines of a world align.
        step_width: digits to pad the step to.
    """
    return (
        f"rank {r.rank:>{rank_width}}  step {r.step:>{step_width}}  {format_rate(r.steps_per_s):>10}"
        f"  loss {format_loss(r.loss)}  rss {format_bytes(r.rss_bytes)}  cpu {r.cpu_percent:.0f}%"
        f"  {_rank_state_text(r)}"
    )


def format_aggregate_line(ranks: Sequence[RankView]) -> str:
    """One line for a world too large for a line per rank.

    ``ranks 256: step min/median/max 118/120/121  it/s min/median/max 40.1/43.0/44.2  slowest rank 17``,
    followed by the state summary when not every rank is training.
    """
    if not ranks:
        return "ranks 0"
    steps = sorted(r.step for r in ranks)
    rates = sorted(r.steps_per_s for r in ranks)
    text = (
        f"ranks {len(ranks)}: step min/median/max {steps[0]}/{statistics.median_low(steps)}/{steps[-1]}"
        f"  it/s min/median/max {_rate_number(rates[0])}/{_rate_number(statistics.median(rates))}"
        f"/{_rate_number(rates[-1])}"
    )
    slowest = _slowest(ranks)
    if slowest is not None:
        text += f"  slowest rank {slowest.rank}"
    if any(r.state is not RankState.TRAINING for r in ranks):
        text += f"  {format_states(ranks)}"
    if stragglers := format_stragglers(ranks):
        text += f"  {stragglers}"
    return text


class _WorldRate:
    """Steps/s of the world step over a sliding window, timed by the snapshots' own clock.

    The world step is what the ETA is about; the registry's clock (`elapsed_s`) is used
    rather than ours so the rate does not depend on when `update()` happened to be called.
    A new generation, or a step going backwards (a restart resumed from a checkpoint),
    starts the window afresh.
    """

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self._window_s = window_s
        self._points: deque[tuple[float, int]] = deque()
        self._generation: int | None = None

    def feed(self, snap: RunSnapshot) -> float | None:
        """Add a snapshot; returns steps/s, or None while there is nothing to go on."""
        t, step = snap.elapsed_s, snap.step
        last = self._points[-1] if self._points else None
        if snap.generation != self._generation or (last and (step < last[1] or t < last[0])):
            self._points.clear()
            self._generation = snap.generation
        self._points.append((t, step))
        while len(self._points) > 2 and t - self._points[0][0] > self._window_s:
            self._points.popleft()
        t0, s0 = self._points[0]
        if t - t0 >= _MIN_RATE_SPAN_S and step > 0:
            return (step - s0) / (t - t0)
        return _median_rate(snap.ranks)


def _eta_s(snap: RunSnapshot, rate: float | None) -> float | None:
    if not snap.total_steps or not rate or rate <= 0 or snap.step >= snap.total_steps:
        return None
    return (snap.total_steps - snap.step) / rate


def format_plain_line(snap: RunSnapshot, rate: float | None) -> str:
    """The non-terminal status line.

    ``[ddp-launch] step 120/300 (40%) | 43.1 it/s | eta 4s | loss 0.231 | 4/4 training | gen 0``

    Args:
        snap: the run's state.
        rate: the world's steps/s, or None when unknown.
    """
    step = f"step {snap.step}"
    if snap.total_steps:
        step += f"/{snap.total_steps} ({100 * snap.step / snap.total_steps:.0f}%)"
    parts = [f"{PREFIX} {step}", format_rate(-1.0 if rate is None else rate)]
    eta = _eta_s(snap, rate)
    if eta is not None:
        parts.append(f"eta {format_duration(eta)}")
    if snap.loss is not None:
        parts.append(f"loss {format_loss(snap.loss)}")
    parts += [format_states(snap.ranks), _generation_text(snap)]
    if stragglers := format_stragglers(snap.ranks):
        parts.append(stragglers)
    return " | ".join(parts)


# -- the view -----------------------------------------------------------------------------


class _Line(tqdm):
    """A tqdm line whose every character is supplied by the view through `status`."""

    # tqdm's monitor thread retunes `miniters` for code that calls update(); the view only
    # calls refresh(), so the thread would be one more thing left running for nothing.
    monitor_interval = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.status = ""  # read by format_dict during tqdm's first draw in __init__
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        # tqdm passes extra format_dict keys through to bar_format: "{status}" is ours.
        d = super().format_dict
        d["status"] = self.status
        return d


_BAR_FORMAT_TOTAL = "ddp-launch {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{status}]"
_BAR_FORMAT_NO_TOTAL = "ddp-launch step {n_fmt} [{status}]"


class LiveView:
    """Draws the run's progress on `stream` from snapshots; see the module docstring.

    `update` is called from one thread (the launcher's view loop), `write_line` from any
    (worker output pumps); one lock serialises them so a line never lands inside a redraw.

    Args:
        stream: where to draw (the launcher's stderr, usually).
        interactive: draw tqdm bars; None decides by `stream.isatty()` (and TERM != dumb).
        enabled: False (--quiet) draws nothing; worker lines are still printed.
        plain_interval_s: least time between two plain status lines (non-interactive).
        per_rank_limit: largest world that gets one line per rank; larger worlds get one
            aggregate line.
        clock: monotonic seconds, for the plain-line interval (injectable for tests).
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        interactive: bool | None = None,
        enabled: bool = True,
        plain_interval_s: float = 5.0,
        per_rank_limit: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interactive is None:
            isatty = getattr(stream, "isatty", None)
            interactive = bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
        self.stream = stream
        self.interactive = interactive
        self.enabled = enabled
        self.plain_interval_s = plain_interval_s
        self.per_rank_limit = per_rank_limit
        self._clock = clock
        self._lock = threading.RLock()
        self._closed = False
        self._rate = _WorldRate()
        # interactive state
        self._overall: _Line | None = None
        self._rank_lines: list[_Line] = []
        self._layout: tuple[int, bool] | None = None  # (world size, one line per rank?)
        # workers' unfinished lines, drawn below the view's own lines
        self._live: dict[tuple[int, bool], str] = {}
        self._live_lines: dict[tuple[int, bool], _Line] = {}
        # non-interactive state
        self._last_plain_at: float | None = None
        self._last_states: tuple[int, int, tuple[int, ...], str] | None = None

    def update(self, snap: RunSnapshot) -> None:
        """Show `snap`. Cheap enough to call a few times a second.

        Args:
            snap: the latest state of the run.
        """
        if not self.enabled:
            return
        with self._lock:
            if self._closed:
                return
            rate = self._rate.feed(snap)
            if self.interactive:
                self._draw(snap, rate)
            else:
                self._maybe_print_plain(snap, rate)

    def write_line(self, line: str, file: TextIO | None = None) -> None:
        """Print one line above the bars without tearing them. Thread-safe.

        Args:
            line: the text; a single trailing newline, if present, is not doubled.
            file: where the line goes (default: the view's stream).
        """
        self.write_lines([line.removesuffix("\n")], file)

    def write_lines(self, lines: Sequence[str], file: TextIO | None = None, prefix: str = "") -> None:
        """Print lines (a batch of worker output) above the bars, in one write. Thread-safe.

        Args:
            lines: the lines, without newlines.
            file: where they go (default: the view's stream); tqdm clears the bars around
                them even when it is the other of stdout/stderr.
            prefix: put before every line (``"[rank 3] "``).
        """
        if not lines:
            return
        block = prefix + f"\n{prefix}".join(lines) + "\n"
        target = self.stream if file is None else file
        with self._lock:
            if self.interactive and not self._closed:
                # One clear and one redraw of the bars for the whole batch.
                with tqdm.external_write_mode(file=target):
                    target.write(block)
                    target.flush()
            else:
                target.write(block)
                target.flush()

    def write_live(self, key: tuple[int, bool], text: str | None, file: TextIO | None = None) -> None:
        """Show a worker's unfinished line (its progress bar, a prompt). Thread-safe.

        On a terminal, the line is drawn below the bars and redrawn in place by the next
        call with the same key; None removes it (the line is complete and is printed by
        `write_lines`). Elsewhere `text` is printed as a line of its own, and None is nothing.

        Args:
            key: whose line it is, (rank, is_stderr); lines are drawn in key order, the
                first `per_rank_limit` of them.
            text: the line as it stands, prefix included, or None.
            file: where a non-terminal prints it (default: the view's stream).
        """
        with self._lock:
            if self._closed:
                return
            if not self.interactive:
                if text is not None:
                    target = self.stream if file is None else file
                    target.write(text + "\n")
                    target.flush()
                return
            if text is None:
                if self._live.pop(key, None) is not None:
                    self._layout_live_lines()
                return
            new = key not in self._live
            self._live[key] = text
            line = self._live_lines.get(key)
            if line is not None:
                line.status = text
                line.refresh()
            elif new:  # else it is one past the limit, not drawn
                self._layout_live_lines()

    def close(self) -> None:
        """Finish the view: the overall bar stays on screen, the rank lines go. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._live.clear()
            self._close_live_lines()
            self._close_rank_lines()
            if self._overall is not None:
                self._overall.close()
                self._overall = None

    # -- non-interactive -------------------------------------------------------------------

    def _maybe_print_plain(self, snap: RunSnapshot, rate: float | None) -> None:
        now = self._clock()
        states = (snap.world_size, snap.generation, _state_counts(snap.ranks), format_stragglers(snap.ranks))
        due = self._last_plain_at is None or now - self._last_plain_at >= self.plain_interval_s
        if not due and states == self._last_states:
            return
        self._last_plain_at = now
        self._last_states = states
        self.stream.write(format_plain_line(snap, rate) + "\n")
        self.stream.flush()

    # -- interactive -----------------------------------------------------------------------

    def _draw(self, snap: RunSnapshot, rate: float | None) -> None:
        per_rank = len(snap.ranks) <= self.per_rank_limit and self._fits_terminal(len(snap.ranks) + 1)
        layout = (len(snap.ranks), per_rank)
        if layout != self._layout:
            self._rebuild(layout)

        overall = self._overall
        assert overall is not None
        total = snap.total_steps or None
        if overall.total != total:
            overall.total = total
            overall.bar_format = _BAR_FORMAT_TOTAL if total else _BAR_FORMAT_NO_TOTAL
        overall.n = snap.step
        overall.status = self._overall_status(snap, rate)
        overall.refresh()

        if per_rank:
            rank_width = len(str(max(len(snap.ranks) - 1, 0)))
            step_width = len(str(max(snap.total_steps, max((r.step for r in snap.ranks), default=0))))
            for line, r in zip(self._rank_lines, snap.ranks):
                line.n = r.step
                line.status = format_rank_line(r, rank_width=rank_width, step_width=step_width)
                line.refresh()
        elif self._rank_lines:
            line = self._rank_lines[0]
            line.n = snap.step
            line.status = format_aggregate_line(snap.ranks)
            line.refresh()

    @staticmethod
    def _overall_status(snap: RunSnapshot, rate: float | None) -> str:
        parts = [format_duration(snap.elapsed_s), format_rate(-1.0 if rate is None else rate)]
        eta = _eta_s(snap, rate)
        if eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        if snap.loss is not None:
            parts.append(f"loss {format_loss(snap.loss)}")
        if snap.generation > 0:
            parts.append(_generation_text(snap))
        if any(r.state is not RankState.TRAINING for r in snap.ranks):
            parts.append(format_states(snap.ranks))
        return ", ".join(parts)

    def _rebuild(self, layout: tuple[int, bool]) -> None:
        """(Re)create the lines for a world of `layout[0]` ranks; the overall bar is kept."""
        self._close_live_lines()  # first: they are below the rank lines
        self._close_rank_lines()
        if self._overall is None:
            self._overall = self._new_line(0, leave=True, bar_format=_BAR_FORMAT_NO_TOTAL)
        n_ranks, per_rank = layout
        count = n_ranks if per_rank else min(n_ranks, 1)
        self._rank_lines = [self._new_line(i + 1, leave=False, bar_format="{status}") for i in range(count)]
        self._layout = layout
        self._layout_live_lines()

    def _layout_live_lines(self) -> None:
        """Draw the workers' unfinished lines, in key order, right below the view's lines.

        Called when one comes or goes (at most once per worker line, not per redraw), so
        the lines are simply drawn afresh at their new positions. Like the rank lines, at
        most `per_rank_limit` of them: a bar on each of 64 ranks would fill the terminal.
        """
        self._close_live_lines()
        first = 1 + len(self._rank_lines) if self._overall is not None else 0
        for i, key in enumerate(sorted(self._live)[: self.per_rank_limit]):
            line = self._new_line(first + i, leave=False, bar_format="{status}")
            line.status = self._live[key]
            line.refresh()
            self._live_lines[key] = line

    def _new_line(self, position: int, *, leave: bool, bar_format: str) -> _Line:
        return _Line(
            total=None,
            file=self.stream,
            position=position,
            leave=leave,
            bar_format=bar_format,
            dynamic_ncols=True,  # trim to the terminal width: a wrapped line breaks positions
            mininterval=0,
            smoothing=0,
            unit="step",
            disable=False,
        )

    def _close_live_lines(self) -> None:
        for line in reversed(list(self._live_lines.values())):
            line.close()
        self._live_lines = {}

    def _close_rank_lines(self) -> None:
        # Bottom up, so each clear happens below the lines still standing.
        for line in reversed(self._rank_lines):
            line.close()
        self._rank_lines = []

    def _fits_terminal(self, n_lines: int) -> bool:
        # tqdm replaces lines past the terminal's height with "... (more hidden) ...";
        # an aggregate line says more than a list cut short.
        try:
            rows = os.get_terminal_size(self.stream.fileno()).lines
        except (AttributeError, OSError, ValueError):
            return True
        return n_lines < rows


# -- the end-of-run summary ---------------------------------------------------------------


def format_summary(snap: RunSnapshot, *, wall_s: float, restarts: int) -> str:
    """The end-of-run summary, several lines, no trailing newline.

    Args:
        snap: the run's final state (the last generation's ranks).
        wall_s: the run's wall time, launch to end.
        restarts: how many times the group was restarted.

    Returns:
        Wall time, final step (of the total when known), samples/s when samples were
        reported, restarts, per-rank step rate min/median/max with the slowest rank, and
        the final mean loss when known.
    """
    ranks = snap.ranks
    lines = [f"{PREFIX} run {snap.run_id}: {len(ranks)} ranks, {format_states(ranks)}"]
    lines.append(f"  wall time  {format_duration(wall_s)}")

    step = f"{snap.step}/{snap.total_steps}" if snap.total_steps else f"{snap.step}"
    if wall_s > 0 and snap.step > 0:
        # Steps over the whole wall time, restarts and start-up included: what the user got.
        step += f" ({format_rate(snap.step / wall_s)} overall)"
    lines.append(f"  step       {step}")

    samples = sum(r.samples for r in ranks)
    if samples:
        if restarts == 0 and wall_s > 0:
            lines.append(f"  samples/s  {samples / wall_s:.1f} ({samples} samples)")
        else:
            # Samples are counted per generation, and the snapshot does not say when the
            # last one began, so a rate over the whole wall time would understate it.
            lines.append(f"  samples    {samples} in the final generation")

    lines.append(f"  restarts   {restarts}")

    rates = sorted(r.steps_per_s for r in ranks if r.steps_per_s > 0)
    slowest = _slowest(ranks)
    if rates and slowest is not None:
        lines.append(
            f"  step rate  min/median/max {_rate_number(rates[0])}/{_rate_number(statistics.median(rates))}"
            f"/{_rate_number(rates[-1])} it/s, slowest rank {slowest.rank}"
            f" ({format_rate(slowest.steps_per_s)})"
        )
    else:
        lines.append("  step rate  unknown (too few heartbeats)")

    if snap.loss is not None:
        lines.append(f"  final loss {format_loss(snap.loss)} (mean over ranks)")
    return "\n".join(lines)

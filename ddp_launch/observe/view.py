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

import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from tqdm import tqdm

from ddp_launch.observe.format import format_bytes, format_duration, format_loss, format_rate, rate_number
from ddp_launch.record import RankRecord, RankState
from ddp_launch.record import slowest as slowest_rank
from ddp_launch.registry import RunSnapshot

PREFIX = "[ddp-launch]"

# A training rank that has been silent this long is flagged on its line, before the hang
# verdict (which takes the full hang timeout) arrives.
_STALE_HEARTBEAT_S = 5.0
# Failed or hung ranks named in a state summary; beyond this only the count is useful.
_MAX_NAMED_RANKS = 4
_STATE_ORDER = tuple(RankState)


# -- lines --------------------------------------------------------------------------------


def _state_counts(ranks: Sequence[RankRecord]) -> tuple[int, ...]:
    counts = Counter(r.state for r in ranks)
    return tuple(counts.get(s, 0) for s in _STATE_ORDER)


def format_states(ranks: Sequence[RankRecord]) -> str:
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
        return f"gen {max(snap.generation, 0)}"
    if not snap.restarts:  # an elastic run's nodes changed; no restart was used
        return f"gen {snap.generation}"
    return f"gen {snap.generation} (restart {snap.restarts}/{snap.max_restarts})"


def _rank_state_text(r: RankRecord) -> str:
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


def format_stragglers(ranks: Sequence[RankRecord]) -> str:
    """``stragglers: rank 3, rank 7`` or the empty string."""
    slow = [r.rank for r in ranks if r.straggler]
    return "stragglers: " + ", ".join(f"rank {r}" for r in slow[:8]) + (" ..." if len(slow) > 8 else "") if slow else ""


def step_word(reported: bool) -> str:
    """What a step count is: the script's own step, or optimizer steps of this generation."""
    return "step" if reported else "opt step"


def format_rank_line(r: RankRecord, *, rank_width: int = 1, step_width: int = 1) -> str:
    """One rank's status line: ``rank 2  step 120  43.1 it/s  loss 0.231  rss 312 MB  cpu 98%  training``.

    ``step`` is the step the script reported; without one the line shows ``opt step``, the
    optimizer steps of this generation.

    Args:
        r: the rank.
        rank_width: digits to pad the rank number to, so lines of a world align.
        step_width: digits to pad the step to.
    """
    word = step_word(r.reported_step is not None)
    return (
        f"rank {r.rank:>{rank_width}}  {word} {r.step:>{step_width}}  {format_rate(r.steps_per_s):>10}"
        f"  loss {format_loss(r.loss)}  rss {format_bytes(r.rss_bytes)}  cpu {r.cpu_percent:.0f}%"
        f"  {_rank_state_text(r)}"
    )


def format_aggregate_line(ranks: Sequence[RankRecord]) -> str:
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
        f"  it/s min/median/max {rate_number(rates[0])}/{rate_number(statistics.median(rates))}"
        f"/{rate_number(rates[-1])}"
    )
    slowest = slowest_rank(ranks)
    if slowest is not None:
        text += f"  slowest rank {slowest.rank}"
    if any(r.state is not RankState.TRAINING for r in ranks):
        text += f"  {format_states(ranks)}"
    if stragglers := format_stragglers(ranks):
        text += f"  {stragglers}"
    return text


def _eta_s(snap: RunSnapshot, rate: float | None) -> float | None:
    total = snap.step_total
    if not total or not rate or rate <= 0 or snap.step >= total:
        return None
    if not any(r.state is RankState.TRAINING for r in snap.ranks):
        return None  # nothing trains: no time is left to estimate
    return (total - snap.step) / rate


def format_plain_line(snap: RunSnapshot, rate: float | None) -> str:
    """The non-terminal status line.

    ``[ddp-launch] step 120/300 (40%) | 43.1 it/s | eta 4s | loss 0.231 | 4/4 training | gen 0``

    Args:
        snap: the run's state.
        rate: the world's steps/s, or None when unknown.
    """
    step = f"{step_word(snap.step_reported)} {snap.step}"
    if snap.step_total:
        step += f"/{snap.step_total} ({100 * snap.step / snap.step_total:.0f}%)"
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
_BAR_FORMAT_NO_TOTAL = "ddp-launch {step} {{n_fmt}} [{{status}}]"


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
            rate = snap.steps_per_s
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
        total = snap.step_total or None
        bar_format = _BAR_FORMAT_TOTAL if total else _BAR_FORMAT_NO_TOTAL.format(step=step_word(snap.step_reported))
        if overall.total != total or overall.bar_format != bar_format:
            overall.total = total
            overall.bar_format = bar_format
        overall.n = snap.step
        overall.status = self._overall_status(snap, rate)
        overall.refresh()

        if per_rank:
            rank_width = len(str(max(len(snap.ranks) - 1, 0)))
            step_width = len(str(max(snap.step_total, max((r.step for r in snap.ranks), default=0))))
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
            self._overall = self._new_line(0, leave=True, bar_format=_BAR_FORMAT_NO_TOTAL.format(step="step"))
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


def format_summary(snap: RunSnapshot, *, wall_s: float, restarts: int, optimizer_steps_all: int | None = None) -> str:
    """The end-of-run summary, several lines, no trailing newline.

    Args:
        snap: the run's final state (the last generation's ranks, after they ended).
        wall_s: the run's wall time, launch to end.
        restarts: how many times the group was restarted.
        optimizer_steps_all: optimizer steps of the slowest rank summed over every
            generation (redone steps included), when there were restarts.

    Returns:
        Wall time; the step (the script's own, of the total when known) and this
        generation's optimizer steps; samples; restarts; the recent per-rank step rate
        min/median/max with the slowest rank; and the mean of each rank's last reported
        loss, when known.
    """
    ranks = snap.ranks
    lines = [f"{PREFIX} run {snap.run_id}: {len(ranks)} ranks, {format_states(ranks)}"]
    lines.append(f"  wall time  {format_duration(wall_s)}")
    lines.append(f"  step       {_summary_step(snap, restarts, optimizer_steps_all)}")
    if wall_s > 0 and snap.step > 0 and restarts == 0:
        # Over the whole wall time, start-up included: what the user got.
        lines[-1] += f" ({format_rate(snap.step / wall_s)} overall)"

    if snap.samples:
        if restarts == 0 and wall_s > 0:
            lines.append(f"  samples/s  {snap.samples / wall_s:.1f} ({snap.samples} samples)")
        else:
            lines.append(f"  samples    {snap.samples} (as the script reported them)")

    lines.append(f"  restarts   {restarts}")

    spread, slowest = snap.rate_spread, snap.slowest
    if spread is not None and slowest is not None:
        lines.append(
            f"  step rate  min/median/max {'/'.join(rate_number(x) for x in spread)}"
            f" it/s (recent), slowest rank {slowest.rank}"
            f" ({format_rate(slowest.steps_per_s)})"
        )
    else:
        lines.append("  step rate  unknown (too few heartbeats)")

    losses = [r.loss for r in ranks if r.loss is not None]
    if snap.loss is not None:
        over = (
            f"mean over {len(losses)} ranks"
            if len(losses) > 1
            else "rank " + str(next(r.rank for r in ranks if r.loss is not None))
        )
        lines.append(f"  loss       {format_loss(snap.loss)} (each rank's last report(loss=...), {over})")
    return "\n".join(lines)


def _summary_step(snap: RunSnapshot, restarts: int, optimizer_steps_all: int | None) -> str:
    """``20/20 (the script's step); 10 optimizer steps in generation 1`` and the like."""
    low = min((r.optimizer_steps for r in snap.ranks), default=0)
    high = max((r.optimizer_steps for r in snap.ranks), default=0)
    opt = f"{low}" if low == high else f"{low}-{high} (by rank)"
    opt += " optimizer steps" + (f" in generation {snap.generation}" if snap.generation else "")
    if snap.generation > 0 and optimizer_steps_all is not None:
        opt += f", {optimizer_steps_all} in all {snap.generation + 1} generations"
    if not snap.step_reported:
        return opt
    step = f"{snap.step}/{snap.total_steps}" if snap.total_steps else f"{snap.step}"
    return f"{step} (the script's step); {opt}"


def format_resize_line(reason: str, generation: int, nnodes: int, world_size: int) -> str:
    """The console line of an elastic run's change of nodes, which uses no restart:

    ``[ddp-launch] node 2 (h2) joined; generation 3 runs 3 nodes (6 ranks), no restart used``
    """
    return f"{PREFIX} {reason}; generation {generation} runs {nnodes} node(s) ({world_size} ranks), no restart used"


def format_restart_line(
    root: RankRecord | None, reason: str, generation: int, max_restarts: int, restart: int | None = None
) -> str:
    """The console line of a restart: who ended the generation, how, where, and what comes.

    ``[ddp-launch] rank 2 died (signal SIGKILL) at step 347; restarting as generation 1
    (restart 1/3)``

    Args:
        root: the rank that ended the generation, as it was last seen, or None.
        reason: the supervisor's message, used when no rank is to blame.
        generation: the generation that starts now.
        max_restarts: --max-restarts.
        restart: which restart this is (default: `generation`, when no elastic change of
            nodes came between).
    """
    what = reason
    if root is not None:
        if root.state is RankState.HUNG:
            what = reason
        elif root.exit_code is not None:
            verb = "died" if root.exit_code < 0 else "failed"
            detail = root.exit or ""
            if root.exception_type:
                detail += f", {root.exception_type}"
            what = f"rank {root.rank} {verb} ({detail})"
        where = f"step {root.step}" if root.reported_step is not None else f"optimizer step {root.step}"
        what += f" at {where}"
    restart = generation if restart is None else restart
    return f"{PREFIX} {what}; restarting as generation {generation} (restart {restart}/{max_restarts})"

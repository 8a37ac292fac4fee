"""A rank's record: one immutable value from the registry to every place a user reads it.

The registry builds a `RankRecord` for each rank in one place (its snapshot); the live view,
the status command, the event log, the failure report and the metrics endpoint read it, and
`rank_json` is its one JSON form, so a field has the same name in ``status --json``,
``events.jsonl`` and ``failure.json``. Nothing here imports grpc or torch.

Steps have two sources, named apart because they mean different things:

- ``optimizer_steps``: counted by the worker's optimizer step hook, from 0 in each
  generation (a restarted worker is a new process). Every script has it.
- ``reported_step``: what the script passed to ``ddp_launch.report(step=...)``, usually its
  global step, which survives a resume. None when it never reported one.

``step`` is the step the run's progress is measured in: the reported one when there is
one, else the optimizer steps.
"""

from __future__ import annotations

import enum
import math
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class RankState(enum.Enum):
    """Where one rank is in one generation. Every generation starts all ranks at STARTING.

    ==============  ========================================================================
    state           entered when, and by whom
    ==============  ========================================================================
    STARTING        the generation begins (`Registry.begin_generation`, called by node 0's
                    supervisor at the start and at every restart)
    WAITING         the rank's worker registers (`Registry.register`, the master's Register
                    RPC); it waits at the start barrier
    TRAINING        the last rank of the world registers: the barrier opens for all WAITING
                    ranks at once (`Registry.register`)
    DONE            its worker exits with code 0 (`Registry.record_exit`, reported by the
                    launcher of the rank's node)
    FAILED          its worker exits with another code while the generation runs
                    (`Registry.record_exit`), or ends before it registered
    HUNG            node 0's supervisor found it silent or stalled for --hang-timeout
                    (`Registry.mark_hung`); its exit, when the group is stopped, is recorded
                    but the state stays HUNG
    STOPPED         its worker exits after node 0's launcher began stopping the group because
                    of another rank, a timeout or the end of the run (`Registry.begin_stop`,
                    then `record_exit`): the launcher ended it, it did not fail
    INTERRUPTED     as STOPPED, when the stop is a signal the user sent (Ctrl-C, SIGTERM to
                    the launcher): `Registry.begin_stop(interrupted=True)`
    ==============  ========================================================================

    DONE, FAILED, HUNG, STOPPED and INTERRUPTED are final within a generation; the next
    generation (a restart) begins every rank at STARTING again, and messages from workers of
    an older generation are answered "superseded".
    """

    STARTING = "starting"
    WAITING = "waiting"
    TRAINING = "training"
    HUNG = "hung"
    FAILED = "failed"
    DONE = "done"
    STOPPED = "stopped"
    INTERRUPTED = "interrupted"

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({RankState.HUNG, RankState.FAILED, RankState.DONE, RankState.STOPPED, RankState.INTERRUPTED})
# The states that count as a failure of the rank itself (the report's failures column).
FAILURE_STATES = frozenset({RankState.FAILED, RankState.HUNG})


def describe_exit(code: int) -> str:
    """'exit code 3' or 'signal SIGKILL' from a multiprocessing exit code (negative: signal)."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


@dataclass(frozen=True, slots=True)  # slots: half the cost to build, a thousand per snapshot
class RankRecord:
    """One rank of one generation, as of the registry's snapshot.

    Attributes:
        rank, node_rank, local_rank: where it is in the world.
        generation: the generation this record belongs to.
        state: see `RankState`.
        pid, hostname: its worker process, once registered (0 and "" before).
        optimizer_steps: optimizer steps in this generation (the worker's step hook).
        reported_step: the step the script reported, or None.
        samples: samples processed, as the script reported them (the world's count).
        steps_per_s: recent rate over consecutive heartbeats of this generation, in
            optimizer steps when the script steps an optimizer, else reported steps; 0 when
            unknown.
        loss: the last loss the script reported, or None.
        metrics: the other scalars it reported.
        total_steps: the total the script expects, 0 when it reported none.
        rss_bytes, cpu_percent: of its worker process (0 when not sampled yet).
        heartbeat_age_s: seconds since its last heartbeat, None before the barrier.
        exit_code: multiprocessing's (negative: a signal), None while it runs.
        exception_type, traceback: what the script raised, when it did.
        straggler: its rate stayed below the straggler threshold.
        state_since_s: the registry's clock when it entered `state`.
        exited_at: unix time at which its node's launcher saw its worker end, when known.
    """

    rank: int
    node_rank: int
    local_rank: int
    generation: int
    state: RankState
    pid: int = 0
    hostname: str = ""
    optimizer_steps: int = 0
    reported_step: int | None = None
    samples: int = 0
    steps_per_s: float = 0.0
    loss: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    total_steps: int = 0
    rss_bytes: int = 0
    cpu_percent: float = 0.0
    heartbeat_age_s: float | None = None
    exit_code: int | None = None
    exception_type: str = ""
    traceback: str = ""
    straggler: bool = False
    state_since_s: float = 0.0
    exited_at: float | None = None

    @property
    def step(self) -> int:
        """The progress step: the script's reported step when it gave one, else optimizer steps."""
        return self.optimizer_steps if self.reported_step is None else self.reported_step

    @property
    def exit(self) -> str | None:
        """How its worker ended, in words ('signal SIGKILL'), None while it runs."""
        return None if self.exit_code is None else describe_exit(self.exit_code)


def slowest(ranks: Iterable[RankRecord]) -> RankRecord | None:
    """The rank with the lowest step rate among those that have one; training ranks first."""
    rated = [r for r in ranks if r.steps_per_s > 0]
    pool = [r for r in rated if r.state is RankState.TRAINING] or rated
    return min(pool, key=lambda r: (r.steps_per_s, r.step, r.rank)) if pool else None


# rank_json's fields, in order; every JSON view of a rank uses these names.
RANK_FIELDS = (
    "rank",
    "node_rank",
    "local_rank",
    "hostname",
    "pid",
    "generation",
    "state",
    "step",
    "optimizer_steps",
    "reported_step",
    "samples",
    "steps_per_s",
    "loss",
    "metrics",
    "rss_bytes",
    "cpu_percent",
    "heartbeat_age_s",
    "straggler",
    "exit_code",
    "exit",
    "exception_type",
)
# A progress sample in events.jsonl: what changes with time.
SAMPLE_FIELDS = (
    "rank",
    "step",
    "optimizer_steps",
    "reported_step",
    "steps_per_s",
    "loss",
    "samples",
    "rss_bytes",
    "cpu_percent",
    "heartbeat_age_s",
)


def rank_json(r: RankRecord, fields: Iterable[str] = RANK_FIELDS) -> dict[str, Any]:
    """The rank as JSON-able data, with the same names and rounding wherever it is written.

    Args:
        r: the record.
        fields: which of `RANK_FIELDS` to include, in that order.
    """
    return {name: _JSON[name](r) for name in fields}


def rounded(x: float | None, digits: int) -> float | None:
    """`x` rounded to `digits` decimals; None for None, NaN and infinities (JSON has none)."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def significant(x: float | None) -> float | None:
    """Six significant digits: a loss of 2.3e-05 keeps its precision, 2.302585093 loses noise."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


_JSON: dict[str, Any] = {
    "rank": lambda r: r.rank,
    "node_rank": lambda r: r.node_rank,
    "local_rank": lambda r: r.local_rank,
    "hostname": lambda r: r.hostname,
    "pid": lambda r: r.pid,
    "generation": lambda r: r.generation,
    "state": lambda r: r.state.value,
    "step": lambda r: r.step,
    "optimizer_steps": lambda r: r.optimizer_steps,
    "reported_step": lambda r: r.reported_step,
    "samples": lambda r: r.samples,
    "steps_per_s": lambda r: rounded(r.steps_per_s, 3) or 0.0,
    "loss": lambda r: significant(r.loss),
    "metrics": lambda r: dict(r.metrics),
    "rss_bytes": lambda r: r.rss_bytes,
    "cpu_percent": lambda r: rounded(r.cpu_percent, 1) or 0.0,
    "heartbeat_age_s": lambda r: rounded(r.heartbeat_age_s, 2),
    "straggler": lambda r: r.straggler,
    "exit_code": lambda r: r.exit_code,
    "exit": lambda r: r.exit,
    "exception_type": lambda r: r.exception_type,
}
assert set(_JSON) == set(RANK_FIELDS)

"""What the supervisor's runs and generations end as: data, not output. The launcher
decides what to print and which exit code to use; the failure report reads them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ddp_launch.record import describe_exit
from ddp_launch.registry import HangVerdict, RunSnapshot


class Outcome(enum.Enum):
    """How a generation, and so the run, ended. The launcher's exit code follows from it:
    0, the first failed rank's code, 128+N for signal N, 124 for a timeout, 1 for a hang."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HUNG = "hung"
    INTERRUPTED = "interrupted"
    TIMED_OUT = "timed out"
    # An elastic run's nodes changed (one joined, one was lost): the next generation runs
    # with the new set, and no restart is counted. Never the outcome of a whole run.
    RESIZED = "resized"


def shell_exit_code(code: int) -> int:
    """The code a shell would show: 128 + N for death by signal N."""
    return 128 - code if code < 0 else code


@dataclass(frozen=True)
class WorkerExit:
    """A worker that ended with a non-zero code while its generation ran (not while the
    launcher stopped the group): a failure."""

    rank: int
    pid: int
    exit_code: int  # multiprocessing's: negative for a signal
    at: float  # time.time()

    @property
    def description(self) -> str:
        return describe_exit(self.exit_code)


@dataclass
class GenerationResult:
    """How one generation ended, as the supervisor saw it.

    `failures` are in the order they died; the first is the root cause unless a hang verdict
    named one (`root_rank`). `snapshot` is the registry's state after the group was stopped,
    so it holds every rank's last heartbeat and how each one ended.
    """

    generation: int
    outcome: Outcome
    failures: list[WorkerExit] = field(default_factory=list)  # in the order they died
    hung: list[HangVerdict] = field(default_factory=list)
    stacks: dict[int, str] = field(default_factory=dict)
    root_rank: int | None = None  # the rank that failed or stopped first
    message: str = ""
    signal_number: int | None = None
    snapshot: RunSnapshot | None = None


@dataclass
class RunResult:
    """The supervisor's whole run: every generation's result, the last one decisive."""

    outcome: Outcome
    generations: list[GenerationResult]
    wall_s: float

    @property
    def restarts(self) -> int:
        """Generations that ended in a failure or a hang and were followed by another (what
        --max-restarts counts); a membership change is no restart."""
        return sum(1 for g in self.generations[:-1] if g.outcome is not Outcome.RESIZED)

    @property
    def resizes(self) -> int:
        return sum(1 for g in self.generations if g.outcome is Outcome.RESIZED)

    @property
    def last(self) -> GenerationResult:
        return self.generations[-1]

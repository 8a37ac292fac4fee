"""Training progress inside a worker: the optimizer step hook and the public `report()`.

The step count comes for free from a global optimizer step hook, so an unmodified script
shows progress. `report()` adds what the launcher cannot guess (loss, samples, the total).
Both only store numbers; the heartbeat thread sends them, never the training thread.

Usage::

    import ddp_launch
    for step, batch in enumerate(loader):
        ...
        ddp_launch.report(step=step, loss=loss.item(), samples=len(batch), total_steps=n_steps)
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

MAX_METRICS = 32  # the master's bounds (registry.MAX_METRICS, MAX_NAME)
MAX_METRIC_NAME = 64


@dataclass(frozen=True)
class Progress:
    """What one heartbeat says about a worker's training (see record.py for the two steps)."""

    optimizer_steps: int = 0  # this generation's, counted by the step hook
    reported_step: int | None = None  # the script's own, when it reported one
    samples: int = 0
    loss: float | None = None
    total_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    step_age_s: float = 0.0  # seconds since the step last changed

    @property
    def step(self) -> int:
        """The progress step: the reported one when there is one, else optimizer steps."""
        return self.optimizer_steps if self.reported_step is None else self.reported_step


class _Tracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stepped_this_step: set[int] = set()
        self._completed_steps = 0
        self._auto_step = 0
        self._explicit_step: int | None = None
        self._samples = 0
        self._loss: float | None = None
        self._total_steps = 0
        self._metrics: dict[str, float] = {}
        self._last_step_at = time.monotonic()

    def on_optimizer_step(self, optimizer: object, args: object, kwargs: object) -> None:
        # A training step ends when an optimizer steps a second time: so several optimizers
        # stepping once each are one step, and a script that builds a new optimizer (each
        # stage, each epoch) keeps counting instead of starting again from 1.
        key = id(optimizer)
        if key in self._stepped_this_step:
            self._completed_steps += 1
            self._stepped_this_step = {key}
        else:
            self._stepped_this_step.add(key)
        self._auto_step = self._completed_steps + 1
        self._last_step_at = time.monotonic()

    def report(self, step, loss, samples, total_steps, metrics) -> None:
        with self._lock:
            if step is not None:
                if step != self._explicit_step:
                    self._last_step_at = time.monotonic()
                self._explicit_step = int(step)
            if loss is not None:
                self._loss = float(loss)
            if samples is not None:
                self._samples = int(samples)
            if total_steps is not None:
                self._total_steps = int(total_steps)
            for k, v in metrics.items():
                name, v = str(k)[:MAX_METRIC_NAME], float(v)
                # The master refuses heartbeats beyond these bounds; extra names are dropped
                # here rather than letting every heartbeat bounce.
                if math.isfinite(v) and (name in self._metrics or len(self._metrics) < MAX_METRICS):
                    self._metrics[name] = v

    def snapshot(self) -> Progress:
        with self._lock:
            age = time.monotonic() - self._last_step_at
            return Progress(
                self._auto_step,
                self._explicit_step,
                self._samples,
                self._loss,
                self._total_steps,
                dict(self._metrics),
                age,
            )


tracker = _Tracker()


def report(
    step: int | None = None,
    loss: float | None = None,
    samples: int | None = None,
    total_steps: int | None = None,
    **metrics: float,
) -> None:
    """Tell the launcher how training goes; cheap, and a no-op outside ddp-launch.

    Args:
        step: the global step; once given, it replaces the automatic optimizer-step count
            (useful after resuming from a checkpoint).
        loss: the latest loss (a float, e.g. `loss.item()`).
        samples: samples processed so far by the whole world (for samples/s).
        total_steps: the number of steps the run will take (gives the live view an ETA).
        **metrics: any other scalars (accuracy=0.93, lr=1e-3), shown by `ddp-launch status`.
    """
    for name, value in (("step", step), ("samples", samples), ("total_steps", total_steps)):
        if value is not None and value < 0:
            raise ValueError(f"ddp_launch.report: {name} must be >= 0, got {value}")
    tracker.report(step, loss, samples, total_steps, metrics)

"""A run for the event log and report tests: a real `Registry` on a fake clock, and an
`EventLog` on a fake wall clock that moves with it.

The registry's clock starts at 0 and the wall clock at `T0`, so a transition at registry
time ``x`` is written with ``t == T0 + x``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddp_launch.observe.events import PER_RANK_LIMIT, EventLog
from ddp_launch.progress import Progress
from ddp_launch.registry import Registry, RunSnapshot
from tests.fakes import FakeClock

T0 = 1_700_000_000.0


class FakeRun:
    """What the launcher does with the registry and the event log, one call at a time.

    Workers are identified by their rank; their pid is ``1000 + 100 * generation + rank`` and
    their host ``node-<node rank>``.
    """

    def __init__(
        self,
        path: Path,
        *,
        nnodes: int = 1,
        nproc: int = 2,
        max_restarts: int = 1,
        run_id: str = "run-1",
        t0: float = T0,
        progress_interval_s: float = 5.0,
        per_rank_limit: int = PER_RANK_LIMIT,
    ) -> None:
        self.t0 = t0
        self.clock = FakeClock(0.0)  # the registry's (monotonic) clock
        self.wall = FakeClock(t0)  # the event log's unix time
        self.nproc = nproc
        self.world_size = nnodes * nproc
        self.registry = Registry(
            run_id=run_id,
            nnodes=nnodes,
            local_world_size=nproc,
            max_restarts=max_restarts,
            ddp_addr="127.0.0.1",
            ddp_port=29500,
            clock=self.clock,
        )
        self.log = EventLog(
            path, clock=self.wall, progress_interval_s=progress_interval_s, per_rank_limit=per_rank_limit
        )

    def __enter__(self) -> FakeRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.close()

    @property
    def generation(self) -> int:
        return self.registry.generation

    # -- time ----------------------------------------------------------------------------

    def at(self, seconds: float) -> None:
        """Move both clocks to `seconds` after the start (registry time `seconds`)."""
        self.clock.set(seconds)
        self.wall.set(self.t0 + seconds)

    def advance(self, seconds: float) -> None:
        self.at(self.clock.now + seconds)

    # -- what workers and the supervisor do ------------------------------------------------

    def pid(self, rank: int) -> int:
        return 1000 + 100 * self.generation + rank

    def register(self, rank: int) -> None:
        node, local = divmod(rank, self.nproc)
        self.registry.register(
            node_rank=node, local_rank=local, pid=self.pid(rank), hostname=f"node-{node}", generation=self.generation
        )

    def register_all(self) -> None:
        for rank in range(self.world_size):
            self.register(rank)

    def heartbeat(self, rank: int, **progress: Any) -> None:
        """One heartbeat; `progress` are `Progress`'s fields."""
        superseded = self.registry.heartbeat(
            rank=rank, generation=self.generation, pid=self.pid(rank), progress=Progress(**progress)
        )
        assert not superseded

    def heartbeat_all(self, **progress: Any) -> None:
        for rank in range(self.world_size):
            self.heartbeat(rank, **progress)

    def exit(self, rank: int, code: int) -> None:
        self.registry.record_exit(rank, self.generation, code)

    def stop(self, *, interrupted: bool = False) -> None:
        self.registry.begin_stop(self.generation, interrupted=interrupted)

    def restart(self) -> None:
        self.registry.begin_generation(self.generation + 1)

    # -- the launcher's tick ---------------------------------------------------------------

    def observe(self) -> RunSnapshot:
        snap = self.registry.snapshot()
        self.log.observe(snap, self.registry.drain_transitions())
        return snap

    def emit(self, event: str, **fields: Any) -> None:
        self.log.emit(event, **fields)


def resume_from_checkpoint(run: FakeRun, *, optimizer: bool, seconds: float = 10.0) -> int:
    """A resumed script: for its first second it loads a checkpoint and reports no step, then it
    reports its global step from 5000 on, one step per 0.1 s (10 steps/s), with a heartbeat
    from every rank at each step; `optimizer`: it also steps an optimizer (the step hook counts
    from 0, from the start). Every rank then exits 0. Observed at each step; returns the last
    reported step."""
    run.register_all()
    steps = reported = 0
    for n in range(1, round(seconds * 10) + 1):
        run.at(n / 10)
        if optimizer or n > 10:
            steps += 1
        reported = 5000 + n - 11 if n > 10 else None
        run.heartbeat_all(optimizer_steps=steps if optimizer else 0, reported_step=reported, loss=1.0)
        run.observe()
    for rank in range(run.world_size):
        run.exit(rank, 0)
    run.observe()  # the final sample
    assert reported is not None
    return reported

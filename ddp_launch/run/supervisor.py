"""Start, watch, stop and restart the local worker group.

The supervisor waits on the workers' process sentinels (a death is noticed within
milliseconds, not at the next poll), and between wake-ups asks the registry for hang
verdicts, samples RSS/CPU with psutil and checks the run's deadline. Any failure stops the
whole group (SIGTERM to every process of every worker's tree, then SIGKILL after the grace
period); while restarts remain, a new generation is started from the warm forkserver.

Failures are data here: each generation ends in a GenerationResult (run/result.py); the
launcher decides what to print and which exit code to use. Processes are started, watched
and stopped only through the WorkerGroup (run/group.py), the seam tests replace.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import cast

import psutil

from ddp_launch.config import RunConfig
from ddp_launch.registry import MASTER_AGENT, HangVerdict, LostNode, Registry, RunSnapshot
from ddp_launch.run.group import Standbys, WorkerGroup, WorkerStarter
from ddp_launch.run.output import OutputPump
from ddp_launch.run.result import GenerationResult, Outcome, RunResult, WorkerExit
from ddp_launch.run.worker import STACK_DUMP_SIGNAL

__all__ = ["GenerationResult", "Outcome", "RunResult", "Supervisor", "WorkerExit"]

TICK_S = 0.25
STATS_INTERVAL_S = 1.0
# The registry-wide work of a round (hang and straggler checks, the snapshot for the live
# view and the event log) runs every tick up to this many ranks, and once a second above:
# at 1,024 ranks a round holds the GIL for ~15 ms, time the master's heartbeats wait for.
# Deaths are still seen at once (process sentinels), whatever the world size.
LARGE_WORLD = 64
LARGE_WORLD_ROUND_S = 1.0

# A node of the generation whose launcher sent no node heartbeat (its relay's batch, one
# per --heartbeat-interval) for this many intervals, and at least NODE_SILENT_MIN_S, is lost:
# a cut link or a vanished host is noticed in seconds, never through a collective's timeout.
NODE_SILENT_INTERVALS = 5
NODE_SILENT_MIN_S = 5.0
RENDEZVOUS_POLL_S = 0.1

STACK_DUMP_WAIT_S = 2.0
# What a stopped worker's stack dump says: it is left stopped, not continued to dump.
STOPPED_STACK = "(the process is stopped, by SIGSTOP, SIGTSTP or a debugger: no stack dump)"
# How long a multi-node run waits, after its first known failure, for the other nodes' exit
# reports before it names the root cause (they arrive within milliseconds of the deaths).
SETTLE_S = 0.5
# Stack frames that mean "waiting for peers", not "the cause of the hang".
_COLLECTIVE_FRAMES = ("torch/distributed/", "torch/autograd/", "torch/nn/parallel/distributed.py")


def node_silent_s(config: RunConfig) -> float:
    """How long a node may go without a node heartbeat before it is lost: seconds by
    default, and never more than --hang-timeout."""
    silent = max(NODE_SILENT_MIN_S, NODE_SILENT_INTERVALS * config.heartbeat_interval_s)
    hang = config.restart.hang_timeout_s
    return min(silent, hang) if hang > 0 else silent


# How long a generation trains before the next one's workers are forked, as standbys.
PREPARE_AFTER_S = 0.25


def round_interval_s(world_size: int, tick_s: float = TICK_S) -> float:
    """Seconds between two rounds of registry-wide checks for a world of this size, when
    the supervisor looks every `tick_s` (--monitor-interval)."""
    return tick_s if world_size <= LARGE_WORLD else max(tick_s, LARGE_WORLD_ROUND_S)


class Supervisor:
    """Runs the local group through generations until success, interruption or no restart left.

    Args:
        config: the run's settings.
        registry: the master's state (this node's ranks live in it).
        start_worker: forks one worker (wrapped in a WorkerGroup), or
        group: the group itself, a seam for tests.
        pump: worker output, for stack dumps and the failure report's log lines.
        on_tick: called with a snapshot a few times a second (the live view, the event log).
        on_generation_end: called with each generation's result once its group is stopped,
            and whether a new generation follows.
        wakeup_fd: readable when a signal arrived (signal.set_wakeup_fd's pipe), or None.
        clock: monotonic clock.
        say: prints one line for the user (an elastic run's rendezvous).
        on_resized: called once an elastic run's generation began with other nodes than the
            last one (after a join or a loss), with the result that ended the last one.
    """

    def __init__(
        self,
        config: RunConfig,
        registry: Registry,
        start_worker: WorkerStarter | None,
        pump: OutputPump,
        on_tick: Callable[[RunSnapshot], None] = lambda snap: None,
        on_generation_end: Callable[[GenerationResult, bool], None] = lambda result, restarting: None,
        wakeup_fd: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        group: WorkerGroup | None = None,
        say: Callable[[str], None] = lambda message: None,
        on_resized: Callable[[GenerationResult], None] = lambda result: None,
    ) -> None:
        self.config = config
        self.registry = registry
        if group is None:
            assert start_worker is not None, "a Supervisor needs start_worker or group"
            # The launcher's starter can fork a restart's workers ahead (group.prepare).
            standbys = cast(Standbys, start_worker) if hasattr(start_worker, "prepare") else None
            group = WorkerGroup(start_worker, config.node_rank, standbys=standbys)
        self.group = group
        self._pump = pump
        self._on_tick = on_tick
        self._on_generation_end = on_generation_end
        self._wakeup_fd = wakeup_fd
        self._clock = clock
        self._pending_signal: int | None = None
        self._started_at = clock()
        self._stats: dict[int, psutil.Process] = {}
        self._say = say
        self._on_resized = on_resized
        self._silent_s = node_silent_s(config)

    def request_stop(self, signum: int) -> None:
        """Called from the signal handler: the watch loop stops the group at its next wake-up."""
        if self._pending_signal is None:
            self._pending_signal = signum

    @property
    def first_rank(self) -> int:
        return self.config.node_rank * self.config.nproc_per_node

    def run(self) -> RunResult:
        generations: list[GenerationResult] = []
        generation = 0
        restarts = 0
        resized = False
        try:
            while True:
                if self.registry.elastic:
                    ended = self._rendezvous(generation, restart=bool(generations) and not resized)
                    if ended is not None:
                        generations.append(ended)
                        self._on_generation_end(ended, False)
                        break
                    if resized:
                        self._on_resized(generations[-1])
                # A restart's workers are forked while this generation trains (not for an
                # elastic run: who the next generation's nodes are is not known yet).
                ahead = not self.registry.elastic and restarts < self.config.restart.max_restarts
                result = self._run_generation(generation, prepare_next=ahead)
                if self._pending_signal is not None and result.outcome is not Outcome.INTERRUPTED:
                    # A failure that came while the group was being stopped (the signal
                    # forwarded to it may have caused it) must not start a new generation.
                    result.outcome = Outcome.INTERRUPTED
                    result.signal_number = self._pending_signal
                    result.message = f"stopped by {signal.Signals(self._pending_signal).name}"
                generations.append(result)
                final = result.outcome in (Outcome.SUCCEEDED, Outcome.INTERRUPTED, Outcome.TIMED_OUT)
                resized = result.outcome is Outcome.RESIZED
                restarting = resized or (not final and restarts < self.config.restart.max_restarts)
                self._on_generation_end(result, restarting)
                if not restarting:
                    break
                generation += 1
                if not resized:
                    restarts += 1
                if not self.registry.elastic:
                    self.registry.begin_generation(generation)
        finally:
            self.stop_group()
            self.group.discard_prepared()
        return RunResult(generations[-1].outcome, generations, self._clock() - self._started_at)

    # -- an elastic run's rendezvous -------------------------------------------------------

    def _rendezvous(self, generation: int, *, restart: bool) -> GenerationResult | None:
        """Choose generation `generation`'s nodes and begin it: once --nnodes MIN have joined
        (this one included) and the last call has passed, or MAX have. A generation that
        follows a lost node starts at once while MIN remain. Below MIN for --join-timeout,
        the run ends: returns how (or how a signal ended it), else None."""
        config = self.config
        low, high = config.fewest_nodes, config.nnodes
        started = self._clock()
        enough_since: float | None = None
        said = -1
        wake_fds = [] if self._wakeup_fd is None else [self._wakeup_fd]
        # The first generation, and one after the run fell below MIN, gives late nodes a
        # last call; one that follows a change of nodes goes on with those it has.
        last_call = config.last_call_s if generation == 0 else 0.0
        while True:
            agents = self.registry.live_agents(self._silent_s)
            count = 1 + len(agents)
            now = self._clock()
            if count >= low:
                enough_since = now if enough_since is None else enough_since
                if count >= high or now - enough_since >= last_call:
                    nodes = [MASTER_AGENT, *agents[: high - 1]]
                    self.registry.begin_generation(generation, nodes, restart=restart)
                    return None
            else:
                enough_since = None
                last_call = config.last_call_s
                if said != count:
                    said = count
                    self._say(f"waiting for nodes: {count} of --nnodes {low}:{high} here")
                if now - started >= config.join_timeout_s:
                    return GenerationResult(
                        generation,
                        Outcome.FAILED,
                        message=f"only {count} of the {low} nodes that --nnodes {low}:{high} needs joined "
                        f"within --join-timeout ({config.join_timeout_s:g} s)",
                    )
            self.group.wait(wake_fds, RENDEZVOUS_POLL_S)
            if self._pending_signal is not None:
                signum = self._pending_signal
                return GenerationResult(
                    generation,
                    Outcome.INTERRUPTED,
                    signal_number=signum,
                    message=f"stopped by {signal.Signals(signum).name}",
                )

    # -- one generation -----------------------------------------------------------------

    def _run_generation(self, generation: int, *, prepare_next: bool = False) -> GenerationResult:
        self._stats = {}
        self.group.start(generation, self.config.nproc_per_node)
        result = self._watch(generation, prepare_next=prepare_next)
        if result.outcome is Outcome.HUNG and result.hung:
            result.stacks = self._dump_stacks()
            result.root_rank = _root_of_hang(result.hung, result.stacks)
        if result.outcome is not Outcome.SUCCEEDED:
            self.registry.begin_stop(generation, interrupted=result.outcome is Outcome.INTERRUPTED)
        # An interrupted run forwards the signal the user sent (Ctrl-C reaches the script as
        # KeyboardInterrupt, which it may catch to save); every other stop is a SIGTERM.
        self.stop_group(result.signal_number or signal.SIGTERM)
        self._record_remaining_exits(result.generation)
        # Read after the stop: a worker that ends by itself (its script returns, or Ctrl-C's
        # KeyboardInterrupt unwinds it) sends a last heartbeat first, and that is in. One that
        # SIGTERM or SIGKILL ends sends nothing more: it stays at its last periodic heartbeat,
        # at most one --heartbeat-interval old. (A SIGTERM handler in the worker would change
        # what the script sees, which torchrun's default handling does not.)
        result.snapshot = self.registry.snapshot()
        return result

    def _watch(self, generation: int, *, prepare_next: bool = False) -> GenerationResult:
        config = self.config
        join_deadline = self._clock() + config.join_timeout_s
        run_deadline = None if config.timeout_s is None else self._started_at + config.timeout_s
        next_stats = next_round = 0.0
        failures: list[WorkerExit] = []
        wake_fds = [] if self._wakeup_fd is None else [self._wakeup_fd]
        mine = set(self.group.workers)
        settle_until: float | None = None  # time.monotonic(): see SETTLE_S
        trains_since: float | None = None  # when the barrier was first seen open
        self._waiting_since: float | None = None
        while True:
            timeout = config.monitor_interval_s
            if settle_until is not None:
                timeout = max(0.0, min(timeout, settle_until - time.monotonic()))
            exits = self.group.wait(wake_fds, timeout)
            if self._pending_signal is not None:
                signum = self._pending_signal
                name = signal.Signals(signum).name
                return GenerationResult(
                    generation, Outcome.INTERRUPTED, signal_number=signum, message=f"stopped by {name}"
                )
            for e in exits:
                self.registry.record_exit(e.rank, generation, e.exit_code, e.at)
                if e.exit_code != 0:
                    failures.append(WorkerExit(e.rank, e.pid, e.exit_code, e.at or time.time()))
            alive = self.group.alive
            now = self._clock()
            if prepare_next and not failures and self.registry.barrier_open:
                # Not at once: the forks would take CPU from the generation's own start.
                trains_since = now if trains_since is None else trains_since
                if now - trains_since >= PREPARE_AFTER_S:
                    self.group.prepare(generation + 1)
                    prepare_next = False
            is_round = now >= next_round
            if is_round:
                next_round = now + round_interval_s(config.world_size, config.monitor_interval_s)
            if not failures and self.config.nnodes > 1 and is_round:
                failures = self._failures_on_other_nodes()
                lost = [] if failures else self.registry.lost_nodes(self._silent_s)
                if lost:
                    return self._node_lost(generation, lost)
                joined = self._admission(now)
                if joined is not None:
                    return joined
            if failures and self.config.nnodes > 1:
                # A failure on one node kills its peers everywhere within milliseconds (a
                # collective's "connection closed"), and the first report to arrive is often a
                # consequence. Wait a moment for every node's exits, then blame the one that
                # happened first, by the time its own launcher saw it.
                if settle_until is None:
                    settle_until = time.monotonic() + SETTLE_S
                if time.monotonic() < settle_until:
                    continue
                seen = {f.rank for f in failures}
                failures += [f for f in self._failures_on_other_nodes() if f.rank not in seen]
                failures.sort(key=lambda f: (f.at, f.rank))
                # A node whose launcher is gone took its ranks with it: its peers' deaths
                # are the consequence, the lost node the cause.
                lost = self.registry.lost_nodes(self._silent_s)
                if lost:
                    return self._node_lost(generation, lost, failures)
            if failures:
                first = failures[0]
                return GenerationResult(
                    generation,
                    Outcome.FAILED,
                    failures=failures,
                    root_rank=first.rank,
                    message=f"rank {first.rank} failed ({first.description})",
                )
            if not alive and (self.config.nnodes == 1 or self.registry.all_done):
                return GenerationResult(generation, Outcome.SUCCEEDED)
            if run_deadline is not None and now >= run_deadline:
                return GenerationResult(
                    generation, Outcome.TIMED_OUT, message=f"the run's --timeout of {config.timeout_s:g} s passed"
                )
            if now >= next_stats:
                next_stats = now + STATS_INTERVAL_S
                self._sample_stats(alive)
            if not is_round:
                continue
            verdicts = self.registry.find_hung(config.restart.hang_timeout_s)
            # Every node's hung ranks count here: this launcher leads the run.
            local = [v for v in verdicts if v.rank in alive or v.rank not in mine]
            if local:
                for v in local:
                    self.registry.mark_hung(v.rank)
                return GenerationResult(
                    generation,
                    Outcome.HUNG,
                    hung=local,
                    root_rank=local[0].rank,
                    message=f"rank {local[0].rank} hung: {local[0].reason}",
                )
            if not self.registry.barrier_open and now >= join_deadline:
                missing = [r for r in self.registry.unregistered_ranks() if r in alive or r not in mine]
                if missing:
                    return GenerationResult(
                        generation,
                        Outcome.HUNG,
                        root_rank=missing[0],
                        message=f"rank(s) {missing} did not register within --join-timeout "
                        f"({config.join_timeout_s:g} s)",
                    )
            self.registry.update_stragglers(config.straggler_fraction, config.straggler_window_s)
            self._on_tick(self.registry.snapshot())

    def _node_lost(
        self, generation: int, lost: list[LostNode], failures: list[WorkerExit] | None = None
    ) -> GenerationResult:
        """A generation that lost a node: an elastic run goes on without it (a resize, no
        restart used); a fixed world's generation failed, blamed on that node."""
        first = lost[0]
        what = ", ".join(f"{n.where} lost: {n.why}" for n in lost)
        return GenerationResult(
            generation,
            Outcome.RESIZED if self.registry.elastic else Outcome.FAILED,
            failures=failures or [],
            root_rank=first.node_rank * self.config.nproc_per_node,
            message=what,
        )

    def _admission(self, now: float) -> GenerationResult | None:
        """An elastic run with room admits nodes that wait: a last call after the first one
        came, then the generation ends so that the next one has them."""
        if not self.registry.elastic or self.registry.nnodes >= self.config.nnodes:
            return None
        waiting = self.registry.waiting_agents(self._silent_s)
        if not waiting:
            self._waiting_since = None
            return None
        if self._waiting_since is None:
            self._waiting_since = now
        room = self.config.nnodes - self.registry.nnodes
        if len(waiting) < room and now - self._waiting_since < self.config.last_call_s:
            return None
        hosts = [self.registry.agent_hostname(a) or a for a in waiting[:room]]
        return GenerationResult(
            self.registry.generation,
            Outcome.RESIZED,
            message=f"{len(hosts)} node(s) joined ({', '.join(hosts)})",
        )

    def _failures_on_other_nodes(self) -> list[WorkerExit]:
        failed = self.registry.failed_ranks()
        return [
            WorkerExit(r.rank, r.pid, r.exit_code or 0, r.exited_at or time.time())
            for r in failed
            if r.rank not in self.group.workers
        ]

    def _sample_stats(self, alive: dict) -> None:
        for rank, w in alive.items():
            if not w.pid:  # psutil.Process(None) would be the launcher itself
                continue
            try:
                proc = self._stats.get(rank)
                if proc is None:
                    proc = self._stats[rank] = psutil.Process(w.pid)
                    proc.cpu_percent(None)  # the first call only starts the measurement
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_percent(None)
                self.registry.record_process_stats(rank, rss_bytes=rss, cpu_percent=cpu)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def _dump_stacks(self) -> dict[int, str]:
        """Ask every live worker for its Python stacks (all threads); return them per rank."""
        marks, stopped = {}, {}
        for rank, w in self.group.workers.items():
            if w.exitcode is None and w.pid:
                if self.group.is_stopped(rank):
                    # It could dump only if continued, and then the whole group would train
                    # on while judged hung (a run was seen to finish during its dump, then
                    # restarted for nothing). Why it hangs is known: it is stopped.
                    stopped[rank] = STOPPED_STACK
                    continue
                marks[rank] = self._pump.lines_seen(rank)
                self.group.signal(rank, STACK_DUMP_SIGNAL)
        if marks:
            self._pump.wait_quiet(list(marks), quiet_s=0.3, timeout_s=STACK_DUMP_WAIT_S)
        return {rank: "\n".join(self._pump.lines_since(rank, mark)) for rank, mark in marks.items()} | stopped

    def _record_remaining_exits(self, generation: int) -> None:
        """How the workers that were still running ended (the registry keeps the first report
        of each: those already recorded are unchanged)."""
        for rank, w in self.group.workers.items():
            if w.exitcode is not None:
                self.registry.record_exit(rank, generation, w.exitcode)

    # -- stopping ------------------------------------------------------------------------

    def stop_group(self, first_signal: int = signal.SIGTERM) -> None:
        """Signal every process of every worker's tree; SIGKILL what remains after the grace."""
        self.group.stop(self.config.restart.stop_grace_s, first_signal)

    def pause(self) -> None:
        """Stop every worker's process group (Ctrl-Z on the launcher: the whole run pauses)."""
        self.group.pause()

    def resume(self) -> None:
        """Continue the workers after `pause`; the time paused counts for nobody's hang."""
        self.group.resume()
        self.registry.excuse_pause()

    def signal_workers(self, signum: int) -> None:
        self.group.signal_all(signum)


def _root_of_hang(verdicts: list[HangVerdict], stacks: dict[int, str]) -> int | None:
    """The rank that stopped first: prefer one whose main thread is not inside a collective
    (its peers wait in allreduce for it); else the one that went quiet first."""
    if not verdicts:
        return None
    for v in verdicts:
        if stacks.get(v.rank) == STOPPED_STACK:  # stopped by a signal: the others wait for it
            return v.rank
    for v in verdicts:
        main = _main_thread_stack(stacks.get(v.rank, ""))
        if main and not any(marker in main for marker in _COLLECTIVE_FRAMES):
            return v.rank
    return verdicts[0].rank


def _main_thread_stack(dump: str) -> str:
    """The innermost frames of the main thread in a faulthandler dump: threads are listed
    newest first, so the main thread is the last block; frames innermost first."""
    threads = [b for b in dump.split("\n\n") if "File " in b]
    if not threads:
        return ""
    frames = [line for line in threads[-1].splitlines() if line.strip().startswith("File ")]
    return "\n".join(frames[:3])

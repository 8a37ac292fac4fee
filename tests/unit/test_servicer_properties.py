"""Property-based test of the master's servicer: random sequences of well-formed and malformed
requests (issue 5, "Security": the master validates everything it receives).

A hypothesis state machine drives an `OrchestratorServicer` over a real `Registry` (a fake
clock, a fake port picker, no sockets) and keeps a small model of what the run should look
like: which slots hold which pid, which ranks exited, the current generation. Every call must
either reply or abort with one of the four codes the servicer maps registry refusals to; a
refused call must change nothing; and after every step the invariants below must hold.

The bugs it found (a rank reported dead before registering took heartbeats with pid 0; a
rank's metric names grew without bound; a registration was taken for a retry when its pid
alone matched, so a worker on another host got a taken rank) are pinned by the regression
tests at the bottom.
"""

from __future__ import annotations

import functools
import math
import string
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ddp_launch.control.master import OrchestratorServicer
from ddp_launch.proto import orchestrator_pb2 as pb
from ddp_launch.registry import MAX_METRICS, MAX_TEXT, Registry
from tests.fakes import FakeClock
from tests.unit.servicer_fakes import Aborted, FakeContext, run_async

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FIRST_PORT = 31000
HOSTNAME_LIMIT = 256  # the longest hostname the master takes, and the most of an exception type it keeps
NAME_LIMIT = 64  # the longest metric name a heartbeat may carry

INVALID = grpc.StatusCode.INVALID_ARGUMENT
STALE = grpc.StatusCode.FAILED_PRECONDITION
DUPLICATE = grpc.StatusCode.ALREADY_EXISTS
UNKNOWN = grpc.StatusCode.NOT_FOUND
ALLOWED_CODES = {INVALID, STALE, DUPLICATE, UNKNOWN}


class FakePorts:
    def __init__(self) -> None:
        self.next = FIRST_PORT

    def __call__(self, host: str) -> int:
        self.next += 1
        return self.next - 1


def make_servicer(nnodes: int, local_world_size: int, clock: FakeClock | None = None) -> OrchestratorServicer:
    registry = Registry(
        run_id="run-prop",
        nnodes=nnodes,
        local_world_size=local_world_size,
        max_restarts=3,
        ddp_addr="10.0.0.1",
        port_picker=FakePorts(),
        clock=clock or FakeClock(500.0),
    )
    return OrchestratorServicer(registry)


def comparable(status: pb.RunStatus) -> pb.RunStatus:
    """GetStatus without the fields that move with the clock alone."""
    copy = pb.RunStatus()
    copy.CopyFrom(status)
    copy.elapsed_s = 0.0
    for r in copy.ranks:
        r.heartbeat_age_s = 0.0
    return copy


# -- strategies -----------------------------------------------------------------------------
# Half the requests are well-formed (every field drawn from a GOOD_ strategy: what a real
# worker sends, which may still be refused, e.g. for a slot someone else holds); the others
# have one or two fields drawn from a BAD_ strategy: out of range, stale or future, negative,
# non-finite, oversized (a bad value may happen to be a valid one).


@functools.cache
def index_in(n: int) -> st.SearchStrategy[int]:
    """A slot index for a dimension of size n: valid, just outside, or extreme."""
    return st.one_of(st.integers(0, n - 1), st.integers(-2, n + 1), st.sampled_from([INT32_MIN, INT32_MAX]))


@functools.cache
def below(n: int) -> st.SearchStrategy[int]:
    return st.integers(0, n - 1)


@functools.cache
def bad_fields(fields: tuple[str, ...]) -> st.SearchStrategy[set[str]]:
    """No bad field (a well-formed request) half the time, else one, or two."""
    one = st.sampled_from(fields).map(lambda f: {f})
    return st.one_of(st.just(set()), st.one_of(one, one, st.sets(st.sampled_from(fields), min_size=2, max_size=2)))


@functools.cache
def generation_near(g: int) -> st.SearchStrategy[int]:
    """The current generation, an older or a future one, or an extreme one."""
    return st.one_of(st.just(g), st.integers(g - 2, g + 2), st.sampled_from([INT32_MIN, INT32_MAX]))


GOOD_PIDS = st.integers(1, 6)  # few, so that pids collide
BAD_PIDS = st.one_of(st.integers(-3, 0), st.sampled_from([INT32_MIN, INT32_MAX]))
ANY_PIDS = st.one_of(GOOD_PIDS, BAD_PIDS)  # for a registered rank, a good pid is likely another's
GOOD_HOSTNAMES = st.one_of(st.sampled_from(["node-a", "node-b", "gpu01.cluster", ""]), st.text(max_size=8))
BAD_HOSTNAMES = st.one_of(
    st.integers(HOSTNAME_LIMIT - 1, HOSTNAME_LIMIT + 2).map(lambda n: "h" * n),
    st.integers(1_000, 100_000).map(lambda n: "x" * n),  # huge
)
GOOD_COUNTS = st.integers(0, 10**6)
BAD_COUNTS = st.one_of(st.integers(-3, -1), st.sampled_from([INT64_MIN, INT64_MAX]))
GOOD_FLOATS = st.floats(-1e6, 1e6)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
BAD_FLOATS = st.one_of(NON_FINITE, NON_FINITE, st.floats())  # floats(): also NaN, huge
GOOD_LOSSES = st.one_of(GOOD_FLOATS, GOOD_FLOATS, NON_FINITE)  # a diverged loss is still a real worker's
GOOD_METRICS = st.one_of(
    st.dictionaries(st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8), GOOD_FLOATS, max_size=6),
    # many: up to the limit, with names that differ from one heartbeat to the next (a rank
    # must not pile them up)
    st.tuples(st.integers(MAX_METRICS - 6, MAX_METRICS), st.integers(0, 9)).map(
        lambda t: {f"g{t[1]}_{i}": float(i) for i in range(t[0])}
    ),
)
BAD_METRICS = st.one_of(
    st.dictionaries(
        st.one_of(
            st.sampled_from(["loss", "lr", "acc", ""]),
            st.integers(NAME_LIMIT - 1, NAME_LIMIT + 2).map(lambda n: "m" * n),  # long names
            st.integers(1_000, 10_000).map(lambda n: "k" * n),
        ),
        st.one_of(GOOD_FLOATS, BAD_FLOATS),
        max_size=6,
    ),
    st.integers(MAX_METRICS + 1, MAX_METRICS + 40).map(lambda n: {f"x{i}": 1.0 for i in range(n)}),  # too many
)
GOOD_EXCEPTIONS = st.sampled_from(["RuntimeError", "torch.OutOfMemoryError", ""])
GOOD_TRACEBACKS = st.sampled_from(["", "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n"])
BAD_TRACEBACKS = st.integers(MAX_TEXT - 1, MAX_TEXT + 50_000).map(lambda n: "t" * n)
EXIT_CODES = st.sampled_from([0, 1, 2, -9, -15, 137, INT32_MIN, INT32_MAX])
PAUSES = st.sampled_from([0.0, 0.5, 3.0, 120.0])
WAITS = st.sampled_from([0.0, -1.0, -math.inf, math.nan])  # never blocks: the wait is clamped at 0


class ServicerMachine(RuleBasedStateMachine):
    """Random requests against one servicer; the model says what each may answer."""

    @initialize(nnodes=st.integers(1, 3), lws=st.integers(1, 3))
    def setup(self, nnodes: int, lws: int) -> None:
        self.clock = FakeClock(500.0)
        self.s = make_servicer(nnodes, lws, self.clock)
        self.reg = self.s.registry
        self.nnodes, self.lws, self.world = nnodes, lws, nnodes * lws
        self.aborted = Counter()  # by code
        self.generation = 0
        self.ddp_port = FIRST_PORT
        self._new_generation()

    def _new_generation(self) -> None:
        self.pids: dict[int, int] = {}  # rank -> pid of its first accepted registration
        self.hostnames: dict[int, str] = {}  # rank -> hostname it registered with
        self.exits: dict[int, int] = {}  # rank -> last exit code reported (this generation)
        self.steps: dict[int, tuple[int, int]] = {}  # rank -> (step, samples) of its last accepted heartbeat

    # -- one call, checked --------------------------------------------------------------

    def call(self, method, request, *, codes: set, reply_ok: bool, unchanged_on_reply: bool = False):
        """Call `method`; it must abort with a code in `codes` or (when reply_ok) reply.

        An abort, or a reply the model says is ignored (unchanged_on_reply), must leave the
        state as it was.
        """
        assert codes or reply_ok
        before, before_snap = comparable(self.status()), self.reg.snapshot()
        try:
            reply = method(request, FakeContext())
        except Aborted as e:
            self.aborted[e.code] += 1
            assert e.code in ALLOWED_CODES, e
            assert e.code in codes, f"{type(request).__name__} aborted with {e}; expected one of {codes} or a reply"
            assert e.details
            assert comparable(self.status()) == before, f"a rejected {type(request).__name__} changed the status"
            assert self.reg.snapshot() == before_snap
            return None
        assert reply_ok, f"{type(request).__name__} replied {reply!r}; expected an abort with one of {codes}"
        if unchanged_on_reply:
            assert comparable(self.status()) == before, f"an ignored {type(request).__name__} changed the status"
        return reply

    def status(self) -> pb.RunStatus:
        return self.s.GetStatus(pb.StatusRequest(), FakeContext())

    def registered(self, rank: int) -> bool:
        return rank in self.pids

    def identity_faults(self, rank: int, generation: int, pid: int | None) -> set:
        """Codes for a request that names a rank (and a pid) which does not hold a slot."""
        faults = set()
        if not 0 <= rank < self.world:
            return {INVALID} | ({STALE} if generation != self.generation else set())
        if generation != self.generation:
            faults.add(STALE)
        elif not self.registered(rank):
            faults.add(UNKNOWN)  # also when its exit was reported: it still never registered
        elif pid is not None and pid != self.pids[rank]:
            faults.add(DUPLICATE)
        return faults

    def retry_of(self, rank: int, pid: int, hostname: str) -> bool:
        """Whether a registration is the slot's holder asking again (a reply that was lost): the
        same pid on the same host (pids repeat across hosts, containers number theirs alike)."""
        return self.pids.get(rank) == pid and self.hostnames[rank] == hostname

    # Strategies built per draw are slow in hypothesis: the dynamic choices below draw an index
    # from a cached strategy, and a constant good value is not drawn at all.

    def begin_request(self, data, *fields: str) -> None:
        """Half the requests are well-formed; a malformed one has one bad field, or two."""
        self.bad = data.draw(bad_fields(fields), label="bad fields")

    def field(self, data, label: str, good, bad: st.SearchStrategy):
        """A field of the request being built: `good` (a strategy, or a value) unless the field
        is to be bad (and a bad value may happen to be a valid one)."""
        if label in self.bad:
            return data.draw(bad, label=label)
        return data.draw(good, label=label) if isinstance(good, st.SearchStrategy) else good

    def pick(self, data, options: list, label: str):
        return options[data.draw(below(len(options)), label=label)]

    def rank_field(self, data) -> int:
        """A rank as a worker names itself: mostly a registered one, else one that is not
        (never was, or died before it could: its exit was reported)."""
        if "rank" in self.bad:
            return data.draw(index_in(self.world), label="rank")
        others = [r for r in range(self.world) if r not in self.pids]
        if others and data.draw(below(3), label="an unregistered rank") == 0:
            return self.pick(data, others, "rank")
        return self.pick(data, sorted(self.pids), "rank")

    def generation_field(self, data) -> int:
        return self.field(data, "generation", self.generation, generation_near(self.generation))

    def pid_field(self, data, rank: int) -> int:
        return self.field(data, "pid", self.pids.get(rank, GOOD_PIDS), ANY_PIDS)

    # -- rules ----------------------------------------------------------------------------

    @rule(data=st.data())
    def register(self, data) -> None:
        self.begin_request(data, "slot", "pid", "hostname", "generation")
        any_slot = data.draw(below(4), label="any_slot") == 0  # a worker started by hand
        free = [r for r in range(self.world) if r not in self.pids and r not in self.exits]
        # a worker usually registers into a free slot; sometimes into a taken one (its own: a retry)
        if free and data.draw(st.booleans(), label="a free slot"):
            rank = self.pick(data, free, "slot")
        else:
            rank = data.draw(below(self.world), label="slot")
        node, local = rank // self.lws, rank % self.lws
        if "slot" in self.bad:
            node = data.draw(index_in(self.nnodes), label="node_rank")
            local = data.draw(index_in(self.lws), label="local_rank")
        valid_slot = 0 <= node < self.nnodes and 0 <= local < self.lws
        rank = node * self.lws + local
        if (valid_slot or any_slot) and rank in self.pids:  # its holder again (a retry), or someone else
            pid, hostname = self.pids[rank], self.hostnames[rank]
            who = data.draw(below(3), label="the holder, the same pid on another host, another pid")
            if who == 1:
                hostname = data.draw(GOOD_HOSTNAMES, label="hostname")
            elif who == 2:
                pid = data.draw(GOOD_PIDS, label="pid")
            pid = self.field(data, "pid", pid, BAD_PIDS)
            hostname = self.field(data, "hostname", hostname, BAD_HOSTNAMES)
        else:
            pid = self.field(data, "pid", GOOD_PIDS, BAD_PIDS)
            hostname = self.field(data, "hostname", GOOD_HOSTNAMES, BAD_HOSTNAMES)
        gen = self.generation_field(data)
        request = pb.RegisterRequest(
            node_rank=node, local_rank=local, pid=pid, hostname=hostname, generation=gen, any_slot=any_slot
        )

        codes, soft, targets = set(), set(), set()  # targets: the ranks a reply may give
        if pid <= 0 or len(hostname) > HOSTNAME_LIMIT:
            codes.add(INVALID)
        if gen != self.generation:
            codes.add(STALE)
        if any_slot:  # node and local rank are ignored: the slot it holds, else the lowest free one
            held = [r for r in sorted(self.pids) if self.retry_of(r, pid, hostname)]
            if held:
                targets.add(held[0])
            elif free:
                targets.add(free[0])
                if pid in self.pids.values():
                    soft.add(DUPLICATE)  # the same pid on another host: refusing it is fine too
            else:
                codes.add(DUPLICATE)  # every rank is taken
        elif not valid_slot:
            codes.add(INVALID)
        else:
            targets.add(rank)
            if self.registered(rank) and not self.retry_of(rank, pid, hostname):
                codes.add(DUPLICATE)
            elif not self.registered(rank) and rank in self.exits:
                soft.add(DUPLICATE)  # the worker was reported dead: refusing it is fine, so is taking it
        reply = self.call(self.s.Register, request, codes=codes | soft, reply_ok=not codes)
        if reply is None:
            return
        assert reply.rank in targets, f"got rank {reply.rank}, expected one of {targets}"
        rank = reply.rank
        assert (reply.node_rank, reply.local_rank) == (rank // self.lws, rank % self.lws)
        assert (reply.world_size, reply.local_world_size, reply.nnodes) == (self.world, self.lws, self.nnodes)
        assert (reply.generation, reply.ddp_port, reply.ddp_addr, reply.run_id) == (
            self.generation,
            self.ddp_port,
            "10.0.0.1",
            "run-prop",
        )
        if not self.registered(rank):  # the first accepted registration of the slot
            self.pids[rank] = pid
            self.hostnames[rank] = hostname
            self.exits.pop(rank, None)  # a slot reported dead and then taken: it lives again

    @precondition(lambda self: self.pids)  # from a worker, so once one registered
    @rule(data=st.data())
    def can_start_training(self, data) -> None:
        self.begin_request(data, "rank", "generation")
        rank = self.rank_field(data)
        gen = self.generation_field(data)
        request = pb.BarrierRequest(rank=rank, generation=gen, wait_s=data.draw(WAITS, label="wait_s"))
        if gen < self.generation:  # an old generation's worker is told to stop
            codes = {INVALID} if not 0 <= rank < self.world else set()
            reply = self.call(self.s.CanStartTraining, request, codes=codes, reply_ok=True, unchanged_on_reply=True)
            if reply is not None:
                assert (reply.open, reply.superseded) == (False, True)
            return
        codes = self.identity_faults(rank, gen, None)
        reply = self.call(self.s.CanStartTraining, request, codes=codes, reply_ok=not codes)
        if reply is not None:
            assert reply.superseded is False
            assert reply.open == (len(self.pids) == self.world)

    @precondition(lambda self: self.pids)  # from a worker, so once one registered
    @rule(data=st.data())
    def send_heartbeat(self, data) -> None:
        self.begin_request(data, "rank", "pid", "generation", "step", "samples", "total", "loss", "metrics")
        rank = self.rank_field(data)
        pid = self.pid_field(data, rank)
        gen = self.generation_field(data)
        step, samples, total = (self.field(data, n, GOOD_COUNTS, BAD_COUNTS) for n in ("step", "samples", "total"))
        self.clock.now += data.draw(PAUSES, label="seconds since the last request")
        has_loss = "loss" in self.bad or data.draw(st.booleans(), label="has_loss")
        loss = self.field(data, "loss", GOOD_LOSSES, BAD_FLOATS) if has_loss else 0.0
        metrics = self.field(data, "metrics", GOOD_METRICS, BAD_METRICS)
        request = pb.Heartbeat(
            rank=rank,
            generation=gen,
            pid=pid,
            step=step,
            samples=samples,
            has_loss=has_loss,
            loss=loss,
            metrics=metrics,
            total_steps=total,
        )

        bad_metrics = len(metrics) > MAX_METRICS or any(
            not name or len(name) > NAME_LIMIT or not math.isfinite(v) for name, v in metrics.items()
        )
        hard = {INVALID} if min(step, samples, total) < 0 or bad_metrics else set()
        soft = {INVALID} if has_loss and not math.isfinite(loss) else set()  # a diverged loss: dropped or refused
        if gen < self.generation:  # superseded: the reply says so and nothing is recorded
            reply = self.call(
                run_async(self.s.SendHeartbeat), request, codes=hard | soft, reply_ok=True, unchanged_on_reply=True
            )
            if reply is not None:
                assert reply.superseded is True
            return
        codes = hard | self.identity_faults(rank, gen, pid)
        before = self.reg.snapshot()
        reply = self.call(run_async(self.s.SendHeartbeat), request, codes=codes | soft, reply_ok=not codes)
        if reply is None:
            return
        assert reply.superseded is False
        after = self.reg.snapshot()
        view = after.ranks[rank]
        assert (view.step, view.samples) == (step, samples)
        if has_loss and math.isfinite(loss):
            assert view.loss == loss
        else:
            assert view.loss == before.ranks[rank].loss  # a missing or diverged loss keeps the last one
        if total:
            assert after.total_steps == total
        for name, value in metrics.items():
            assert view.metrics[name] == value
        self.steps[rank] = (step, samples)

    @precondition(lambda self: self.pids)  # from a worker, so once one registered
    @rule(data=st.data())
    def report_failure(self, data) -> None:
        self.begin_request(data, "rank", "pid", "generation", "exception_type", "traceback")
        rank = self.rank_field(data)
        pid = self.pid_field(data, rank)
        gen = self.generation_field(data)
        exc = self.field(data, "exception_type", GOOD_EXCEPTIONS, BAD_HOSTNAMES)
        tb = self.field(data, "traceback", GOOD_TRACEBACKS, BAD_TRACEBACKS)
        request = pb.FailureReport(rank=rank, generation=gen, pid=pid, exception_type=exc, traceback=tb)
        codes = self.identity_faults(rank, gen, pid)
        soft = {INVALID} if len(exc) > HOSTNAME_LIMIT or len(tb) > MAX_TEXT else set()  # refused or truncated
        reply = self.call(self.s.ReportFailure, request, codes=codes | soft, reply_ok=not codes)
        if reply is not None:
            view = self.reg.snapshot().ranks[rank]
            assert exc.startswith(view.exception_type) and tb.endswith(view.traceback)
            assert view.exception_type == exc or len(exc) > HOSTNAME_LIMIT
            assert view.traceback == tb or len(tb) > MAX_TEXT

    @precondition(lambda self: self.pids)  # from a node's launcher, once its workers run
    @rule(data=st.data(), code=EXIT_CODES)
    def report_exit(self, data, code: int) -> None:
        self.begin_request(data, "rank", "generation")
        rank = self.rank_field(data)  # mostly a worker that registered, sometimes one that died before
        gen = self.generation_field(data)
        request = pb.ExitReport(rank=rank, generation=gen, exit_code=code)
        codes = {INVALID} if not 0 <= rank < self.world else set()
        if gen != self.generation:  # another generation's exit changes nothing (or is refused)
            self.call(self.s.ReportExit, request, codes=codes | {STALE}, reply_ok=not codes, unchanged_on_reply=True)
            return
        if self.call(self.s.ReportExit, request, codes=codes, reply_ok=not codes) is not None:
            self.exits.setdefault(rank, code)  # a worker ends once: a second report changes nothing

    # The supervisor restarts the world after a failure (an exit), or a hang (once it trains).
    @precondition(lambda self: (self.exits or len(self.pids) == self.world) and self.generation < 6)
    @rule()
    def restart(self) -> None:
        self.reg.begin_generation(self.generation + 1)
        self.generation += 1
        self.ddp_port += 1
        self._new_generation()

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def rejections_are_counted(self) -> None:
        assert sum(self.s.rejections.values()) == sum(self.aborted.values())
        assert set(self.s.rejections) <= {"invalid", "stale", "duplicate", "unknown"}

    @invariant()
    def ranks_are_the_models(self) -> None:
        status = self.status()
        assert (status.world_size, status.generation, status.run_id) == (self.world, self.generation, "run-prop")
        assert [r.rank for r in status.ranks] == list(range(self.world))
        complete = len(self.pids) == self.world
        taken = [r.rank for r in status.ranks if r.state != "starting"]
        assert len(taken) == len(set(taken)) <= self.world
        for r in status.ranks:
            assert (r.node_rank, r.local_rank, r.generation) == (r.rank // self.lws, r.rank % self.lws, self.generation)
            if r.rank in self.exits:
                assert r.state == ("done" if self.exits[r.rank] == 0 else "failed")
            elif r.rank in self.pids:
                assert r.state == ("training" if complete else "waiting")
            else:
                assert r.state == "starting"
            if r.rank in self.pids:
                # the first accepted registration of this generation holds the slot
                assert (r.pid, r.hostname) == (self.pids[r.rank], self.hostnames[r.rank])
            else:
                assert (r.pid, r.hostname) == (0, ""), f"rank {r.rank} never registered but shows pid {r.pid}"
                assert (r.step, r.samples, r.has_loss, len(r.metrics)) == (0, 0, False, 0)
            assert len(r.hostname) <= HOSTNAME_LIMIT

    @invariant()
    def barrier_open_only_when_complete(self) -> None:
        complete = len(self.pids) == self.world
        assert self.reg.barrier_open == complete
        assert self.reg.snapshot().barrier_open == complete
        if self.pids:  # and a registered rank that asks is told the same
            rank = min(self.pids)
            reply = self.s.CanStartTraining(pb.BarrierRequest(rank=rank, generation=self.generation), FakeContext())
            assert (reply.open, reply.superseded) == (complete, False)

    @invariant()
    def progress_values_are_sane(self) -> None:
        status = self.status()
        assert status.total_steps >= 0
        for r in status.ranks:
            assert r.step >= 0 and r.samples >= 0
            if r.has_loss:
                assert math.isfinite(r.loss)
            else:
                assert r.loss == 0.0
            assert math.isfinite(r.steps_per_s)
            assert all(math.isfinite(v) for v in r.metrics.values())
            if r.rank in self.steps:
                assert (r.step, r.samples) == self.steps[r.rank]
            assert len(r.metrics) <= MAX_METRICS, f"rank {r.rank} holds {len(r.metrics)} metrics"
        for view in self.reg.snapshot().ranks:
            assert len(view.exception_type) <= HOSTNAME_LIMIT and len(view.traceback) <= MAX_TEXT


SETTINGS = settings(
    max_examples=200,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TestServicerProperties = ServicerMachine.TestCase  # a new class on every access: set settings on this one
TestServicerProperties.settings = SETTINGS


# -- what it found, pinned ----------------------------------------------------------------


def test_a_rank_reported_dead_before_registering_is_still_unregistered():
    s = make_servicer(1, 2)
    s.ReportExit(pb.ExitReport(rank=0, generation=0, exit_code=1), FakeContext())  # died on import
    before = comparable(s.GetStatus(pb.StatusRequest(), FakeContext()))
    with pytest.raises(Aborted) as e:
        run_async(s.SendHeartbeat)(pb.Heartbeat(rank=0, generation=0, pid=0, step=5, samples=9), FakeContext())
    assert e.value.code is UNKNOWN
    assert comparable(s.GetStatus(pb.StatusRequest(), FakeContext())) == before


def test_a_ranks_metrics_stay_bounded_across_heartbeats():
    s = make_servicer(1, 1)
    s.Register(pb.RegisterRequest(node_rank=0, local_rank=0, pid=42, hostname="h", generation=0), FakeContext())
    for batch in range(3):
        metrics = {f"b{batch}_{i}": float(i) for i in range(MAX_METRICS)}
        try:
            run_async(s.SendHeartbeat)(
                pb.Heartbeat(rank=0, generation=0, pid=42, step=batch, metrics=metrics), FakeContext()
            )
        except Aborted:
            pass  # refusing the new names is one fix
    assert len(s.GetStatus(pb.StatusRequest(), FakeContext()).ranks[0].metrics) <= MAX_METRICS


@pytest.mark.parametrize("any_slot", [False, True], ids=["explicit-slot", "any-slot"])
def test_a_worker_on_another_host_with_the_same_pid_does_not_get_a_taken_rank(any_slot):
    s = make_servicer(2, 1)
    first = pb.RegisterRequest(node_rank=0, local_rank=0, pid=7, hostname="node-a", generation=0, any_slot=any_slot)
    assert s.Register(first, FakeContext()).rank == 0
    # e.g. two containers, or a launcher started with the wrong --node-rank, whose worker is also pid 7
    other = pb.RegisterRequest(node_rank=0, local_rank=0, pid=7, hostname="node-b", generation=0, any_slot=any_slot)
    try:
        rank = s.Register(other, FakeContext()).rank
    except Aborted as e:
        assert e.code is DUPLICATE
    else:
        assert rank != 0, "two workers (node-a and node-b, both pid 7) were both given rank 0"
    assert s.GetStatus(pb.StatusRequest(), FakeContext()).ranks[0].hostname == "node-a"

"""The Registry's membership: nodes' launchers join, leave, go silent, and (elastic runs) are
named in each generation. A plain object with a fake clock and a pinned DDP port: no sockets."""

from __future__ import annotations

import pytest

from ddp_launch.registry import MASTER_AGENT, RUNNING, LostNode, Registry, Rejected, RunState
from tests.fakes import FakeClock

START = 1000.0
NPROC = 2
DDP_PORT = 29500


def no_port(host: str) -> int:
    raise AssertionError("the DDP port is pinned: no port may be picked")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


def make_registry(clock: FakeClock, *, nnodes: int = 3, min_nodes: int | None = None) -> Registry:
    return Registry(
        run_id="run-1",
        nnodes=nnodes,
        local_world_size=NPROC,
        max_restarts=0,
        ddp_addr="127.0.0.1",
        ddp_port=DDP_PORT,
        port_picker=no_port,
        clock=clock,
        min_nodes=min_nodes,
    )


def join(reg: Registry, agent: str, node_rank: int = -1, nproc: int = NPROC) -> int:
    return reg.join(agent, f"host-{agent}", nproc, node_rank)


def rank_of(reg: Registry, agent: str) -> int:
    return reg.run_state().node_rank_of(agent)


# -- a fixed world: node ranks for the whole run ----------------------------------------------


def test_joins_by_arrival_get_the_lowest_free_node_ranks(clock) -> None:
    reg = make_registry(clock)

    first = join(reg, "a")
    second = join(reg, "b")

    assert (rank_of(reg, "a"), rank_of(reg, "b")) == (1, 2)
    assert reg.run_state().nodes == (MASTER_AGENT, "a", "b")
    assert second > first  # every stream has its own serial
    assert reg.live_agents() == ["a", "b"]
    assert reg.agent_hostname("b") == "host-b"


def test_a_join_beyond_the_last_node_rank_is_refused(clock) -> None:
    reg = make_registry(clock)
    join(reg, "a")
    join(reg, "b")

    with pytest.raises(Rejected) as e:
        join(reg, "c")

    assert e.value.reason == Rejected.DUPLICATE
    assert "all 3 node ranks" in str(e.value)
    assert reg.live_agents() == ["a", "b"]  # the refused launcher is no member
    assert rank_of(reg, "c") == -1


def test_an_explicit_node_rank_held_by_another_is_refused_naming_its_host(clock) -> None:
    reg = make_registry(clock)
    join(reg, "a", node_rank=2)

    with pytest.raises(Rejected) as e:
        join(reg, "b", node_rank=2)

    assert e.value.reason == Rejected.DUPLICATE
    assert str(e.value) == "node rank 2 is taken by the launcher on host-a"
    assert rank_of(reg, "a") == 2
    assert reg.live_agents() == ["a"]
    # By arrival, the one rank left is still free.
    join(reg, "b")
    assert rank_of(reg, "b") == 1


@pytest.mark.parametrize("node_rank", [0, 3, 7])
def test_an_explicit_node_rank_out_of_range_is_invalid(clock, node_rank) -> None:
    reg = make_registry(clock)

    with pytest.raises(Rejected) as e:
        join(reg, "a", node_rank=node_rank)

    assert e.value.reason == Rejected.INVALID
    assert f"node rank {node_rank} outside [1, 3)" in str(e.value)
    assert reg.live_agents() == []
    assert reg.run_state().nodes == (MASTER_AGENT, "", "")


def test_a_join_with_another_nproc_per_node_is_invalid_naming_both_counts(clock) -> None:
    reg = make_registry(clock)

    with pytest.raises(Rejected) as e:
        join(reg, "a", nproc=4)

    assert e.value.reason == Rejected.INVALID
    assert "--nproc-per-node 4" in str(e.value)
    assert f"the run has {NPROC} per node" in str(e.value)
    assert reg.live_agents() == []
    assert rank_of(reg, "a") == -1


@pytest.mark.parametrize("agent", ["", MASTER_AGENT])
def test_an_empty_or_the_masters_agent_id_is_invalid(clock, agent) -> None:
    reg = make_registry(clock)

    with pytest.raises(Rejected) as e:
        reg.join(agent, "host-x", NPROC)

    assert e.value.reason == Rejected.INVALID
    assert reg.live_agents() == []
    assert reg.run_state().nodes == (MASTER_AGENT, "", "")


# -- leaving ---------------------------------------------------------------------------------


def test_a_leave_while_the_run_goes_on_loses_the_node_and_frees_its_rank(clock) -> None:
    reg = make_registry(clock)
    serial = join(reg, "a")
    join(reg, "b")

    reg.leave("a", serial)

    lost = reg.lost_nodes()
    assert [(n.node_rank, n.hostname) for n in lost] == [(1, "host-a")]
    assert "stopped answering" in lost[0].why
    assert lost[0].where == "node 1 (host-a)"
    assert reg.live_agents() == ["b"]
    assert reg.run_state().nodes == (MASTER_AGENT, "", "b")
    # A launcher that replaces it takes the freed rank.
    join(reg, "c")
    assert rank_of(reg, "c") == 1


def test_a_leave_of_a_stream_a_rejoin_replaced_changes_nothing(clock) -> None:
    reg = make_registry(clock)
    old = join(reg, "a")
    new = join(reg, "a")  # its launcher lost the master and came back: a new stream
    reg.begin_generation(1)  # the rejoin's loss belongs to generation 0
    assert reg.lost_nodes() == []

    reg.leave("a", old)  # the old stream's end arrives late

    assert new != old
    assert reg.lost_nodes() == []
    assert reg.live_agents() == ["a"]
    assert rank_of(reg, "a") == 1
    assert not reg.evicted("a", new)


def test_a_leave_after_the_run_ended_loses_nobody(clock) -> None:
    reg = make_registry(clock)
    serial = join(reg, "a")
    reg.end_run("succeeded", "", 0)

    reg.leave("a", serial)

    assert reg.lost_nodes() == []
    assert reg.run_state().state == "succeeded"
    assert reg.live_agents() == []


def test_a_leave_in_an_elastic_run_loses_the_node_but_keeps_the_generations_nodes(clock) -> None:
    reg = make_registry(clock, min_nodes=2)
    serial = join(reg, "a")
    reg.begin_generation(0, [MASTER_AGENT, "a"])

    reg.leave("a", serial)

    assert reg.lost_nodes() == [LostNode(1, "host-a", "its launcher stopped answering the master")]
    assert reg.run_state().nodes == (MASTER_AGENT, "a")  # until the next generation names others
    assert reg.live_agents() == []


# -- rejoining -------------------------------------------------------------------------------


def test_a_rejoin_of_a_node_of_the_generation_loses_that_node(clock) -> None:
    reg = make_registry(clock)
    join(reg, "a")
    join(reg, "b")

    join(reg, "b")

    lost = reg.lost_nodes()
    assert [(n.node_rank, n.hostname) for n in lost] == [(2, "host-b")]
    assert "rejoined" in lost[0].why
    assert rank_of(reg, "b") == 2  # a fixed world keeps its rank
    assert reg.live_agents() == ["a", "b"]


def test_a_rejoin_by_arrival_keeps_its_node_rank_when_a_lower_one_is_free(clock) -> None:
    reg = make_registry(clock)
    serial = join(reg, "a")
    join(reg, "b")
    reg.leave("a", serial)  # node rank 1 is free again

    join(reg, "b")  # b's launcher lost the master and came back

    # "the node takes ... the lowest untaken one, for the whole run": b stays node 2, once.
    assert reg.run_state().nodes == (MASTER_AGENT, "", "b")
    join(reg, "c")  # and a launcher that replaces a takes node 1
    assert rank_of(reg, "c") == 1


def test_a_rejoin_of_a_waiting_node_in_an_elastic_run_loses_nothing(clock) -> None:
    reg = make_registry(clock, min_nodes=2)
    join(reg, "a")
    join(reg, "b")
    reg.begin_generation(0, [MASTER_AGENT, "a"])

    join(reg, "b")  # b holds no node of generation 0

    assert reg.lost_nodes() == []
    assert reg.waiting_agents() == ["b"]

    join(reg, "a")  # a does

    assert [(n.node_rank, "rejoined" in n.why) for n in reg.lost_nodes()] == [(1, True)]


# -- silence ---------------------------------------------------------------------------------


def test_a_node_silent_for_longer_than_the_limit_is_lost(clock) -> None:
    reg = make_registry(clock, nnodes=2)
    join(reg, "a")
    clock.advance(5.0)
    assert reg.lost_nodes(silent_after_s=5) == []  # exactly at the limit: not yet

    clock.advance(1.0)

    assert reg.lost_nodes(silent_after_s=5) == [LostNode(1, "host-a", "no heartbeat from its launcher for 6 s")]


def test_silence_is_only_checked_when_asked_for(clock) -> None:
    reg = make_registry(clock, nnodes=2)
    join(reg, "a")
    clock.advance(100.0)

    assert reg.lost_nodes() == []
    assert reg.live_agents() == ["a"]
    assert reg.live_agents(silent_after_s=5) == []


def test_node_heartbeats_keep_a_node_alive(clock) -> None:
    reg = make_registry(clock, nnodes=2)
    join(reg, "a")
    clock.advance(4.0)
    reg.node_seen("a")
    clock.advance(4.0)  # 8 s since its join, 4 s since its last heartbeat

    assert reg.lost_nodes(silent_after_s=5) == []
    assert reg.live_agents(silent_after_s=5) == ["a"]

    clock.advance(2.0)

    assert [n.why for n in reg.lost_nodes(silent_after_s=5)] == ["no heartbeat from its launcher for 6 s"]


def test_a_silent_node_of_a_fixed_world_is_lost_but_not_evicted(clock) -> None:
    reg = make_registry(clock, nnodes=2)
    serial = join(reg, "a")
    clock.advance(6.0)

    assert len(reg.lost_nodes(silent_after_s=5)) == 1
    assert not reg.evicted("a", serial)
    assert reg.live_agents() == ["a"]


def test_a_silent_node_of_an_elastic_run_is_evicted_until_it_joins_again(clock) -> None:
    reg = make_registry(clock, min_nodes=2)
    old = join(reg, "a")
    reg.begin_generation(0, [MASTER_AGENT, "a"])
    clock.advance(6.0)

    assert [n.node_rank for n in reg.lost_nodes(silent_after_s=5)] == [1]

    assert reg.evicted("a", old)
    assert reg.live_agents() == []
    # Heartbeats on the old stream do not admit it again...
    reg.node_seen("a")
    assert reg.live_agents() == []
    assert reg.evicted("a", old)
    # ...a new stream does.
    new = join(reg, "a")
    assert new != old
    assert not reg.evicted("a", new)
    assert not reg.evicted("a", old)  # the old stream is no member any more
    assert reg.live_agents() == ["a"]


def test_a_silent_waiting_agent_is_not_lost_nor_evicted(clock) -> None:
    reg = make_registry(clock, min_nodes=2)
    join(reg, "a")
    serial = join(reg, "b")
    reg.begin_generation(0, [MASTER_AGENT, "a"])
    clock.advance(6.0)
    reg.node_seen("a")

    assert reg.lost_nodes(silent_after_s=5) == []  # b is no node of the generation
    assert not reg.evicted("b", serial)
    assert reg.waiting_agents(silent_after_s=5) == []
    assert reg.waiting_agents() == ["b"]


# -- an elastic run: the supervisor names each generation's nodes ----------------------------


def test_an_elastic_registry_has_no_generation_before_its_rendezvous(clock) -> None:
    reg = make_registry(clock, min_nodes=2)
    join(reg, "a")

    assert reg.elastic
    assert reg.generation == -1
    assert reg.run_state() == RunState(-1, RUNNING, nodes=())
    assert (reg.nnodes, reg.world_size) == (0, 0)
    assert rank_of(reg, "a") == -1  # a join takes no node rank in an elastic run
    assert reg.waiting_agents() == ["a"]


def test_a_fixed_registry_starts_at_generation_zero(clock) -> None:
    reg = make_registry(clock)

    assert not reg.elastic
    assert reg.generation == 0
    assert (reg.nnodes, reg.world_size) == (3, 3 * NPROC)
    assert reg.run_state() == RunState(0, RUNNING, nodes=(MASTER_AGENT, "", ""))


def test_begin_generation_sets_the_nodes_and_the_world_size(clock) -> None:
    reg = make_registry(clock, min_nodes=2)
    join(reg, "a")
    join(reg, "b")

    reg.begin_generation(0, [MASTER_AGENT, "a"])

    assert reg.generation == 0
    assert (reg.nnodes, reg.world_size) == (2, 2 * NPROC)
    assert reg.ddp_port == DDP_PORT
    assert reg.run_state().nodes == (MASTER_AGENT, "a")
    assert (rank_of(reg, MASTER_AGENT), rank_of(reg, "a"), rank_of(reg, "b")) == (0, 1, -1)
    assert reg.waiting_agents() == ["b"]
    snap = reg.snapshot()
    assert (snap.nnodes, snap.world_size, len(snap.ranks)) == (2, 2 * NPROC, 2 * NPROC)


def test_registration_follows_the_generations_node_count(clock) -> None:
    reg = make_registry(clock, min_nodes=2)
    join(reg, "a")
    reg.begin_generation(0, [MASTER_AGENT, "a"])

    a = reg.register(node_rank=1, local_rank=1, pid=4242, hostname="host-a", generation=0)

    assert (a.rank, a.node_rank, a.world_size, a.nnodes) == (3, 1, 2 * NPROC, 2)
    with pytest.raises(Rejected) as e:
        reg.register(node_rank=2, local_rank=0, pid=4343, hostname="host-b", generation=0)
    assert e.value.reason == Rejected.INVALID
    assert "node rank 2 outside [0, 2)" in str(e.value)


def test_a_resize_is_no_restart_and_a_restart_is_one(clock) -> None:
    reg = make_registry(clock, min_nodes=2)
    join(reg, "a")
    join(reg, "b")
    reg.begin_generation(0, [MASTER_AGENT, "a"])

    reg.begin_generation(1, [MASTER_AGENT, "a", "b"], restart=False)

    assert reg.restarts == 0
    assert (reg.nnodes, reg.world_size) == (3, 3 * NPROC)

    reg.begin_generation(2, [MASTER_AGENT, "b"], restart=True)

    assert reg.restarts == 1
    assert reg.snapshot().restarts == 1
    assert reg.run_state().nodes == (MASTER_AGENT, "b")
    assert reg.waiting_agents() == ["a"]


def test_a_generation_clears_the_last_ones_lost_nodes(clock) -> None:
    reg = make_registry(clock, min_nodes=2)
    serial = join(reg, "a")
    join(reg, "b")
    reg.begin_generation(0, [MASTER_AGENT, "a", "b"])
    reg.leave("a", serial)
    assert [n.node_rank for n in reg.lost_nodes()] == [1]

    reg.begin_generation(1, [MASTER_AGENT, "b"], restart=False)

    assert reg.lost_nodes() == []
    assert rank_of(reg, "b") == 1


@pytest.mark.parametrize(
    "nodes",
    [[], ["a"], ["a", MASTER_AGENT], [MASTER_AGENT, "a", "b", "c"]],
    ids=["empty", "no-master", "master-not-first", "longer-than-max"],
)
def test_a_bad_node_list_is_refused_and_changes_nothing(clock, nodes) -> None:
    reg = make_registry(clock, min_nodes=2)
    for agent in ("a", "b", "c"):
        join(reg, agent)

    with pytest.raises(ValueError):
        reg.begin_generation(0, nodes)

    assert reg.generation == -1
    assert reg.run_state().nodes == ()
    assert (reg.nnodes, reg.world_size) == (0, 0)


def test_an_elastic_generation_needs_its_nodes(clock) -> None:
    reg = make_registry(clock, min_nodes=2)

    with pytest.raises(ValueError):
        reg.begin_generation(0)

    assert reg.generation == -1


def test_a_fixed_registry_refuses_a_node_list(clock) -> None:
    reg = make_registry(clock)
    join(reg, "a")

    with pytest.raises(ValueError):
        reg.begin_generation(1, [MASTER_AGENT, "a"])

    assert reg.generation == 0
    assert reg.run_state().nodes == (MASTER_AGENT, "a", "")
    assert reg.nnodes == 3

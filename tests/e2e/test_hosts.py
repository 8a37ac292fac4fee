"""Several real hosts (network namespaces with their own addresses, hostnames and links):
a run across them, and the loss of the master's host, which must end every other host's
launcher in bounded time with nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.e2e import netns
from tests.e2e.launch import SCRIPTS, launcher_env

REASON = netns.available()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
PORT = 29400  # each host has a network stack of its own: any port is free there


def launcher(hosts: netns.Hosts, host: str, node_rank: int, tmp_path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "ddp_launch", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"h0:{PORT}", "--rdzv-id", "job1",
        "--node-rank", str(node_rank), "--run-dir", str(tmp_path / f"run-{host}"), "--stop-grace", "1", *args,
    ]  # fmt: skip


def start(hosts: netns.Hosts, host: str, node_rank: int, tmp_path, *args: str) -> subprocess.Popen:
    return hosts.popen(
        host,
        launcher(hosts, host, node_rank, tmp_path, *args),
        cwd=tmp_path,
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_files(paths, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        assert time.monotonic() < end, f"not written within {timeout_s} s: {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.1)


@pytest.mark.timeout(150)
def test_two_hosts_train_together(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with netns.Hosts(["h0", "h1"]) as hosts:
        script = [str(SCRIPTS / "hosts_train.py"), "20", "0.02", str(out)]
        node1 = start(hosts, "h1", 1, tmp_path, *script)
        node0 = start(hosts, "h0", 0, tmp_path, *script)
        out0, err0 = node0.communicate(timeout=120)
        out1, err1 = node1.communicate(timeout=60)
        assert (node0.returncode, node1.returncode) == (0, 0), (err0[-2000:], err1[-2000:])
        seen = {r: (out / f"rank-{r}.txt").read_text().split() for r in (0, 1)}
        # Each rank ran on its own host, in one world of 2, with the DDP store on h0.
        # gloo binds the interface that reaches the master: the host's only link.
        assert seen == {0: ["h0", "2", "h0", "eth0"], 1: ["h1", "2", "h0", "eth0"]}
        assert not hosts.pids("h0") and not hosts.pids("h1")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("elsewhere", ["127.0.1.1", "10.99.0.2"])
def test_a_host_whose_own_name_does_not_reach_it_still_trains(tmp_path, elsewhere):
    """h1's /etc/hosts says h1 is `elsewhere`: 127.0.1.1 (Debian's default), or the address
    of a second interface of h1's that h0 cannot reach. gloo, left alone, binds what the
    hostname resolves to; the launcher names the interface that reaches the master instead
    (a GLOO_SOCKET_IFNAME the user set is kept)."""
    out = tmp_path / "out"
    out.mkdir()
    with netns.Hosts(["h0", "h1"], own_name_at={"h1": elsewhere}) as hosts:
        script = [str(SCRIPTS / "hosts_train.py"), "20", "0.02", str(out)]
        node1 = start(hosts, "h1", 1, tmp_path, "--join-timeout", "30", *script)
        node0 = start(hosts, "h0", 0, tmp_path, "--join-timeout", "30", *script)
        out0, err0 = node0.communicate(timeout=120)
        out1, err1 = node1.communicate(timeout=60)
        assert (node0.returncode, node1.returncode) == (0, 0), (err0[-2000:], err1[-2000:])
        assert (out / "rank-1.txt").read_text().split() == ["h1", "2", "h0", "eth0"]


def vanish(tmp_path, victim: str) -> tuple[int, str, float]:
    """Two hosts train; then `victim` loses its link and every process on it dies, as in a
    power loss. Returns the other host's launcher's exit code, its stderr and how long it
    took to end after the cut; checks that nothing is left on that host."""
    out = tmp_path / "out"
    out.mkdir()
    survivor = "h1" if victim == "h0" else "h0"
    with netns.Hosts(["h0", "h1"]) as hosts:
        script = [str(SCRIPTS / "hosts_train.py"), "100000", "0.05", str(out)]
        nodes = {"h1": start(hosts, "h1", 1, tmp_path, *script), "h0": start(hosts, "h0", 0, tmp_path, *script)}
        wait_for_files([out / "rank-0.txt", out / "rank-1.txt"], timeout_s=90)

        hosts.cut(victim)
        hosts.kill_all(victim)
        cut_at = time.monotonic()
        try:
            _, err = nodes[survivor].communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{survivor}'s launcher was still running 60 s after {victim} vanished")
        took = time.monotonic() - cut_at
        nodes[victim].wait(timeout=10)
        print(f"{survivor}'s launcher ended {took:.1f} s after {victim} vanished")  # -s shows it
        end = time.monotonic() + 10
        while hosts.pids(survivor) and time.monotonic() < end:
            time.sleep(0.1)
        assert not hosts.pids(survivor), f"{survivor} kept processes after its launcher ended"
        return nodes[survivor].returncode, err, took


@pytest.mark.timeout(150)
def test_losing_the_master_host_ends_the_other_host_in_bounded_time(tmp_path):
    """h0 (the master's host) vanishes: h1's launcher must notice through the control
    connection (not a collective's timeout), say it lost the master at h0, exit non-zero
    within 45 s and leave nothing."""
    code, err, took = vanish(tmp_path, "h0")
    assert code != 0, err[-2000:]
    assert took <= 45, f"h1 needed {took:.1f} s to give up on its master"
    assert "master" in err and "h0" in err, err[-2000:]


@pytest.mark.timeout(150)
def test_the_master_notices_a_vanished_host_in_seconds_not_at_the_hang_timeout(tmp_path):
    """h1 vanishes. Its ranks' peers on h0 wait in an all-reduce that will never finish; the
    master must notice the node itself (its launcher's connection goes silent) well before
    --hang-timeout (300 s by default), end the run, name the node, and leave nothing."""
    code, err, took = vanish(tmp_path, "h1")
    assert code != 0, err[-2000:]
    assert took <= 30, f"the master needed {took:.1f} s to notice"
    assert "node 1 (h1) lost" in err, err[-2000:]


@pytest.mark.timeout(150)
def test_a_crash_on_node_1_is_blamed_on_node_1_not_on_its_peers_consequence(tmp_path):
    """Rank 1 (h1) exits 3; rank 0 (h0) then dies of the broken all-reduce, on node 0, where
    the master is: the report must name rank 1 on h1 as the root cause and list rank 0 as
    its consequence, not the other way round."""
    out = tmp_path / "out"
    out.mkdir()
    with netns.Hosts(["h0", "h1"]) as hosts:
        script = [str(SCRIPTS / "hosts_train.py"), "100000", "0.02", str(out), "1:40"]
        node1 = start(hosts, "h1", 1, tmp_path, *script)
        node0 = start(hosts, "h0", 0, tmp_path, *script)
        _, err0 = node0.communicate(timeout=120)
        node1.communicate(timeout=60)
        failure = json.loads((tmp_path / "run-h0" / "failure.json").read_text())
        assert failure["root_cause"]["rank"] == 1, err0[-3000:]
        assert failure["root_cause"]["hostname"] == "h1"
        assert [c["rank"] for c in failure["consequences"]] == [0] or failure["consequences"] == []
        assert "root cause: rank 1 on h1 (node 1)" in err0, err0[-3000:]
        assert node0.returncode == 3, err0[-3000:]  # the root cause's own exit code

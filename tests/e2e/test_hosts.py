"""Several real hosts (network namespaces with their own addresses, hostnames and links):
a run across them, and the loss of the master's host, which must end every other host's
launcher in bounded time with nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from tests.e2e import netns
from tests.e2e.launch import SCRIPTS, elastic_rows, elastic_steps_done, launcher_env, poll_until

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


# -- elastic runs across hosts --------------------------------------------------------------


def elastic(hosts: netns.Hosts, host: str, tmp_path, *args: str) -> subprocess.Popen:
    """torchrun's elastic line on `host`: the same on every host, no node rank."""
    line = [
        sys.executable, "-m", "ddp_launch", "--nnodes", "2:3", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"h0:{PORT}", "--rdzv-id", "job1",
        "--run-dir", str(tmp_path / f"run-{host}"), "--stop-grace", "1", "--max-restarts", "0", *args,
    ]  # fmt: skip
    return hosts.popen(
        host, line, cwd=tmp_path, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def worlds(out) -> list[tuple[str, int, int, int, int]]:
    """(host, generation, world size, rank, first step) of each rank's first step of each
    generation, in order of generation and rank."""
    return [row[:5] for row in elastic_rows(out)]


def ended(procs: dict[str, subprocess.Popen], timeout_s: float = 90) -> dict[str, tuple[int, str]]:
    """(exit code, stderr) of each host's launcher once it ended."""
    results = {}
    for h, p in procs.items():
        err = p.communicate(timeout=timeout_s)[1]
        results[h] = (p.returncode, err)
    return results


@pytest.mark.timeout(180)
def test_a_third_host_joins_mid_run_and_its_rank_trains_in_the_bigger_world(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = [str(SCRIPTS / "elastic_train.py"), "80", "0.1", str(out)]
    with netns.Hosts(["h0", "h1", "h2"]) as hosts:
        procs = {"h0": elastic(hosts, "h0", tmp_path, *script)}
        procs["h1"] = elastic(hosts, "h1", tmp_path, *script)
        poll_until(lambda: elastic_steps_done(out) >= 10, 90, "ten steps of two hosts")
        joined_at = time.monotonic()
        procs["h2"] = elastic(hosts, "h2", tmp_path, *script)
        admitted = poll_until(lambda: any(row[2] == 3 for row in worlds(out)), 60, "a world of 3")
        results = ended(procs)
        assert all(code == 0 for code, _ in results.values()), {h: err[-1500:] for h, (_, err) in results.items()}
        seen = worlds(out)
        assert [(h, g, w, r) for h, g, w, r, _ in seen if g == 0] == [("h0", 0, 2, 0), ("h1", 0, 2, 1)]
        assert [(h, w, r) for h, g, w, r, _ in seen if g == 1] == [("h0", 3, 0), ("h1", 3, 1), ("h2", 3, 2)]
        print(f"h2 trained in the bigger world {admitted - joined_at:.1f} s after it started")
        assert "1 node(s) joined (h2)" in results["h0"][1]
        for h in hosts.names:
            assert not hosts.pids(h)


@pytest.mark.timeout(240)
def test_a_cut_host_leaves_a_smaller_world_in_seconds_and_rejoins_when_its_link_is_back(tmp_path):
    """h2's link goes down mid-run: nobody gets a reset, its peers wait in an all-reduce. The
    master must tell from h2's silence (its node heartbeats stop) and go on with h0 and h1
    within 15 s; h2's launcher stops its stuck workers, and once the link is back it joins
    again and is admitted: the run ends in a world of 3, every host exit 0, nothing left."""
    out = tmp_path / "out"
    out.mkdir()
    script = [str(SCRIPTS / "elastic_train.py"), "600", "0.1", str(out)]
    with netns.Hosts(["h0", "h1", "h2"]) as hosts:
        procs = {h: elastic(hosts, h, tmp_path, *script) for h in hosts.names}
        poll_until(lambda: len(worlds(out)) == 3 and elastic_steps_done(out) >= 10, 90, "ten steps of three hosts")
        hosts.cut("h2")
        cut_at = time.monotonic()
        smaller = poll_until(lambda: any(row[2] == 2 for row in worlds(out)), 60, "a world of 2")
        hosts.mend("h2")
        poll_until(lambda: [row[2] for row in worlds(out)].count(3) >= 6, 120, "h2 back in a world of 3")
        (out / "finish").write_text("")
        results = ended(procs, timeout_s=120)
        print(f"h0 and h1 trained as a world of 2 {smaller - cut_at:.1f} s after h2's link was cut")
        assert all(code == 0 for code, _ in results.values()), {h: err[-1500:] for h, (_, err) in results.items()}
        assert smaller - cut_at <= 15
        generations = sorted({(g, w) for _, g, w, _, _ in worlds(out)})
        assert generations[0] == (0, 3) and (1, 2) in generations and generations[-1][1] == 3
        lead = results["h0"][1]
        assert "(h2) lost: no heartbeat from its launcher" in lead, lead[-2000:]
        assert "lost the master at h0" in results["h2"][1]
        for h in hosts.names:
            assert not hosts.pids(h)


@pytest.mark.timeout(120)
def test_a_host_with_another_token_is_refused_and_starts_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "a").write_text("one secret\n")
    (tmp_path / "b").write_text("another secret\n")
    script = [str(SCRIPTS / "hosts_train.py"), "20", "0.02", str(out)]
    with netns.Hosts(["h0", "h1"]) as hosts:
        node0 = start(hosts, "h0", 0, tmp_path, "--token-file", str(tmp_path / "a"), "--join-timeout", "4", *script)
        node1 = start(hosts, "h1", 1, tmp_path, "--token-file", str(tmp_path / "b"), *script)
        _, err1 = node1.communicate(timeout=60)
        _, err0 = node0.communicate(timeout=60)
        assert node1.returncode != 0 and "refused this node's token" in err1, err1[-2000:]
        assert node0.returncode != 0 and "did not register within --join-timeout" in err0, err0[-2000:]
        assert not (out / "rank-1.txt").exists() and not (out / "rank-0.txt").exists()
        assert not hosts.pids("h0") and not hosts.pids("h1")


@pytest.mark.timeout(150)
def test_tls_across_hosts_with_a_certificate_for_the_masters_hostname(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    pki = tmp_path / "pki"
    pki.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "1", "-subj", "/CN=test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "h0.key", "-out", "h0.csr", "-subj", "/CN=h0")
    (pki / "san.ext").write_text("subjectAltName=DNS:h0\n")
    openssl("x509", "-req", "-in", "h0.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "h0.pem", "-days", "1", "-extfile", "san.ext")  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    script = [str(SCRIPTS / "hosts_train.py"), "20", "0.02", str(out)]
    tls = ["--tls-cert", str(pki / "h0.pem"), "--tls-key", str(pki / "h0.key"), "--tls-ca", str(pki / "ca.pem")]
    with netns.Hosts(["h0", "h1"]) as hosts:
        node1 = start(hosts, "h1", 1, tmp_path, "--tls-ca", str(pki / "ca.pem"), *script)
        node0 = start(hosts, "h0", 0, tmp_path, *tls, *script)
        _, err0 = node0.communicate(timeout=120)
        _, err1 = node1.communicate(timeout=60)
        assert (node0.returncode, node1.returncode) == (0, 0), (err0[-2000:], err1[-2000:])
        assert (out / "rank-1.txt").read_text().split()[:2] == ["h1", "2"]
        assert not hosts.pids("h0") and not hosts.pids("h1")

"""Two launchers on one machine as two nodes of one run (127.0.0.1), and the cluster variables."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.e2e.launch import (
    EXAMPLE,
    SCRIPTS,
    digests,
    free_port,
    kill_tree,
    launcher_command,
    launcher_env,
    poll_status,
    run_launcher,
)

pytestmark = [pytest.mark.e2e]
TOKEN = "test-token-not-secret"


def _two_nodes(tmp_path, script_args: list[str], extra: list[str] = (), timeout_s: float = 150, token: str = TOKEN):
    """Starts node 1 in the background, runs node 0, returns both (code, stdout, stderr)."""
    port = free_port()
    env = {**launcher_env(), "DDP_LAUNCH_TOKEN": token}
    common = ["--nnodes", "2", "--master_port", str(port), "--nproc_per_node", "2", "--stop-grace", "1", *extra]
    node1 = subprocess.Popen(
        launcher_command("--run-dir", str(tmp_path / "node1"), "--node-rank", "1", *common, *script_args),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        node0 = subprocess.run(
            launcher_command("--run-dir", str(tmp_path / "node0"), "--node_rank", "0", *common, *script_args),
            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=timeout_s,
        )  # fmt: skip
        out1, err1 = node1.communicate(timeout=60)
    finally:
        kill_tree(node1.pid)
    return (node0.returncode, node0.stdout, node0.stderr), (node1.returncode, out1, err1), port


@pytest.mark.timeout(200)
def test_two_nodes_of_two_workers_train_as_one_world(tmp_path):
    """torchrun's multi-node line, unchanged (no token: every node derives the same one)."""
    out = tmp_path / "env"
    out.mkdir()
    node0, node1, port = _two_nodes(tmp_path, [str(SCRIPTS / "env_dump.py"), str(out)], token="")
    assert node0[0] == 0 and node1[0] == 0, (node0, node1)
    seen = {r: json.loads((out / f"env-{r}.json").read_text()) for r in range(4)}
    for r, e in seen.items():
        assert e["RANK"] == str(r) and e["WORLD_SIZE"] == "4"
        assert e["LOCAL_RANK"] == str(r % 2) and e["LOCAL_WORLD_SIZE"] == "2"
        assert e["GROUP_RANK"] == str(r // 2) and e["GROUP_WORLD_SIZE"] == "2"
    assert {e["MASTER_PORT"] for e in seen.values()} == {str(port)}  # torchrun's --master-port
    assert {e["DDP_LAUNCH_MASTER"] for e in seen.values()} == {f"127.0.0.1:{port + 1}"}
    assert "[rank 3] hello from rank 3" in node1[1]  # a node shows its own workers' output
    # Node 1's workers stream their heartbeats to their own launcher's relay (loopback),
    # and talk to node 0's master for everything else; node 0's workers have no relay.
    master = {e["DDP_LAUNCH_MASTER"] for e in seen.values()}
    relays = {seen[r]["DDP_LAUNCH_HEARTBEAT_RELAY"] for r in (2, 3)}
    assert len(master) == 1 and len(relays) == 1 and relays != master
    assert relays.pop().startswith("127.0.0.1:")
    assert not seen[0]["DDP_LAUNCH_HEARTBEAT_RELAY"] and not seen[1]["DDP_LAUNCH_HEARTBEAT_RELAY"]


@pytest.mark.timeout(150)
def test_node_0_sees_node_1s_progress_through_its_relay_and_names_its_straggler(tmp_path):
    """Rank 3 (node 1) steps 6x slower. Only the relayed stream heartbeats (every 0.25 s;
    answered ones come every 5 s) give the master rates over a 2 s window."""
    port = free_port()
    env = {**launcher_env(), "DDP_LAUNCH_TOKEN": TOKEN}
    common = ["--nnodes", "2", "--master-port", str(port), "-n", "2", "--stop-grace", "1",
              "--heartbeat-interval", "0.25", "--straggler-window", "2", str(SCRIPTS / "straggler.py"), "3", "400"]  # fmt: skip
    nodes = [
        subprocess.Popen(
            launcher_command("--run-dir", str(tmp_path / f"node{n}"), "--node-rank", str(n), *common),
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )  # fmt: skip
        for n in (1, 0)
    ]
    try:
        status = poll_status(tmp_path / "node0", until=lambda s: any(r["straggler"] for r in s["ranks"]))
        assert status is not None, "status never answered"
        assert [r["rank"] for r in status["ranks"] if r["straggler"]] == [3], status
        by_rank = {r["rank"]: r for r in status["ranks"]}
        assert by_rank[2]["step"] > 0 and by_rank[3]["step"] > 0
        assert by_rank[3]["steps_per_s"] < by_rank[2]["steps_per_s"]
        assert by_rank[2]["heartbeat_age_s"] < 2.0  # relayed once per interval, not every 5 s
    finally:
        for node in nodes:
            kill_tree(node.pid)
            node.communicate(timeout=30)


@pytest.mark.timeout(240)
def test_a_crash_on_node_1_restarts_both_nodes_and_the_run_finishes(tmp_path):
    args = [str(SCRIPTS / "faults.py"), "exit1", "3", "15", "--epochs", "1", "--max-steps", "30", "--print-digest",
            "--checkpoint", str(tmp_path / "ckpt.pt")]  # fmt: skip
    node0, node1, _ = _two_nodes(tmp_path, args, extra=["--max-restarts", "1"], timeout_s=200)
    assert node0[0] == 0 and node1[0] == 0, (node0, node1)
    assert "[rank 3] injecting exit1 at step 15" in node1[1]
    found = {**digests(node0[1]), **digests(node1[1])}
    assert sorted(found) == [0, 1, 2, 3] and len(set(found.values())) == 1
    assert "restarts   1" in node0[2]
    assert "2 generation(s)" in node1[2]


@pytest.mark.timeout(60)
def test_a_node_that_cannot_reach_the_master_says_where_it_looked(tmp_path):
    port = free_port()
    run = run_launcher(
        ["--nnodes", "2", "--node-rank", "1", "--master-port", str(port), "--join-timeout", "2", "-n", "1",
         str(EXAMPLE)],
        tmp_path,
        env={**launcher_env(), "DDP_LAUNCH_TOKEN": TOKEN},
    )  # fmt: skip
    assert run.returncode != 0
    assert f"127.0.0.1:{port + 1} could not be reached" in run.stderr


@pytest.mark.timeout(120)
def test_slurm_variables_give_nnodes_node_rank_and_master_address(tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    slurm = {"SLURM_JOB_ID": "77", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost"}
    run = run_launcher(["-n", "2", str(SCRIPTS / "env_dump.py"), str(out)], tmp_path, env={**launcher_env(), **slurm})
    assert run.returncode == 0, run.output
    assert json.loads((run.run_dir / "master.json").read_text())["host"] == "localhost"
    assert json.loads((out / "env-1.json").read_text())["MASTER_ADDR"] == "localhost"


def _c10d_pair(tmp_path, *extra0: str, extra1: tuple[str, ...] = (), script=None):
    """torchrun's c10d line on two launchers of this machine (the first to start leads)."""
    port = free_port()
    script = script or [str(SCRIPTS / "env_dump.py"), str(tmp_path)]
    line = ["--nnodes", "2", "-n", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--stop-grace", "1", "--join-timeout", "20"]  # fmt: skip
    env = launcher_env()
    lead = subprocess.Popen(launcher_command(*line, *extra0, *script), cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        poll = time.monotonic() + 30
        while not list(tmp_path.glob("runs/*/master.json")) and time.monotonic() < poll:
            time.sleep(0.1)
        other = subprocess.run(launcher_command(*line, *extra1, *script), cwd=tmp_path, env=env, text=True,
                               capture_output=True, timeout=60)  # fmt: skip
        err0 = lead.communicate(timeout=60)[1]
    finally:
        kill_tree(lead.pid)
    return (lead.returncode, err0), (other.returncode, other.stderr)


@pytest.mark.timeout(120)
def test_every_node_names_its_run_directory_by_the_masters_run_id(tmp_path):
    """No --rdzv-id, no --run-dir, no scheduler: node 1 once made a run id of its own, so the
    report's `runs/<id>/rank-<i>.log` pointed where rank 1's log was not."""
    (code0, err0), (code1, err1) = _c10d_pair(tmp_path)
    assert (code0, code1) == (0, 0), (err0[-2000:], err1[-2000:])
    (run_dir,) = (tmp_path / "runs").iterdir()  # one run directory for both nodes
    assert (run_dir / "rank-0.log").exists() and (run_dir / "rank-1.log").exists()
    seen = json.loads((tmp_path / "env-1.json").read_text())
    assert seen["TORCHELASTIC_RUN_ID"] == run_dir.name


@pytest.mark.timeout(120)
def test_a_node_with_another_rdzv_id_is_refused_naming_both_ids(tmp_path):
    (tmp_path / "tok").write_text("shared secret\n")
    token = ("--token-file", str(tmp_path / "tok"))
    (code0, err0), (code1, err1) = _c10d_pair(
        tmp_path, *token, "--rdzv-id", "job-a", "--join-timeout", "3", extra1=(*token, "--rdzv-id", "job-b")
    )
    assert code1 == 2, err1[-2000:]
    assert "this node's run id 'job-b' (--rdzv-id/--run-id) is not the master's 'job-a'" in err1
    assert len(err1.strip().splitlines()) == 1, err1
    assert code0 != 0 and not (tmp_path / "env-1.json").exists()

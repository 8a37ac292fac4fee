"""torchrun's options with torchrun's meaning, in real runs: --no-python, --signals-to-handle,
a c10d rendezvous endpoint across two launchers."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import psutil
import pytest

from tests.e2e.launch import (
    SCRIPTS,
    free_port,
    kill_tree,
    launcher_command,
    launcher_env,
    run_command,
    torchrun_command,
    torchrun_env,
)

pytestmark = [pytest.mark.e2e]


@pytest.mark.timeout(200)
def test_no_python_runs_the_program_as_torchrun_does(tmp_path) -> None:
    program = ["sh", "-c", 'echo "rank $RANK of $WORLD_SIZE, local $LOCAL_RANK"']
    theirs = run_command(torchrun_command("--no-python", "--nproc_per_node", "2", *program), tmp_path, torchrun_env())
    ours = run_command(
        launcher_command("-q", "--run-dir", str(tmp_path / "run"), "--no_python", "--nproc_per_node", "2", *program),
        tmp_path,
        launcher_env(),
    )

    assert theirs.returncode in (0, 1), theirs.output  # torch 2.13's teardown abort
    assert ours.returncode == 0, ours.output
    for line in ("rank 0 of 2, local 0", "rank 1 of 2, local 1"):
        assert line in theirs.stdout and line in ours.stdout


@pytest.mark.timeout(120)
def test_no_python_passes_the_programs_exit_code(tmp_path) -> None:
    run = run_command(
        launcher_command("-q", "--run-dir", str(tmp_path / "run"), "--no-python", "-n", "2", "sh", "-c", "exit 3"),
        tmp_path,
        launcher_env(),
    )
    assert run.returncode == 3, run.output
    assert json.loads((tmp_path / "run" / "failure.json").read_text())["root_cause"]["exit_code"] == 3


@pytest.mark.timeout(120)
def test_a_signal_named_in_signals_to_handle_stops_the_run_and_reaches_the_workers(tmp_path) -> None:
    out = tmp_path / "pids"
    out.mkdir()
    proc = subprocess.Popen(
        launcher_command("--run-dir", str(tmp_path / "run"), "-n", "2", "--stop-grace", "2",
                         "--signals_to_handle", "SIGTERM,SIGINT,SIGUSR1", str(SCRIPTS / "sleeper.py"), str(out)),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launcher_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("pids-*.txt"))) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "workers did not start"
            time.sleep(0.05)
        pids = [int(p) for f in out.glob("pids-*.txt") for p in f.read_text().split()]
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=30)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 128 + signal.SIGUSR1, err
    assert "stopped by SIGUSR1" in err
    gone_by = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < gone_by:
        time.sleep(0.05)
    assert not [p for p in pids if psutil.pid_exists(p)]


@pytest.mark.timeout(200)
def test_a_c10d_endpoint_line_runs_on_two_launchers_without_node_ranks(tmp_path) -> None:
    """torchrun's c10d line, identical on both nodes: the first to start hosts the master."""
    port = free_port()
    outs = tmp_path / "env"
    outs.mkdir()
    line = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=job-1", "--stop-grace", "1", str(SCRIPTS / "env_dump.py"), str(outs)]  # fmt: skip
    first = subprocess.Popen(
        launcher_command("-q", "--run-dir", str(tmp_path / "first"), *line),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launcher_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "first" / "master.json").exists():  # the first one hosts
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = run_command(launcher_command("-q", "--run-dir", str(tmp_path / "second"), *line), tmp_path,
                             launcher_env(), timeout_s=150)  # fmt: skip
        out, err = first.communicate(timeout=60)
    finally:
        kill_tree(first.pid)
    assert first.returncode == 0 and second.returncode == 0, (err, second.output)
    seen = {r: json.loads((outs / f"env-{r}.json").read_text()) for r in range(2)}
    assert [seen[r]["GROUP_RANK"] for r in (0, 1)] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in seen.values()} == {"2"}
    assert {e["MASTER_PORT"] for e in seen.values()} == {str(port)}
    assert {e["TORCHELASTIC_RUN_ID"] for e in seen.values()} == {"job-1"}


@pytest.mark.timeout(120)
def test_a_restart_reuses_the_pinned_master_port(tmp_path) -> None:
    """--master_port P is MASTER_PORT in every generation: rank 0's new store binds P again."""
    port = free_port()
    run = run_command(
        launcher_command("-q", "--run-dir", str(tmp_path / "run"), "--master_port", str(port), "--max-restarts", "1",
                         "-n", "2", str(SCRIPTS / "faults.py"), "exit1", "1", "5", "--epochs", "1", "--max-steps", "20"),
        tmp_path,
        launcher_env(),
    )  # fmt: skip
    assert run.returncode == 0, run.output
    assert "restarts   1" in run.stderr
    assert "injecting exit1 at step 5" in run.stdout

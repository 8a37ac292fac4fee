"""End-to-end: real launcher runs of the example and small scripts, as a user sees them."""

from __future__ import annotations

import json
import re
import socket
import sys

import pytest

from tests.e2e.launch import EXAMPLE, SCRIPTS, digests, launcher_env, run_launcher

pytestmark = [pytest.mark.e2e]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [2, 4])
def test_example_trains_and_every_rank_ends_with_identical_parameters(tmp_path, n):
    run = run_launcher(["-n", str(n), str(EXAMPLE), "--epochs", "1", "--max-steps", "12", "--print-digest"], tmp_path)
    assert run.returncode == 0, run.output
    found = digests(run.stdout)
    assert sorted(found) == list(range(n)), run.output
    assert len(set(found.values())) == 1, found
    assert re.search(r"\[rank 0\] final loss [\d.]+ accuracy [\d.]+", run.stdout), run.stdout
    # The summary comes from the master's heartbeats: the final step is known.
    assert re.search(r"step\s+12/12", run.stderr), run.stderr
    master = json.loads((run.run_dir / "master.json").read_text())
    assert master["host"] == "127.0.0.1" and master["port"] > 0 and master["pid"] > 0
    assert "token" not in master
    assert not (run.run_dir / "token").exists()  # the secret does not outlive the run
    for rank in range(n):
        log = (run.run_dir / f"rank-{rank}.log").read_text()
        assert f"param-digest rank={rank}" in log


@pytest.mark.timeout(120)
def test_workers_see_the_torchrun_environment(tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    run = run_launcher(
        ["-n", "2", "--max-restarts", "3", "--run-id", "job-42", str(SCRIPTS / "env_dump.py"), str(out), "--lr", "0.1"],
        tmp_path,
    )
    assert run.returncode == 0, run.output
    seen = {r: json.loads((out / f"env-{r}.json").read_text()) for r in range(2)}
    ports = {seen[r]["MASTER_PORT"] for r in range(2)}
    assert len(ports) == 1 and int(ports.pop()) > 0
    for r in range(2):
        e = seen[r]
        assert e["RANK"] == str(r) and e["LOCAL_RANK"] == str(r) and e["ROLE_RANK"] == str(r)
        assert e["WORLD_SIZE"] == "2" and e["LOCAL_WORLD_SIZE"] == "2" and e["ROLE_WORLD_SIZE"] == "2"
        assert e["GROUP_RANK"] == "0" and e["GROUP_WORLD_SIZE"] == "1"
        assert e["ROLE_NAME"] == "default"
        assert e["MASTER_ADDR"] == "127.0.0.1"
        assert e["TORCHELASTIC_RUN_ID"] == "job-42"
        assert e["TORCHELASTIC_RESTART_COUNT"] == "0" and e["TORCHELASTIC_MAX_RESTARTS"] == "3"
        # The store is up before the script starts (rank 0's worker serves it), as torchrun's
        # agent store is by default: every rank's init_process_group connects as a client.
        assert e["TORCHELASTIC_USE_AGENT_STORE"] == "True"
        assert e["OMP_NUM_THREADS"] == "1" and e["torch_threads"] == 1
        assert e["DDP_LAUNCH_BACKEND"] == "gloo"
        assert e["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert e["TORCHELASTIC_ERROR_FILE"] == str(run.run_dir.resolve() / "errors" / "generation-0" / f"rank-{r}.json")
        assert e["name"] == "__main__"
        assert e["argv"] == [str(SCRIPTS / "env_dump.py"), str(out), "--lr", "0.1"]
    assert "[rank 1] hello from rank 1" in run.stdout
    assert "[rank 0] to stderr from rank 0" in run.stderr and "to stderr" not in run.stdout


@pytest.mark.timeout(120)
def test_user_omp_num_threads_is_kept(tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    env = {**launcher_env(), "OMP_NUM_THREADS": "2"}
    run = run_launcher(["-n", "1", str(SCRIPTS / "env_dump.py"), str(out)], tmp_path, env=env)
    assert run.returncode == 0, run.output
    seen = json.loads((out / "env-0.json").read_text())
    assert seen["OMP_NUM_THREADS"] == "2" and seen["torch_threads"] == 2


@pytest.mark.timeout(120)
def test_a_temporary_directory_too_long_for_a_unix_socket_still_runs(tmp_path):
    # The forkserver's socket would be TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX, past Linux's
    # 107 bytes; torchrun has no such socket and runs. The script still sees its TMPDIR.
    tmp = tmp_path / ("t" * max(1, 100 - len(str(tmp_path))))
    tmp.mkdir()
    script = tmp_path / "tempdir.py"
    script.write_text("import os, tempfile\nprint('tempdir', os.environ['RANK'], tempfile.gettempdir())\n")
    run = run_launcher(["-n", "2", str(script)], tmp_path, env={**launcher_env(), "TMPDIR": str(tmp)})
    assert run.returncode == 0, run.output
    for r in range(2):
        assert f"[rank {r}] tempdir {r} {tmp}" in run.stdout


@pytest.mark.timeout(120)
def test_module_mode_runs_a_module_as_main(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(
        "import os, sys\nprint('module', __name__, os.environ['RANK'], sys.argv[1:], sys.argv[0].endswith('train.py'))\n"
    )
    run = run_launcher(["-n", "2", "-m", "mypkg.train", "--flag", "x"], tmp_path)
    assert run.returncode == 0, run.output
    for r in range(2):
        assert f"[rank {r}] module __main__ {r} ['--flag', 'x'] True" in run.stdout


@pytest.mark.timeout(120)
def test_unmodified_script_step_count_reaches_the_master(tmp_path):
    run = run_launcher(["-n", "2", "--heartbeat-interval", "0.2", str(SCRIPTS / "plain_steps.py"), "25"], tmp_path)
    assert run.returncode == 0, run.output
    assert re.search(r"step\s+25\b", run.stderr), run.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("how", "expected_code", "expected_text"),
    [
        (["exit", "3"], 3, "exit code 3"),
        (["signal", "SIGKILL"], 128 + 9, "signal SIGKILL"),
        (["signal", "SIGSEGV"], 128 + 11, "signal SIGSEGV"),
    ],
)
def test_exit_code_is_the_first_failing_ranks_own(tmp_path, how, expected_code, expected_text):
    run = run_launcher(["-n", "2", "--stop-grace", "1", str(SCRIPTS / "fail.py"), "1", *how], tmp_path)
    assert run.returncode == expected_code, run.output
    assert f"rank 1 failed ({expected_text})" in run.stderr
    assert "root cause: rank 1" in run.stderr
    report = json.loads((run.run_dir / "failure.json").read_text())
    assert report["root_cause"]["rank"] == 1
    assert report["root_cause"]["exit"] == expected_text
    assert "rank 1 up" in "\n".join(report["root_cause"]["log_tail"])


@pytest.mark.timeout(120)
def test_exception_traceback_reaches_the_report(tmp_path):
    run = run_launcher(["-n", "2", "--stop-grace", "1", str(SCRIPTS / "fail.py"), "0", "raise"], tmp_path)
    assert run.returncode == 1, run.output
    report = json.loads((run.run_dir / "failure.json").read_text())
    cause = report["root_cause"]
    assert cause["rank"] == 0 and cause["exception_type"] == "ValueError"
    assert "in load_batch" in cause["traceback"] and "ValueError: bad batch 7" in cause["traceback"]
    assert "ddp_launch/run/worker.py" not in cause["traceback"]
    assert "ValueError: bad batch 7" in run.stderr


# -- bad input: one line, exit 2, nothing started ------------------------------------------


def _bad_input(tmp_path, args):
    run = run_launcher(args, tmp_path, timeout_s=60)
    assert run.returncode == 2, run.output
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddp-launch: error:"), run.stderr
    assert not run.run_dir.exists(), "a run directory was created for bad input"
    return lines[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-n", "2", "missing.py"], "does not exist"),
        (["-n", "2", "."], "is a directory"),
        (["-n", "0", "x.py"], ">= 1"),
        (["-n", "-3", "x.py"], ">= 1"),
        (["-n", "many", "x.py"], "positive integer"),
        (["--no-such-option", "x.py"], "No such option"),
        (["-n", "2", "-m", "no_such_module_xyz"], "cannot be found"),
        (["-n", "2"], "Missing argument"),
        (["--max-restarts", "-1", "x.py"], "--max-restarts"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    (tmp_path / "x.py").write_text("print('should not run')\n")
    line = _bad_input(tmp_path, args)
    assert needle in line


@pytest.mark.timeout(60)
def test_master_port_in_use_is_bad_input(tmp_path):
    (tmp_path / "x.py").write_text("print('should not run')\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = _bad_input(tmp_path, ["--master-port", str(port), "x.py"])
    assert str(port) in line


@pytest.mark.timeout(60)
def test_help_shows_an_example(tmp_path):
    import subprocess

    for args in (["--help"], ["run", "--help"]):
        out = subprocess.run([sys.executable, "-m", "ddp_launch", *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0
        assert "ddp-launch -n 4 examples/train_mlp.py" in out.stdout

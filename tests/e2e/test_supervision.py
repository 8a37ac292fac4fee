"""End-to-end fault injection: crashes, hangs, restarts, resume, signals to the launcher."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from ddp_launch.observe.events import read_events
from tests.e2e.launch import (
    EXAMPLE,
    SCRIPTS,
    digests,
    kill_tree,
    launcher_command,
    launcher_env,
    poll_status,
    poll_until,
    run_launcher,
)

pytestmark = [pytest.mark.e2e]

FAULTS = str(SCRIPTS / "faults.py")
TRAIN = ["--epochs", "2", "--max-steps", "40", "--checkpoint-every", "10", "--print-digest"]


@pytest.fixture(scope="module")
def uninterrupted_digest(tmp_path_factory):
    """The final parameters of a run that nothing interrupted (same seed, same world size)."""
    cwd = tmp_path_factory.mktemp("clean")
    run = run_launcher(["-n", "2", str(EXAMPLE), *TRAIN, "--checkpoint", str(cwd / "ckpt.pt")], cwd)
    assert run.returncode == 0, run.output
    found = set(digests(run.stdout).values())
    assert len(found) == 1
    return found.pop()


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("fault", "step", "snapshots"),
    # Files only (--no-snapshot): a death after a step, and a death in the middle of a save.
    # With snapshots: a clean exit 1, a SIGKILL, and a death in the middle of a snapshot.
    [("sigkill", 25, False), ("save-crash", 20, False), ("exit1", 25, True), ("sigkill", 25, True),
     ("snapshot-crash", 20, True)],
)  # fmt: skip
def test_crash_restarts_and_resumes_to_identical_parameters(tmp_path, uninterrupted_digest, fault, step, snapshots):
    ckpt = tmp_path / "ckpt.pt"
    rank = 0 if fault.endswith("-crash") else 1  # rank 0 saves, and keeps node 0's snapshots
    run = run_launcher(
        ["-n", "2", "--max-restarts", "1", "--stop-grace", "2", FAULTS, fault, str(rank), str(step), *TRAIN,
         "--checkpoint", str(ckpt), *(["--snapshot-budget", "0"] if snapshots else ["--no-snapshot"])],
        tmp_path,
        timeout_s=200,
    )  # fmt: skip
    assert run.returncode == 0, run.output
    assert f"[rank {rank}] injecting {fault} at step {step}" in run.stdout
    if snapshots:
        # A snapshot after every step (no budget; node 0's local rank 0 keeps the node's one copy): the
        # crash right after step K's update loses at most that step (K when rank 0 finished
        # step K and snapshotted it). The snapshot-crash tears step K's snapshot after its
        # first tensor: it must never be loaded, and step K-1's is.
        resumed = re.search(r"resuming from the snapshot of step (\d+): epoch 0 step (\d+)", run.stdout)
        assert resumed is not None, run.stdout
        expected = (step - 1,) if fault == "snapshot-crash" else (step - 1, step)
        assert int(resumed.group(1)) == int(resumed.group(2)) in expected, run.stdout
    else:
        # Generation 1 resumed from the last good checkpoint: step 20 (or 10 when the save at 20 died).
        resumed_at = 10 if fault == "save-crash" else 20
        assert f"resuming from {ckpt}: epoch 0 step {resumed_at}" in run.stdout, run.stdout
    found = digests(run.stdout)
    assert sorted(found) == [0, 1] and set(found.values()) == {uninterrupted_digest}
    assert "restarts   1" in run.stderr
    assert not list(tmp_path.glob(".ckpt.pt.tmp*")), "a half-written temporary file was left behind"
    assert not list(Path("/dev/shm").glob(f"ddp-launch-{run.run_dir.name}-*")), "snapshots outlived the run"


@pytest.mark.timeout(120)
def test_no_restart_left_fails_with_the_report(tmp_path):
    run = run_launcher(
        ["-n", "2", "--max-restarts", "0", "--stop-grace", "1", FAULTS, "raise", "1", "3", *TRAIN], tmp_path
    )
    assert run.returncode == 1, run.output
    report = json.loads((run.run_dir / "failure.json").read_text())
    cause = report["root_cause"]
    assert cause["rank"] == 1 and cause["generation"] == 0 and cause["exit_code"] == 1
    assert cause["exception_type"] == "RuntimeError"
    assert "injected failure at step 3" in cause["traceback"]
    assert "root cause: rank 1" in run.stderr and "RuntimeError: injected failure at step 3" in run.stderr


@pytest.mark.timeout(180)
def test_restarts_exhausted_reports_every_generation(tmp_path):
    # fail.py's rank 1 fails on every attempt.
    run = run_launcher(
        ["-n", "2", "--max-restarts", "2", "--stop-grace", "1", str(SCRIPTS / "fail.py"), "1", "exit", "7"], tmp_path
    )
    assert run.returncode == 7, run.output
    report = json.loads((run.run_dir / "failure.json").read_text())
    assert report["restarts"] == 2
    assert [g["generation"] for g in report["generations"]] == [0, 1, 2]
    assert all(g["root_rank"] == 1 for g in report["generations"])
    assert run.stdout.count("[rank 1] rank 1 exits with 7") == 3
    assert report["flapping"] is True and "restarts made no progress" in run.stderr


@pytest.mark.timeout(180)
def test_hang_in_a_collective_is_detected_with_stacks_and_restarted(tmp_path):
    run = run_launcher(
        ["-n", "2", "--max-restarts", "1", "--hang-timeout", "4", "--heartbeat-interval", "0.5", "--stop-grace", "1",
         FAULTS, "hang", "1", "8", "--epochs", "1", "--max-steps", "16", "--print-digest"],
        tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.output
    assert "[rank 1] injecting hang at step 8" in run.stdout
    assert sorted(digests(run.stdout)) == [0, 1]
    for rank in (0, 1):  # every rank's stacks were dumped into its log before the stop
        log = (run.run_dir / f"rank-{rank}.log").read_text()
        assert "most recent call first" in log, log
    # No failure.json for a run that recovered, but the hang went to stderr's summary.
    assert "restarts   1" in run.stderr


@pytest.mark.timeout(120)
def test_hang_report_names_the_rank_that_stopped_and_where(tmp_path):
    run = run_launcher(
        ["-n", "2", "--hang-timeout", "4", "--heartbeat-interval", "0.5", "--stop-grace", "1",
         FAULTS, "hang", "1", "5", "--epochs", "1", "--max-steps", "30"],
        tmp_path,
    )  # fmt: skip
    assert run.returncode == 1, run.output
    report = json.loads((run.run_dir / "failure.json").read_text())
    assert report["outcome"] == "hung"
    cause = report["root_cause"]
    assert cause["rank"] == 1, report
    assert "has not advanced" in cause["hang"]
    assert "wait_forever_in_the_hook" in cause["stack"]
    assert "wait_forever_in_the_hook" in run.stderr


@pytest.mark.timeout(120)
def test_a_rank_holding_the_gil_before_its_first_step_is_hung_by_heartbeat(tmp_path):
    run = run_launcher(
        ["-n", "2", "--hang-timeout", "3", "--heartbeat-interval", "0.5", "--stop-grace", "1",
         FAULTS, "hold-gil", "0", "0", "--epochs", "1", "--max-steps", "10"],
        tmp_path,
    )  # fmt: skip
    assert run.returncode == 1, run.output
    report = json.loads((run.run_dir / "failure.json").read_text())
    assert report["root_cause"]["rank"] == 0
    assert "no heartbeat" in report["root_cause"]["hang"]


@pytest.mark.timeout(120)
def test_a_stopped_rank_is_hung_and_the_group_is_still_cleaned_up(tmp_path):
    run = run_launcher(
        ["-n", "2", "--hang-timeout", "3", "--heartbeat-interval", "0.5", "--stop-grace", "1",
         FAULTS, "sigstop", "1", "3", "--epochs", "1", "--max-steps", "30"],
        tmp_path,
    )  # fmt: skip
    assert run.returncode == 1, run.output
    report = json.loads((run.run_dir / "failure.json").read_text())
    assert report["root_cause"]["rank"] == 1 and "no heartbeat" in report["root_cause"]["hang"]
    assert {r["pid"] for r in report["ranks"]}, report
    _assert_all_gone([r["pid"] for r in report["ranks"]])


@pytest.mark.timeout(60)
def test_timeout_stops_the_run_with_124(tmp_path):
    out = tmp_path / "pids"
    out.mkdir()
    run = run_launcher(
        ["-n", "2", "--timeout", "4", "--stop-grace", "1", str(SCRIPTS / "sleeper.py"), str(out)], tmp_path
    )
    assert run.returncode == 124, run.output
    assert "--timeout of 4 s passed" in run.stderr
    assert "rank 0: " in run.stderr and "rank 1: " in run.stderr  # where each rank was
    _assert_all_gone(_recorded_pids(out))


# -- signals to the launcher ---------------------------------------------------------------


def _recorded_pids(out: Path) -> list[int]:
    return [int(p) for f in sorted(out.glob("pids-*.txt")) for p in f.read_text().split()]


def _assert_all_gone(pids: list[int], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    if alive:
        for pid in alive:
            kill_tree(pid)
    assert not alive, f"processes of the run survived: {alive}"


def _start_and_wait_ready(tmp_path: Path, n: int = 2, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "pids"
    out.mkdir()
    proc = subprocess.Popen(
        launcher_command("--run-dir", str(tmp_path / "run"), "-n", str(n), "--stop-grace", "2",
                         str(SCRIPTS / "sleeper.py"), str(out)),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or launcher_env(),
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while len(list(out.glob("pids-*.txt"))) < n:
        if time.monotonic() > deadline or proc.poll() is not None:
            kill_tree(proc.pid)
            raise AssertionError(f"workers did not start: {proc.communicate()}")
        time.sleep(0.05)
    return proc, out


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGQUIT, 131)]
)
def test_signal_to_the_launcher_stops_every_process_of_the_run(tmp_path, sig, code):
    proc, out = _start_and_wait_ready(tmp_path)
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == code, err
    assert f"stopped by {signal.Signals(sig).name}" in err
    if sig == signal.SIGINT:  # the script saw the Ctrl-C, as it would without a launcher
        assert "rank 0 got KeyboardInterrupt" in (tmp_path / "run" / "rank-0.log").read_text()
    _assert_all_gone(_recorded_pids(out))  # workers and their children


@pytest.mark.timeout(90)
def test_ctrl_c_in_a_terminal_reaches_each_script_once(tmp_path):
    # A terminal sends SIGINT to its whole foreground process group: the launcher's. Each
    # script must see one KeyboardInterrupt, and finish what it does on it (a save).
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        launcher_command("--run-dir", str(tmp_path / "run"), "-n", "2", "--stop-grace", "10",
                         str(SCRIPTS / "saver.py"), str(out)),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launcher_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        # Each script writes its pid file inside the `try` that saves on KeyboardInterrupt.
        _wait_for(lambda: len(list(out.glob("pids-*.txt"))) == 2, proc)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, err = proc.communicate(timeout=30)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 130, err
    for rank in (0, 1):
        assert (out / f"saved-{rank}").exists(), f"rank {rank}'s save was cut short\n{stdout}"
        log = (tmp_path / "run" / f"rank-{rank}.log").read_text()
        assert log.count("got KeyboardInterrupt") == 1, log


@pytest.mark.timeout(90)
def test_ctrl_z_pauses_the_whole_run_and_fg_continues_it(tmp_path):
    # Paused for longer than the hang timeout: nobody is hung, nobody lost the master.
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        launcher_command("--run-dir", str(run_dir), "-n", "2", "--hang-timeout", "2", "--heartbeat-interval", "0.5",
                         str(SCRIPTS / "plain_steps.py"), "300"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launcher_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        events = run_dir / "events.jsonl"
        _wait_for(lambda: events.exists() and any(e["event"] == "barrier_open" for e in read_events(events)), proc)
        # The master has seen every rank's step move: the step rule of the hang check applies.
        first_seen: dict[int, int] = {}

        def steps_moved(status: dict) -> bool:
            training = [r for r in status["ranks"] if r["state"] == "training"]
            for r in training:
                first_seen.setdefault(r["rank"], r["step"])
            return len(training) == 2 and all(r["step"] != first_seen[r["rank"]] for r in training)

        status = poll_status(run_dir, until=steps_moved, timeout_s=60)
        assert status is not None and steps_moved(status), f"steps did not move: {status}"
        workers = [e["pid"] for e in read_events(events) if e["event"] == "register"]
        os.killpg(proc.pid, signal.SIGTSTP)
        _wait_for(lambda: all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in [proc.pid, *workers]))
        # Not a synchronisation: the pause itself, longer than the 2 s hang timeout, is what the
        # launcher must excuse. Nothing runs meanwhile, so there is nothing to poll for.
        time.sleep(4)
        assert all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in [proc.pid, *workers])
        os.killpg(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, err
    assert "restarts   0" in err
    assert "hung" not in err and "lost the ddp-launch master" not in err


def _wait_for(condition, proc: subprocess.Popen | None = None, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            raise AssertionError(f"the run did not get there: {proc.communicate() if proc else ''}")
        time.sleep(0.05)


@pytest.mark.timeout(90)
def test_sigkill_to_the_launcher_leaves_no_worker_behind(tmp_path):
    # Nor the forkserver's socket directory in the temporary directory (multiprocessing's
    # "pymp-..."), which only the launcher's own exit handler removed.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, out = _start_and_wait_ready(tmp_path, env={**launcher_env(), "TMPDIR": str(tmp)})
    workers = [int(f.read_text().split()[0]) for f in out.glob("pids-*.txt")]
    assert list(tmp.glob("pymp-*/listener-*")), "the forkserver's socket is not where this test looks"
    warm = [p.pid for p in psutil.Process(proc.pid).children() if psutil.Process(workers[0]).ppid() == p.pid]
    assert len(warm) == 1, "the workers' parent (the warm forkserver) was not found"
    proc.kill()
    proc.communicate(timeout=10)
    _assert_all_gone([*workers, *warm])
    deadline = time.monotonic() + 10
    while list(tmp.glob("pymp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(tmp.glob("pymp-*")), "the forkserver's socket directory was left behind"


@pytest.mark.timeout(90)
def test_a_dead_worker_s_children_are_reaped_or_stopped_at_the_restart(tmp_path):
    """The launcher is the subreaper of its workers' orphans: it must reap them too, and
    stop those still running before the next generation starts."""
    run = run_launcher(["-n", "2", "--max-restarts", "1", str(SCRIPTS / "orphan_zombie.py")], tmp_path, timeout_s=80)
    assert run.returncode == 0, run.output
    assert "orphan gone" in run.stdout, run.output
    assert "sleeper gone at the restart" in run.stdout, run.output


@pytest.mark.timeout(120)
def test_a_killed_forkserver_costs_a_restart_not_the_run(tmp_path):
    """All workers die with their forkserver; the restart starts a new one. It once came
    so fast that multiprocessing still saw the dying forkserver as alive: exit 130."""
    proc = subprocess.Popen(
        launcher_command("--run-dir", str(tmp_path / "run"), "-n", "4", "--max-restarts", "1", str(EXAMPLE),
                         "--epochs", "1000", "--max-steps", "150"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launcher_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        launcher = psutil.Process(proc.pid)

        def forkserver() -> list[psutil.Process]:
            return [c for c in launcher.children() if "forkserver" in " ".join(c.cmdline())]

        log = tmp_path / "run" / "rank-0.log"
        poll_until(lambda: log.exists() and "epoch 1/" in log.read_text(), 60, "generation 0 training")
        forkserver()[0].kill()  # its four workers die with it, mid-step
        out, err = proc.communicate(timeout=90)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, out + err
    assert "restarts   1" in err and "4/4 done" in err

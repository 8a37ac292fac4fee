"""A script cannot tell ddp-launch's worker from torchrun's.

scripts/probe.py records what a script can observe about its process (multiprocessing's
state, `__main__`, argv, sys.path, stdio, signals, the torchrun variables, the process's
title, limits, ...). It runs under torchrun and under ddp-launch, for `-n 1` and `-n 2`,
as a script and as a module, and every difference must be in ALLOWED below, which is the
README's list of documented differences ("Coming from torchrun").
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.e2e.launch import (
    SCRIPTS,
    launcher_command,
    launcher_env,
    run_command,
    run_launcher,
    torchrun_command,
    torchrun_env,
)

pytestmark = [pytest.mark.e2e]

# key -> why it may differ. Keys are paths into the probe's record.
ALLOWED = {
    # ddp-launch names the rank in the 15-character process name that top shows; torchrun's
    # workers are all "python".
    "comm": "the process name shows the rank",
    # torchrun starts `python -u`; a worker forked from the warm process cannot change the
    # interpreter's flags (its stdout and stderr are write-through all the same).
    "flags.unbuffered": "sys.flags.unbuffered",
    # Importing torch._dynamo (preloaded in the warm process; any optimizer.step() imports it)
    # adds sympy's filter; under torchrun it appears when the script first steps.
    "warnings_filters": "warning filters added by the preloaded modules",
    # The warm start itself: torch (and what a first step imports) is already imported.
    "torch_preloaded": "torch is imported before the script starts",
    "parent_is_forkserver": "the worker's parent is the warm process, not the launcher",
}


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = torchrun_env(launcher_env())
    env.pop("PYTHONUNBUFFERED", None)  # what a user's shell has: -u is the launcher's business
    return {**env, **extra}


def _records(tmp_path, name: str, command: list[str], nproc: int, stdin: str | None = "a line for rank 0\n") -> list:
    out = tmp_path / name
    out.mkdir()
    env = _env({"PROBE_DIR": str(out), "PROBE_READ_STDIN": "0"})
    run = run_command(command, tmp_path, env, timeout_s=150, stdin=stdin)
    # torch 2.13's torchrun sometimes exits 1 in its teardown after every rank finished.
    assert run.returncode == 0 or (name == "torchrun" and run.returncode == 1), run.output
    assert "fork_posix" not in run.output  # the probe forks: no gRPC noise
    assert sorted(p.name for p in out.glob("thread*.done")) == [f"thread{r}.done" for r in range(nproc)]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def _differences(theirs, ours, path: str = "") -> list[str]:
    if isinstance(theirs, dict) and isinstance(ours, dict):
        found = []
        for key in sorted(set(theirs) | set(ours)):
            found += _differences(theirs.get(key, "<missing>"), ours.get(key, "<missing>"), f"{path}.{key}".lstrip("."))
        return found
    if path == "env_keys":
        ours = [k for k in ours if not k.startswith("DDP_LAUNCH_")]  # ddp-launch's own, documented
    if path == "warnings_filters":
        ours = [f for f in ours if "SymPy" not in f] if "SymPy" not in "".join(theirs) else ours
    if theirs != ours:
        return [f"{path}: torchrun {theirs!r} | ddp-launch {ours!r}"]
    return []


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("nproc", "as_module"), [(1, False), (2, False), (1, True), (2, True)])
def test_a_probe_sees_the_same_process_under_both_launchers(tmp_path, nproc: int, as_module: bool) -> None:
    shutil.copy(SCRIPTS / "probe.py", tmp_path / "probe.py")
    target = ["-m", "probe"] if as_module else ["probe.py"]
    theirs = _records(tmp_path, "torchrun", torchrun_command("--nproc_per_node", str(nproc), *target), nproc)
    ours = _records(
        tmp_path,
        "ddp",
        launcher_command("-q", "--run-dir", str(tmp_path / "run"), "--nproc_per_node", str(nproc), *target),
        nproc,
    )

    for rank in range(nproc):
        unexplained = [d for d in _differences(theirs[rank], ours[rank]) if d.split(":")[0] not in ALLOWED]
        assert not unexplained, f"rank {rank}:\n" + "\n".join(unexplained)
        # What the comparison stands on, said plainly.
        record = ours[rank]
        assert record["mp"]["start_method"] == "fork"
        assert record["mp"]["current_process"] == "MainProcess" and record["mp"]["parent_process"] is None
        assert record["cmdline_has_script"] and record["comm"].startswith(f"rank{rank}")
        expected_argv0 = theirs[rank]["argv"][0]
        assert record["argv"][0] == expected_argv0
        assert record["main"]["__name__"] == "__main__"
    assert ours[0]["stdin"]["line"] == "a line for rank 0\n"  # stdin is the launcher's, as torchrun's
    assert (ours[0]["omp_env"] is None) == (nproc == 1)  # torchrun's OMP_NUM_THREADS rule
    assert os.path.isabs(ours[0]["main"]["__file__"])


@pytest.mark.timeout(200)
def test_start_method_spawn_gives_a_fresh_interpreter_per_worker(tmp_path) -> None:
    shutil.copy(SCRIPTS / "probe.py", tmp_path / "probe.py")
    command = launcher_command(
        "-q", "--run-dir", str(tmp_path / "run"), "--start-method", "spawn", "-n", "2", "probe.py"
    )
    for record in _records(tmp_path, "spawn", command, 2):
        assert record["parent_is_forkserver"] is False  # started by the launcher itself
        assert record["mp"]["start_method"] == "fork" and record["mp"]["current_process"] == "MainProcess"
        assert record["argv"] == ["probe.py"] and record["cmdline_has_script"]


@pytest.mark.timeout(150)
def test_start_method_spawn_keeps_hang_detection_and_the_report(tmp_path) -> None:
    run = run_launcher(
        ["--start-method", "spawn", "-n", "2", "--hang-timeout", "4", "--heartbeat-interval", "0.5", "--stop-grace",
         "1", str(SCRIPTS / "faults.py"), "hang", "1", "5", "--epochs", "1", "--max-steps", "30"],
        tmp_path,
    )  # fmt: skip
    assert run.returncode == 1, run.output
    report = json.loads((run.run_dir / "failure.json").read_text())
    assert report["outcome"] == "hung" and report["root_cause"]["rank"] == 1
    assert "wait_forever_in_the_hook" in report["root_cause"]["stack"]


@pytest.mark.timeout(200)
def test_breakpoint_on_rank_0_reads_the_launchers_stdin_as_under_torchrun(tmp_path) -> None:
    """pdb on a rank: `p x` and `c` typed on the launcher's stdin work under both launchers."""
    script = str(SCRIPTS / "debug_me.py")
    answers = "p x * 2\nc\n"
    theirs = run_command(torchrun_command("--nproc_per_node", "2", script), tmp_path, _env({}), stdin=answers)
    ours = run_command(
        launcher_command("-q", "--run-dir", str(tmp_path / "run"), "--nproc_per_node", "2", script),
        tmp_path,
        _env({}),
        stdin=answers,
    )

    for run in (theirs, ours):
        assert "82" in run.stdout, run.output  # pdb evaluated `p x * 2` on rank 0
        assert "rank 0 went on with x=41" in run.stdout and "rank 1 went on with x=42" in run.stdout
        assert "BdbQuit" not in run.output
    assert ours.returncode == 0


@pytest.mark.timeout(200)
def test_a_launcher_started_without_stdin_gives_its_workers_none(tmp_path) -> None:
    """fd 0 closed (a daemon, `<&-`): Python's sys.stdin is None, and no worker reads an fd
    the launcher opened later in its place."""
    shutil.copy(SCRIPTS / "probe.py", tmp_path / "probe.py")
    theirs = _records(tmp_path, "torchrun", torchrun_command("--nproc_per_node", "2", "probe.py"), 2, stdin=None)
    command = launcher_command("-q", "--run-dir", str(tmp_path / "run"), "--nproc_per_node", "2", "probe.py")
    ours = _records(tmp_path, "ddp", command, 2, stdin=None)
    for rank in range(2):
        assert theirs[rank]["stdin_is_none"] and ours[rank]["stdin_is_none"]
        assert ours[rank]["stdin"] is None and ours[rank]["devnull_fds"] == theirs[rank]["devnull_fds"] == []

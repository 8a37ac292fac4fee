"""Workers forked ahead of a restart (standbys): a restart takes them instead of forking,
a run that ends kills those it did not need, and a run with no restart left forks none."""

from __future__ import annotations

import re

import psutil
import pytest

from tests.e2e.launch import SCRIPTS, run_launcher

pytestmark = [pytest.mark.e2e]

PROBE = str(SCRIPTS / "standby_probe.py")


def pids_of(output: str, generation: int) -> list[int]:
    return sorted(int(p) for p in re.findall(rf"gen {generation} rank \d+ pid (\d+)", output))


def standbys_seen(output: str, generation: int) -> list[int]:
    found = re.search(rf"gen {generation} standbys ([\d ]+|none)", output)
    assert found is not None, output
    return [] if found.group(1) == "none" else sorted(map(int, found.group(1).split()))


@pytest.mark.timeout(90)
def test_a_restart_takes_the_standbys_and_the_end_kills_those_left(tmp_path):
    run = run_launcher(
        ["-n", "2", "--max-restarts", "2", PROBE, "--last", "1", "--wait-in-last"], tmp_path, timeout_s=80
    )
    assert run.returncode == 0, run.output
    ahead = standbys_seen(run.stdout, 0)
    assert len(ahead) == 2 and pids_of(run.stdout, 1) == ahead  # generation 1 is them, no fork
    assert not set(pids_of(run.stdout, 0)) & set(ahead)
    left = standbys_seen(run.stdout, 1)  # generation 2's, forked while 1 ran: never needed
    assert len(left) == 2 and not set(left) & set(ahead)
    assert not [pid for pid in [*ahead, *left] if psutil.pid_exists(pid)], "a standby outlived the run"
    assert "restarts   1" in run.stderr


@pytest.mark.timeout(60)
def test_no_standby_without_a_restart_left(tmp_path):
    run = run_launcher(["-n", "2", "--max-restarts", "0", PROBE, "--last", "0", "--wait-in-last", "--want-none"],
                       tmp_path, timeout_s=50)  # fmt: skip
    assert run.returncode == 0, run.output
    assert standbys_seen(run.stdout, 0) == []

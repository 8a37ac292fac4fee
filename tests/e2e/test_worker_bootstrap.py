"""A worker whose launcher is gone before it starts must not join the run at its address.

A launcher SIGKILLed while its forkserver still imports torch leaves the forkserver to fork
the workers it had asked for; they then found whatever master served that address next
(the same command started again, same port and token) and took its ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ddp_launch import env
from ddp_launch.control.master import MasterServer
from ddp_launch.registry import Registry
from tests.e2e.launch import kill_tree, launcher_env

pytestmark = [pytest.mark.e2e]
TOKEN = "test-token-not-secret"
START_WORKER = (
    "from ddp_launch.config import Target; from ddp_launch.run.worker import run_by_hand; run_by_hand({}, Target({}))"
)


def _worker(master: MasterServer, launcher_pid: int, script: str) -> subprocess.CompletedProcess:
    bootstrap = env.Bootstrap(
        control_addr=master.address,
        token=TOKEN,
        node_rank=0,
        local_rank=0,
        generation=0,
        backend="gloo",
        heartbeat_interval_s=0.5,
        master_lost_timeout_s=30.0,
        join_timeout_s=10.0,
        launcher_pid=launcher_pid,
    )
    code = START_WORKER.replace("Target({})", f"Target({script!r})")
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**launcher_env(), **bootstrap.to_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        kill_tree(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.timeout(120)
def test_a_worker_whose_launcher_is_gone_exits_without_registering(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: nobody holds this pid now
    script = tmp_path / "ok.py"
    script.write_text("print('ran')\n")
    registry = Registry(run_id="r", nnodes=1, local_world_size=1, max_restarts=0, ddp_addr="127.0.0.1")
    master = MasterServer(registry, TOKEN, "127.0.0.1", 0)
    master.start()
    try:
        orphan = _worker(master, gone.pid, str(script))
        assert orphan.returncode == 1, orphan
        assert f"the launcher (pid {gone.pid}) that started this worker is gone; not starting" in orphan.stderr
        assert "ran" not in orphan.stdout
        assert registry.unregistered_ranks() == [0]  # the slot is still free for the real worker

        # The same worker with a live launcher (this test) registers and runs the script.
        started = _worker(master, os.getpid(), str(script))
        assert started.returncode == 0, started
        assert "ran" in started.stdout
        assert registry.unregistered_ranks() == []
    finally:
        master.stop()

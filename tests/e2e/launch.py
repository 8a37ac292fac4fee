"""Running the launcher for real, as a user would, with a deadline and clean-up by pid."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
EXAMPLE = REPO / "examples" / "train_mlp.py"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def launcher_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ddp_launch", *args]


def launcher_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_launcher(args: list[str], cwd: Path, timeout_s: float = 120, env: dict | None = None) -> Run:
    """`python -m ddp_launch --run-dir cwd/run ARGS` in `cwd`, bounded by `timeout_s`."""
    run_dir = cwd / "run"
    proc = subprocess.Popen(
        launcher_command("--run-dir", str(run_dir), *args),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or launcher_env(),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"launcher did not finish in {timeout_s} s\nstdout:\n{out}\nstderr:\n{err}") from None
    return Run(proc.returncode, out, err, run_dir)


def free_port() -> int:
    """A port P nobody listens on right now on 127.0.0.1 (the kernel's pick), with P + 1
    free too: `--master-port P` puts the gRPC master on P + 1."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port


def kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)


def digests(output: str) -> dict[int, str]:
    """{rank: sha256} from the example's `param-digest rank=R sha256=H` lines."""
    found = {}
    for line in output.splitlines():
        if "param-digest" in line:
            fields = dict(part.split("=", 1) for part in line.split("param-digest", 1)[1].split())
            found[int(fields["rank"])] = fields["sha256"]
    return found


def poll_status(run_dir: Path, until, timeout_s: float = 90.0) -> dict | None:
    """`ddp-launch status --json` of the run in `run_dir`, asked every 0.3 s until
    `until(status)` holds or `timeout_s` passes; the last answer (None if it never answered)."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        if (run_dir / "master.json").exists():
            out = subprocess.run(
                launcher_command("status", "--run-dir", str(run_dir), "--json"),
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            if out.returncode == 0:
                status = json.loads(out.stdout)
                if until(status):
                    break
        time.sleep(0.3)
    return status


def poll_until(condition, timeout_s: float, what: str) -> float:
    """Waits (0.1 s polls) until `condition()` holds, failing the test after `timeout_s`;
    returns when it held (time.monotonic())."""
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"{what}: not within {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic()


def elastic_rows(out: Path) -> list[tuple[str, int, int, int, int, int]]:
    """What tests/e2e/scripts/elastic_train.py wrote in `out`: (host, generation, world size,
    rank, first step, pid) of each rank's first step of each generation, in order of
    generation and rank."""
    rows = []
    for path in out.glob("worlds-*.txt"):
        host = path.stem.removeprefix("worlds-")
        for line in path.read_text().splitlines():
            generation, world, rank, step, pid = (int(x) for x in line.split())
            rows.append((host, generation, world, rank, step, pid))
    return sorted(rows, key=lambda row: (row[1], row[3]))


def elastic_steps_done(out: Path) -> int:
    """The steps elastic_train.py's rank 0 saved in `out` (0 before the first)."""
    text = (out / "step").read_text() if (out / "step").exists() else ""
    return int(text) if text else 0


def torchrun_command(*args: str) -> list[str]:
    """torchrun itself (its console script is `python -m torch.distributed.run`)."""
    return [sys.executable, "-m", "torch.distributed.run", *args]


def torchrun_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """torch 2.13's torchrun restarts and tears down reliably only with this setting; it also
    makes rank 0's init_process_group host the DDP store (TORCHELASTIC_USE_AGENT_STORE=False
    with c10d), where ddp-launch's rank 0 serves it before the script starts (True)."""
    return {**(base or launcher_env()), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _close_stdin() -> None:
    os.close(0)


def run_command(
    command: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 120, stdin: str | None = ""
) -> Run:
    """Any launcher's command line in `cwd`, bounded by `timeout_s`, its tree killed after.
    `stdin`: what it reads, or None to start it with its stdin closed."""
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        stdin=subprocess.PIPE if stdin is not None else None,
        preexec_fn=None if stdin is not None else _close_stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input=stdin or None, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"{command} did not finish in {timeout_s} s\nstdout:\n{out}\nstderr:\n{err}") from None
    finally:
        kill_tree(proc.pid)
    return Run(proc.returncode, out, err, cwd)

"""Running one launcher (ddp-launch or torchrun) on the workload: bounded, watched, cleaned up.

Each run starts the launcher in a new session with its output in files, watches it every
50 ms without reaping it (so its CPU time can still be read once it has exited), keeps a
list of every process it ever had below it (torchrun starts each worker in a session of its
own, so a session sweep alone would miss them), and when it overruns its deadline or the
caller's stop condition holds, SIGKILLs that whole list by pid. Nothing it started
outlives `run_launcher`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

DDP_LAUNCH = "ddp-launch"
TORCHRUN = "torchrun"
LAUNCHERS = (DDP_LAUNCH, TORCHRUN)

WORKLOAD = Path(__file__).resolve().parent / "workload.py"
POLL_S = 0.05
TREE_SCAN_S = 0.25
TAIL_CHARS = 3000


def torchrun_executable() -> list[str]:
    """The torchrun console script next to this interpreter (not a pyenv shim, which would
    add its own start-up to torchrun's), or `python -m torch.distributed.run`."""
    script = Path(sys.executable).parent / "torchrun"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "torch.distributed.run"]


def launcher_command(
    launcher: str,
    nproc: int,
    script_args: list[str],
    *,
    run_dir: Path,
    max_restarts: int = 0,
    hang_timeout_s: float | None = None,
    script: Path = WORKLOAD,
    torchrun_args: tuple[str, ...] = (),
) -> list[str]:
    """The command line a user would type for `launcher` running `script` (the workload) on
    `nproc` workers; `torchrun_args` are torchrun's only."""
    if launcher == DDP_LAUNCH:
        cmd = [sys.executable, "-m", "ddp_launch", "-n", str(nproc), "--quiet", "--run-dir", str(run_dir)]
        cmd += ["--max-restarts", str(max_restarts)]
        if hang_timeout_s is not None:
            cmd += ["--hang-timeout", f"{hang_timeout_s:g}"]
    elif launcher == TORCHRUN:
        cmd = [*torchrun_executable(), "--standalone", "--nproc-per-node", str(nproc)]
        cmd += ["--max-restarts", str(max_restarts), *torchrun_args]
    else:
        raise ValueError(f"unknown launcher {launcher!r}")
    return [*cmd, str(script), *script_args]


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment both launchers get: the caller's, without a thread count of its own
    (both launchers then give workers OMP_NUM_THREADS=1), plus `extra`."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("PYTEST_CURRENT_TEST", None)
    env.update(extra or {})
    return env


@dataclass
class RunOutcome:
    launcher: str
    started_at: float  # time.time() just before Popen
    ended_at: float  # time.time() when the launcher was seen to have exited, or was killed
    exit_code: int | None  # None when it was killed (deadline or stop condition)
    timed_out: bool
    stopped: bool  # killed because the caller's stop condition held
    marks: dict[str, list[float]]
    cpu_s: float | None = None  # the launcher process's own user+sys time (not its children)
    peak_rss_bytes: int | None = None
    log_tail: str = ""
    leftovers: list[int] = field(default_factory=list)  # pids still alive after the run ended

    @property
    def wall_s(self) -> float:
        return self.ended_at - self.started_at


def read_marks(directory: Path) -> dict[str, list[float]]:
    """The workload's timing marks: {file name: [time.time(), ...]}."""
    marks = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.startswith("."):
                continue
            try:
                marks[entry.name] = [float(x) for x in Path(entry.path).read_text().split()]
            except (OSError, ValueError):
                continue  # being replaced right now; the next read gets it
    return marks


class _Usage:
    """The launcher process's own CPU time and peak RSS, sampled from psutil and /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu_s: float | None = None
        self.peak_rss = 0
        try:
            self._proc: psutil.Process | None = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self._proc = None

    def sample(self) -> None:
        if self._proc is None:
            return
        try:
            t = self._proc.cpu_times()  # works on a zombie too: the final figure
            self.cpu_s = t.user + t.system
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return
        try:  # the kernel's own high-water mark catches peaks between two samples
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            pass


class _Tree:
    """Every process seen below the launcher, remembered by (pid, create_time)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.known: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            self.known[root] = psutil.Process(root)

    def scan(self) -> None:
        try:
            for child in psutil.Process(self.root).children(recursive=True):
                self.known.setdefault(child.pid, child)
            for proc in list(self.known.values()):
                if proc.pid != self.root and proc.is_running():
                    for child in proc.children(recursive=True):
                        self.known.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def alive(self) -> list[psutil.Process]:
        procs = []
        for p in self.known.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    procs.append(p)
            except psutil.Error:
                continue
        return procs

    def kill(self, include_root: bool = True) -> list[int]:
        """SIGKILL every known process still running (the tree is read before any is
        signalled); returns the pids that were still alive."""
        self.scan()
        procs = [p for p in self.alive() if include_root or p.pid != self.root]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=5)
        return [p.pid for p in procs]


def _exited(pid: int) -> bool:
    """True once `pid` (our child) has exited; it stays a zombie until reaped."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL_CHARS))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def run_launcher(
    launcher: str,
    cmd: list[str],
    *,
    env: dict[str, str],
    workdir: Path,
    marks_dir: Path,
    timeout_s: float,
    stop_when: Callable[[float, dict[str, list[float]]], bool] | None = None,
    measure_usage: bool = False,
) -> RunOutcome:
    """Run `cmd` until it exits, `timeout_s` passes, or `stop_when(now, marks)` holds.

    Args:
        launcher: its name, for the record.
        cmd, env: what to start; it runs in `workdir` with its output in files there.
        marks_dir: where the workload writes its marks (BENCH_DIR).
        timeout_s: the run is killed (tree and all) when it takes longer.
        stop_when: checked every 50 ms; when true, the run is killed and `stopped` is set.
        measure_usage: sample the launcher's own CPU time and RSS every 50 ms.
    """
    out_path, err_path = workdir / "launcher.out", workdir / "launcher.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started_at = time.time()
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = time.monotonic() + timeout_s
    tree = _Tree(proc.pid)
    usage = _Usage(proc.pid) if measure_usage else None
    timed_out = stopped = False
    next_scan = 0.0
    try:
        while True:
            now = time.monotonic()
            if usage is not None:
                usage.sample()
            if now >= next_scan:
                tree.scan()
                next_scan = now + TREE_SCAN_S
            if _exited(proc.pid):
                break
            if now >= deadline:
                timed_out = True
                break
            if stop_when is not None and stop_when(time.time(), read_marks(marks_dir)):
                stopped = True
                break
            time.sleep(POLL_S)
        ended_at = time.time()
        if usage is not None:
            usage.sample()  # the last figure, read from the zombie before it is reaped
        if timed_out or stopped:
            tree.kill()
        proc.wait()
        leftovers = tree.kill(include_root=False)  # workers it left behind, if any
    except BaseException:
        tree.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
        raise
    return RunOutcome(
        launcher=launcher,
        started_at=started_at,
        ended_at=ended_at,
        exit_code=None if (timed_out or stopped) else proc.returncode,
        timed_out=timed_out,
        stopped=stopped,
        marks=read_marks(marks_dir),
        cpu_s=usage.cpu_s if usage else None,
        peak_rss_bytes=(usage.peak_rss or None) if usage else None,
        log_tail=_tail(err_path) + _tail(out_path),
        leftovers=leftovers,
    )

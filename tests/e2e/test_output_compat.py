"""Worker output as torchrun users expect it: live bars and prompts, torchrun's log files.

The log-file tests run torchrun beside ddp-launch on the same script and compare what each
wrote: the same file tree and file contents, and the same worker lines on the console or
off it. The consoles' prefixes differ by design (`[default0]:` against `[rank 0] `), and
torchrun's tee prints every carriage-return piece of a line where ddp-launch prints the
line as a terminal shows it; those are left out of the comparison.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.launch import (
    SCRIPTS,
    kill_tree,
    launcher_command,
    launcher_env,
    run_command,
    run_launcher,
    torchrun_command,
)

pytestmark = [pytest.mark.e2e]

DEADLINE_S = 30.0  # shorter than live_bar.py waits for its go-ahead


class Console:
    """A launcher's stdout and stderr, read as they come, with deadlines."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.text = {"stdout": "", "stderr": ""}
        self._selector = selectors.DefaultSelector()
        for name in ("stdout", "stderr"):
            stream = getattr(proc, name)
            os.set_blocking(stream.fileno(), False)
            self._selector.register(stream.fileno(), selectors.EVENT_READ, name)

    def wait_for(self, name: str, text: str, timeout_s: float = DEADLINE_S) -> bool:
        deadline = time.monotonic() + timeout_s
        while text not in self.text[name]:
            left = deadline - time.monotonic()
            if left <= 0 or not self._selector.get_map():
                return False
            self._read(left)
        return True

    def finish(self, timeout_s: float = DEADLINE_S) -> int:
        deadline = time.monotonic() + timeout_s
        while self._selector.get_map() and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        self._selector.close()

    def _read(self, timeout_s: float) -> None:
        for key, _ in self._selector.select(timeout_s):
            data = os.read(key.fd, 65536)
            if data:
                self.text[key.data] += data.decode(errors="replace")
            else:
                self._selector.unregister(key.fd)


@pytest.mark.timeout(150)
def test_a_bar_and_a_prompt_reach_the_console_before_their_newline(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        launcher_command("-n", "2", "--quiet", "--run-dir", str(run_dir), str(SCRIPTS / "live_bar.py"), str(out)),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=launcher_env(),
        start_new_session=True,
    )
    console = Console(proc)
    try:
        for rank in (0, 1):
            # The bar's last state, while the script still waits to print its newline.
            assert console.wait_for("stdout", f"[rank {rank}] rank {rank} epoch 1 100%|##########|\n"), console.text
            (out / f"bar-seen-{rank}").touch()
            assert console.wait_for("stderr", f"[rank {rank}] rank {rank} (Pdb) \n"), console.text
            (out / f"prompt-seen-{rank}").touch()
        assert console.finish() == 0, console.text
    finally:
        console.close()
        if proc.poll() is None:
            kill_tree(proc.pid)
        proc.wait()
    stdout = console.text["stdout"]
    for rank in (0, 1):
        # Each completed line once more, as a terminal shows it, after its live states.
        lines = [line for line in stdout.splitlines() if line.startswith(f"[rank {rank}] ")]
        assert lines[-2:] == [f"[rank {rank}] rank {rank} epoch 1 100%|##########|", f"[rank {rank}] rank {rank} done"]
        assert f"[rank {rank}] rank {rank} (Pdb) continue\n" in console.text["stderr"]
        # The log has each line once, collapsed: no carriage returns, no states.
        log = (run_dir / f"rank-{rank}.log").read_text()
        assert "\r" not in log
        # (stdout and stderr are two pipes: the last two lines may come in either order)
        assert sorted(log.splitlines()[1:]) == [
            f"rank {rank} (Pdb) continue",
            f"rank {rank} done",
            f"rank {rank} epoch 1 100%|##########|",
        ]


# -- torchrun's log options, side by side with torchrun ----------------------------------------------

PROBE = SCRIPTS / "output_probe.py"
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE: torch 2.13's agent otherwise often fails its restarts.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
_PREFIX = re.compile(r"^(\[[a-z]+\d+\]:|\[rank \d+\] )")  # torchrun's [<role><local rank>]:, ours


def _run_torchrun(args: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 120) -> tuple[int, str, str]:
    run = run_command(torchrun_command("--standalone", "--nproc-per-node", "2", *args), cwd, env, timeout_s=timeout_s)
    return run.returncode, run.stdout, run.stderr


def _job_dir(base: Path) -> Path:
    (job,) = base.iterdir()
    assert re.fullmatch(r".+_[a-z0-9_]{8}", job.name), job.name  # <run id>_<mkdtemp's suffix>
    return job


def _tree(job: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(job)): (p.read_bytes() if p.is_file() else None) for p in sorted(job.rglob("*"))}


def _error_record(data: bytes | None) -> dict:
    """An error.json without its timestamp."""
    record = json.loads(data or b"{}")
    record.get("message", {}).get("extraInfo", {}).pop("timestamp", None)
    return record


def _worker_lines(text: str) -> set[str]:
    return {_PREFIX.sub("", line) for line in text.splitlines()}


def _probe_lines(generations: int) -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
    for g in range(generations):
        for r in (0, 1):
            lines["stdout"] += [f"out {r} hello gen {g}", f"bar {r} 2", f"out {r} KEEP me", f"out {r} caf\u00e9 done"]
            lines["stderr"] += [f"err {r} oops gen {g}", f"err {r} KEEP err"]
    return lines


@pytest.fixture
def short_tmp():
    """A TMPDIR short enough for the forkserver's socket path (pytest's tmp_path is not)."""
    path = Path(tempfile.mkdtemp(prefix="ddpl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("options", "fail_local_rank"),
    [
        (["--log-dir", "{logs}", "--tee", "3", "--duplicate-stdout-filters", "KEEP,bar",
          "--duplicate-stderr-filters", "KEEP", "--role", "trainer"], None),
        (["-r", "3"], None),  # no --log-dir: a torchelastic_* directory under TMPDIR
        (["--log-dir", "{logs}", "--tee", "3", "--local-ranks-filter", "0"], None),
        (["--log-dir", "{logs}", "--tee", "0:3", "--max-restarts", "1", "--duplicate-stderr-filters", "KEEP"], "1"),
    ],
    ids=["log-dir-tee-filters", "redirects-temp-dir", "local-ranks-filter", "restarts"],
)  # fmt: skip
def test_torchruns_log_options_write_what_torchrun_writes(tmp_path, short_tmp, options, fail_local_rank):
    found = {}
    for launcher in ("torchrun", "ddp-launch"):
        cwd = tmp_path / launcher
        logs, temp = cwd / "logs", short_tmp / launcher
        cwd.mkdir()
        temp.mkdir()
        env = launcher_env() | TORCHRUN_ENV | {"TMPDIR": str(temp)}
        if fail_local_rank is not None:
            env["PROBE_FAIL_LOCAL_RANK"] = fail_local_rank
        args = [a.format(logs=logs) for a in options] + [str(PROBE)]
        if launcher == "torchrun":
            code, out, err = _run_torchrun(args, cwd, env)
            assert code in (0, 1), err  # torch 2.13's agent sometimes exits 1 at its teardown
        else:
            run = run_launcher(["-n", "2", *args], cwd, env=env)
            assert run.returncode == 0, run.output
            out, err = run.stdout, run.stderr
        if "--log-dir" in options:
            job = _job_dir(logs)
        else:
            (base,) = [p for p in temp.iterdir() if p.name.startswith("torchelastic_")]
            job = _job_dir(base)
        found[launcher] = (_tree(job), out, err)

    (tree, out, err), (our_tree, our_out, our_err) = found["torchrun"], found["ddp-launch"]
    assert sorted(our_tree) == sorted(tree)
    for path, data in tree.items():
        if Path(path).name == "error.json":  # torch's @record wrote it where each launcher said
            assert _error_record(our_tree[path]) == _error_record(data), path
            assert b"probe failure" in data  # type: ignore[operator]
        elif Path(path).name.startswith("filtered_"):
            # Lines of different ranks reach the shared file in no fixed order.
            assert sorted(our_tree[path].splitlines()) == sorted(data.splitlines()), path  # type: ignore[union-attr]
        else:
            assert our_tree[path] == data, path  # stdout.log / stderr.log: the worker's bytes
    generations = 2 if fail_local_rank is not None else 1
    for name, console, ours in (("stdout", out, our_out), ("stderr", err, our_err)):
        theirs_seen, ours_seen = _worker_lines(console), _worker_lines(ours)
        for line in _probe_lines(generations)[name]:
            assert (line in ours_seen) == (line in theirs_seen), (name, line, console, ours)

"""The run directory's layout: every file a run writes under ``--run-dir`` (default
``runs/<run-id>``), named in this one place.

::

    runs/<run-id>/
        master.json         where the master listens (host, port, pid, run id): `status` reads it
        token               the run's secret, mode 0600 (never in master.json), removed when
                            the run ends
        events.jsonl        the event log (observe/events.py, schema in events.schema.json)
        failure.json        the failure report of a run that did not succeed
        report.html         `ddp-launch report`'s page; report-*.png with --png
        rank-<i>.log        each rank's output, every generation appended
        errors/generation-<g>/rank-<i>.json
                            TORCHELASTIC_ERROR_FILE of each worker (without torchrun's log tree)

It imports nothing of the package: every layer may use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

MASTER = "master.json"
TOKEN = "token"
EVENTS = "events.jsonl"
FAILURE = "failure.json"
REPORT = "report.html"


def master_file(run_dir: Path) -> Path:
    return Path(run_dir) / MASTER


def token_file(run_dir: Path) -> Path:
    return Path(run_dir) / TOKEN


def events_file(run_dir: Path) -> Path:
    return Path(run_dir) / EVENTS


def failure_file(run_dir: Path) -> Path:
    return Path(run_dir) / FAILURE


def report_file(run_dir: Path) -> Path:
    return Path(run_dir) / REPORT


def png_file(out_dir: Path, stem: str) -> Path:
    """A chart of `ddp-launch report --png` (stem: report-loss, report-step-rate, ...)."""
    return Path(out_dir) / f"{stem}.png"


def rank_log(log_dir: Path, rank: int) -> Path:
    return Path(log_dir) / f"rank-{rank}.log"


RANK_LOG_PATTERN = "rank-<i>.log"


def error_file(run_dir: str, generation: int, rank: int) -> str:
    """A worker's TORCHELASTIC_ERROR_FILE below the run directory."""
    return os.path.join(run_dir, "errors", f"generation-{generation}", f"rank-{rank}.json")


def make(run_dir: Path) -> Path:
    """Create the run directory (and its parents).

    Raises:
        OSError: it cannot be made; the caller says so in one line.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_token(run_dir: Path, token: str) -> None:
    """The token goes in a file only its owner can read, never in master.json."""
    fd = os.open(token_file(run_dir), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)


def remove_token(run_dir: Path) -> None:
    """The run is over: its secret does not stay behind in a shared submit directory."""
    token_file(run_dir).unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

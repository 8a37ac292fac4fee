"""`ddp-launch status`: ask a running master for its per-rank state and print it.

The run directory holds `master.json` (host, port, pid) and `token` (mode 0600; see
rundir.py), so the command run inside a run directory, or next to `./runs/`, needs no
arguments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ddp_launch import env, rundir
from ddp_launch.control import wire
from ddp_launch.errors import DdpLaunchError
from ddp_launch.observe.format import format_bytes, format_loss
from ddp_launch.record import rank_json


class StatusUnavailable(DdpLaunchError):
    """No run found, or its master does not answer."""


def find_run_dir(start: Path) -> Path:
    """`start` when it holds master.json; else the newest run under `start`/runs or `start`."""
    if rundir.master_file(start).is_file():
        return start
    candidates = [
        p.parent for base in (start / "runs", start) if base.is_dir() for p in base.glob(f"*/{rundir.MASTER}")
    ]
    if not candidates:
        raise StatusUnavailable(f"no run directory (with {rundir.MASTER}) in or under {str(start)!r}; give --run-dir")
    return max(candidates, key=lambda d: rundir.master_file(d).stat().st_mtime)


def resolve_endpoint(
    run_dir: Path | None,
    master_addr: str | None,
    master_port: int | None,
    token_file: Path | None,
    tls_ca: Path | None = None,
) -> tuple[str, str, str | None]:
    """(host:port, token, CA file or None) from explicit options, else from the run directory."""
    token = os.environ.get(env.TOKEN, "")
    if token_file is not None:
        token = token_file.read_text().strip()
    ca = str(tls_ca) if tls_ca else None
    if master_addr and master_port:
        return f"{master_addr}:{master_port}", token, ca
    directory = find_run_dir(run_dir or Path.cwd())
    try:
        master = json.loads(rundir.master_file(directory).read_text())
    except (OSError, ValueError) as e:
        raise StatusUnavailable(f"cannot read {rundir.master_file(directory)}: {e}") from None
    if not token and rundir.token_file(directory).is_file():
        token = rundir.token_file(directory).read_text().strip()
    address = f"{master_addr or master['host']}:{master_port or master['port']}"
    return address, token, ca or master.get("tls_ca")


def fetch_status(address: str, token: str, tls_ca: str | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
    """The master's status as plain data (the shape `--json` prints)."""
    import grpc

    from ddp_launch.control.client import MasterClient

    client = MasterClient(address, token, tls_ca=tls_ca)
    try:
        reply = client.get_status(timeout_s=timeout_s)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise StatusUnavailable(f"the master at {address} refused the token (see --token-file)") from None
        raise StatusUnavailable(f"no master answers at {address} ({e.code().name}); has the run ended?") from None
    finally:
        client.close()
    return {
        "run_id": reply.run_id,
        "world_size": reply.world_size,
        "generation": reply.generation,
        "restarts": reply.restarts,
        "max_restarts": reply.max_restarts,
        "elapsed_s": round(reply.elapsed_s, 3),
        "total_steps": reply.total_steps,
        "ranks": [rank_json(wire.record_from_proto(r)) for r in reply.ranks],
    }


def format_table(status: dict[str, Any]) -> str:
    """The status as a table a person reads: ``step`` is the step the script reported (``-``
    when it reported none), ``opt steps`` the optimizer steps of this generation."""
    head = (
        f"run {status['run_id']}: {status['world_size']} ranks, generation {status['generation']}, "
        f"restarts {status['restarts']}/{status['max_restarts']}, up {status['elapsed_s']:.0f} s"
    )
    columns = ["rank", "node", "pid", "state", "gen", "step", "opt steps", "steps/s", "loss", "rss", "cpu%", "hb age"]
    rows = []
    for r in status["ranks"]:
        state = r["state"] + (" straggler" if r["straggler"] else "")
        if r["exit"]:
            state += f" ({r['exit']})"
        rows.append(
            [
                str(r["rank"]),
                str(r["node_rank"]),
                str(r["pid"] or "-"),
                state,
                str(r["generation"]),
                "-" if r["reported_step"] is None else str(r["reported_step"]),
                str(r["optimizer_steps"]),
                f"{r['steps_per_s']:.1f}",
                format_loss(r["loss"]),
                format_bytes(r["rss_bytes"]),
                f"{r['cpu_percent']:.0f}",
                "-" if r["heartbeat_age_s"] is None else f"{r['heartbeat_age_s']:.1f} s",
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)

"""The checked-in generated protocol code must be exactly what protos/orchestrator.proto gives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

ROOT = Path(__file__).parents[2]
GENERATED = ("orchestrator_pb2.py", "orchestrator_pb2.pyi", "orchestrator_pb2_grpc.py")
REGENERATE = (
    "python -m grpc_tools.protoc -Iddp_launch/proto=protos --python_out=. --pyi_out=. "
    "--grpc_python_out=. protos/orchestrator.proto"
)


@pytest.mark.timeout(60)
def test_generated_code_matches_the_proto(tmp_path):
    out = str(tmp_path)
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", "-Iddp_launch/proto=protos",
        f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
        "protos/orchestrator.proto",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, f"protoc failed:\n{done.stderr}"
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "ddp_launch" / "proto" / name).read_bytes()
        != (ROOT / "ddp_launch" / "proto" / name).read_bytes()
    ]
    assert not stale, (
        f"ddp_launch/proto/{', '.join(stale)} out of date with protos/orchestrator.proto; "
        f"regenerate from the repository root with:\n  {REGENERATE}"
    )

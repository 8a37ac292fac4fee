"""TLS on the control connection, with a throwaway CA made for the test (needs openssl)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from tests.e2e.launch import SCRIPTS, run_launcher

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path) -> Path:
    """ca.pem, and server.pem / server.key for 127.0.0.1 signed by it."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "1", "-subj", "/CN=ddp-launch test CA", cwd=d)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "1", "-extfile", "san.ext", cwd=d)  # fmt: skip
    return d


def _tls_master(pki: Path, nnodes: int):
    """A started master for a world of `nnodes` nodes of one worker, serving TLS with the test CA's certificate."""
    from ddp_launch.config import TlsFiles
    from ddp_launch.control.master import MasterServer
    from ddp_launch.registry import Registry

    registry = Registry(run_id="r", nnodes=nnodes, local_world_size=1, max_restarts=0, ddp_addr="127.0.0.1")
    server = MasterServer(
        registry, "tok", "127.0.0.1", 0, tls=TlsFiles(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    )
    server.start()
    return server


@pytest.mark.timeout(120)
def test_a_run_over_tls_registers_and_finishes(tmp_path, pki):
    out = tmp_path / "env"
    out.mkdir()
    tls = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"), "--tls-ca", str(pki / "ca.pem")]
    run = run_launcher(["-n", "2", *tls, str(SCRIPTS / "env_dump.py"), str(out)], tmp_path)
    assert run.returncode == 0, run.output
    assert sorted(p.name for p in out.iterdir()) == ["env-0.json", "env-1.json"]
    master = json.loads((run.run_dir / "master.json").read_text())
    assert master["tls_ca"] == str((pki / "ca.pem").resolve())


@pytest.mark.timeout(60)
def test_the_master_speaks_only_tls_when_asked_to(pki):
    from ddp_launch.control.client import MasterClient

    server = _tls_master(pki, nnodes=1)
    try:
        secure = MasterClient(server.address, "tok", tls_ca=str(pki / "ca.pem"))
        try:
            assert secure.get_status().world_size == 1  # a TLS round trip
        finally:
            secure.close()
        plain = MasterClient(server.address, "tok")
        try:
            with pytest.raises(grpc.RpcError) as e:
                plain.get_status(timeout_s=3)
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            plain.close()
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_a_cert_without_its_key_is_bad_input(tmp_path, pki):
    (tmp_path / "x.py").write_text("print('should not run')\n")
    run = run_launcher(["--tls-cert", str(pki / "server.pem"), "x.py"], tmp_path)
    assert run.returncode == 2 and "--tls-cert and --tls-key go together" in run.stderr


@pytest.mark.timeout(60)
def test_a_node_relay_forwards_heartbeats_to_a_tls_master(pki):
    from ddp_launch.control.client import MasterClient
    from ddp_launch.control.relay import HeartbeatRelay
    from ddp_launch.control.wire import TOKEN_METADATA_KEY
    from ddp_launch.proto import orchestrator_pb2 as pb
    from ddp_launch.proto import orchestrator_pb2_grpc as pb_grpc

    server = _tls_master(pki, nnodes=2)
    registry = server.registry
    relay = HeartbeatRelay(
        node_rank=1, master_address=server.address, token="tok", interval_s=0.1, tls_ca=str(pki / "ca.pem")
    )
    relay.start()
    client = MasterClient(server.address, "tok", tls_ca=str(pki / "ca.pem"))
    channel = grpc.insecure_channel(relay.address)  # workers reach their relay on loopback
    try:
        client.register(node_rank=1, local_rank=0, generation=0, deadline_s=10, pid=4242)
        stub = pb_grpc.OrchestratorStub(channel)
        beats = iter([pb.Heartbeat(rank=1, pid=4242, step=12)])
        stub.StreamHeartbeats(beats, metadata=((TOKEN_METADATA_KEY, "tok"),), timeout=10)
        deadline = time.monotonic() + 10
        while registry.snapshot().ranks[1].step != 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert registry.snapshot().ranks[1].step == 12
        assert relay.forwarded == 1
    finally:
        channel.close()
        client.close()
        relay.stop()
        server.stop()

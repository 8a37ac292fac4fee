"""The status command, straggler flags and Prometheus metrics against a live run."""

from __future__ import annotations

import subprocess
import urllib.request

import pytest

from tests.e2e.launch import (
    SCRIPTS,
    free_port,
    kill_tree,
    launcher_command,
    launcher_env,
    poll_status,
    run_launcher,
)

pytestmark = [pytest.mark.e2e]


def _status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(launcher_command("status", *args), capture_output=True, text=True, timeout=30)


@pytest.mark.timeout(150)
def test_status_metrics_and_straggler_flag_on_a_live_run(tmp_path):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    run_dir = tmp_path / "run"
    metrics_port = free_port()
    proc = subprocess.Popen(
        launcher_command("--run-dir", str(run_dir), "-n", "3", "--heartbeat-interval", "0.25",
                         "--straggler-window", "2", "--metrics-port", str(metrics_port),
                         str(SCRIPTS / "straggler.py"), "2", "400"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launcher_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        status = poll_status(run_dir, until=lambda s: any(r["straggler"] for r in s["ranks"]))
        assert status is not None, "status never answered"
        assert status["world_size"] == 3 and [r["rank"] for r in status["ranks"]] == [0, 1, 2]
        assert [r["rank"] for r in status["ranks"] if r["straggler"]] == [2], status
        for r in status["ranks"]:
            assert r["state"] == "training" and r["pid"] > 0 and r["step"] > 0
            assert r["rss_bytes"] > 0 and r["heartbeat_age_s"] is not None
            assert set(r) >= {
                "node_rank",
                "generation",
                "optimizer_steps",
                "reported_step",
                "exit",
                "steps_per_s",
                "loss",
                "cpu_percent",
            }
        assert status["ranks"][2]["steps_per_s"] < status["ranks"][0]["steps_per_s"]

        table = _status("--run-dir", str(run_dir))
        assert table.returncode == 0 and "straggler" in table.stdout and "steps/s" in table.stdout

        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        steps = {s.labels["rank"]: s.value for s in families["ddp_launch_rank_step"].samples}
        assert set(steps) == {"0", "1", "2"} and all(v > 0 for v in steps.values())
        stragglers = {s.labels["rank"]: s.value for s in families["ddp_launch_rank_straggler"].samples}
        assert stragglers["2"] == 1.0
        training = [s.value for s in families["ddp_launch_ranks"].samples if s.labels["state"] == "training"]
        assert training == [3.0]
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        finally:
            kill_tree(proc.pid)


@pytest.mark.timeout(30)
def test_status_without_a_run_is_a_one_line_error(tmp_path):
    out = subprocess.run(launcher_command("status"), capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().startswith("ddp-launch: error: no run directory")


@pytest.mark.timeout(180)
def test_event_log_of_a_run_with_a_restart_follows_the_schema_and_renders(tmp_path):
    from ddp_launch.observe.events import read_events, validate_event
    from ddp_launch.observe.report import load_report_data

    run = run_launcher(
        ["-n", "2", "--max-restarts", "1", "--stop-grace", "1", "--heartbeat-interval", "0.5",
         str(SCRIPTS / "faults.py"), "exit1", "1", "15", "--epochs", "1", "--max-steps", "30",
         "--checkpoint", str(tmp_path / "ckpt.pt")],
        tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.output
    events = read_events(run.run_dir / "events.jsonl")
    for event in events:
        validate_event(event)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert kinds.count("barrier_open") == 2 and kinds.count("register") == 4
    failure = next(e for e in events if e["event"] == "failure")
    assert failure["generation"] == 0 and failure["root_rank"] == 1
    restart = next(e for e in events if e["event"] == "restart")
    assert restart["generation"] == 1 and "rank 1 failed" in restart["reason"]
    end = events[-1]
    assert end["outcome"] == "succeeded" and end["exit_code"] == 0 and end["restarts"] == 1
    assert end["final_step"] == 30

    report = subprocess.run(launcher_command("report", str(run.run_dir)), capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    page = (run.run_dir / "report.html").read_text()
    assert "<svg" in page and "http://" not in page and "https://" not in page
    data = load_report_data(run.run_dir)
    assert data["outcome"] == "succeeded"


@pytest.mark.timeout(30)
def test_report_of_a_directory_without_events_is_a_one_line_error(tmp_path):
    out = subprocess.run(launcher_command("report", str(tmp_path)), capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("ddp-launch: error: no events.jsonl")

"""The HTML (and PNG) report, rendered from an events.jsonl that EventLog wrote from a real
registry on a fake clock: a run with a failure and a restart, a run stopped by Ctrl-C, a resume
from a checkpoint; and, for large worlds, from hand-built progress snapshots."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddp_launch.errors import ConfigError
from ddp_launch.observe.events import EVENT_KINDS, EventLog, read_events
from ddp_launch.observe.report import data as report_data_module
from ddp_launch.observe.report import load_report_data, nice_ticks, render_html, render_png
from ddp_launch.record import RankRecord, RankState
from ddp_launch.registry import RunSnapshot
from tests.fakes import FakeClock
from tests.unit.run_fakes import T0, FakeRun, resume_from_checkpoint

RUN_ID = "<script>alert(1)</script>"


def view(i: int, generation: int, state: RankState, step: int, loss: float | None, **kw: object) -> RankRecord:
    """A rank as a snapshot gives it, for the tests that are only about progress samples."""
    fields: dict[str, object] = {
        "rank": i,
        "node_rank": 0,
        "local_rank": i,
        "generation": generation,
        "state": state,
        "pid": 0 if state is RankState.STARTING else 2000 + 10 * generation + i,
        "hostname": "" if state is RankState.STARTING else "node-a",
        "optimizer_steps": step,
        "samples": step * 32,
        "steps_per_s": 0.0 if state is RankState.STARTING else 10.0 - i,
        "loss": loss,
        "rss_bytes": 200_000_000,
        "cpu_percent": 95.0,
        "heartbeat_age_s": None if state is RankState.STARTING else 0.3,
    }
    fields.update(kw)
    return RankRecord(**fields)  # type: ignore[arg-type]


def snap(generation: int, ranks: list[RankRecord], elapsed_s: float) -> RunSnapshot:
    return RunSnapshot(
        run_id=RUN_ID,
        world_size=len(ranks),
        generation=generation,
        max_restarts=1,
        elapsed_s=elapsed_s,
        total_steps=400,
        barrier_open=all(r.state is not RankState.STARTING for r in ranks),
        ranks=tuple(ranks),
        taken_at=elapsed_s,
    )


def emit_run_start(run: FakeRun, *, world: int, run_id: str = RUN_ID) -> None:
    run.emit(
        "run_start",
        run_id=run_id,
        config={"nproc_per_node": world, "max_restarts": 1, "script": "train.py & <b>bold</b>"},
        world_size=world,
        nnodes=1,
        nproc_per_node=world,
        versions={"python": "3.11.7", "ddp_launch": "0.1.0", "grpc": "1.70.0"},
        host="node-a",
    )


def emit_run_end(run: FakeRun, outcome: str, exit_code: int, final_step: int, restarts: int = 0) -> None:
    run.emit(
        "run_end",
        outcome=outcome,
        exit_code=exit_code,
        wall_s=run.wall.now - run.t0,
        restarts=restarts,
        final_step=final_step,
        summary={"samples_per_s": 512.5, "slowest_rank": 1},
    )


def write_fake_run(
    run_dir: Path, *, world: int = 2, finished: bool = True, with_failure_json: bool = False, run_id: str = RUN_ID
) -> None:
    """Generation 0 trains 20 s and rank 1 fails (the launcher stops the others); generation 1
    resumes from a checkpoint 10 steps behind and trains 30 s to the end. A real registry on a
    fake clock, one step per 0.25 s (4 steps/s), observed at each step."""
    with FakeRun(run_dir / "events.jsonl", nproc=world, run_id=run_id, progress_interval_s=1.0) as run:
        emit_run_start(run, world=world, run_id=run_id)
        step = 0
        for generation, seconds in ((0, 20), (1, 30)):
            if generation:
                run.restart()
            run.observe()
            run.advance(0.5)
            run.register_all()
            for optimizer_steps in range(1, seconds * 4 + 1):
                step += 1
                loss = 2.0 / (1 + 0.05 * step)
                for i in range(world):
                    run.heartbeat(
                        i,
                        optimizer_steps=optimizer_steps,
                        reported_step=step,
                        samples=step * 32,
                        loss=loss + 0.01 * i,
                        total_steps=400,
                    )
                run.observe()
                run.advance(0.25)
            if generation == 0:
                run.exit(1, 1)
                run.stop()
                for i in range(world):
                    if i != 1:
                        run.exit(i, -15)
                run.observe()
                run.emit(
                    "failure",
                    generation=0,
                    report={"outcome": "failed", "message": "rank 1 failed (exit code 1)", "root_rank": 1},
                    outcome="failed",
                    message="rank 1 failed (exit code 1)",
                    root_rank=1,
                )
                run.advance(0.2)
                run.emit("restart", generation=1, reason="rank 1 failed (exit code 1)")
                step -= 10  # resumed from a checkpoint a little behind
        if finished:
            for i in range(world):
                run.exit(i, 0)
            run.observe()
            emit_run_end(run, "succeeded", 0, step, restarts=1)
    if with_failure_json:
        failure = {
            "outcome": "failed",
            "message": "rank 1 failed (exit code 1)",
            "restarts": 1,
            "root_cause": {
                "rank": 1,
                "node_rank": 0,
                "hostname": "node-a",
                "pid": 2011,
                "generation": 1,
                "step": 130,
                "exit": "exit code 1",
                "exception_type": "ValueError",
                "traceback": 'Traceback (most recent call last):\n  File "train.py"\nValueError: x < y & <z>',
            },
            "consequences": [{"rank": 0, "exit": "signal SIGTERM"}],
        }
        (run_dir / "failure.json").write_text(json.dumps(failure))


def report_data(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert match, "no report-data block"
    return json.loads(match.group(1))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs" / "r1"
    d.mkdir(parents=True)
    write_fake_run(d)
    return d


def test_html_report_holds_the_charts_and_the_plotted_data(run_dir: Path) -> None:
    out = render_html(run_dir)
    assert out == run_dir / "report.html"
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 3  # loss, step rate, step
    assert "<polyline" in page

    data = report_data(page)
    assert data["outcome"] == "succeeded" and not data["running"]
    assert data["run_id"] == RUN_ID
    progress = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "progress"]
    series = {s["rank"]: s for s in data["series"]}
    assert sorted(series) == [0, 1]
    for rank, s in series.items():
        expected = sum(any(x["rank"] == rank for x in p["ranks"]) for p in progress)
        assert expected > 40
        for key in ("t", "generation", "step", "steps_per_s", "loss"):
            assert len(s[key]) == expected, key
        assert s["t"] == sorted(s["t"])
        assert set(s["generation"]) == {0, 1}
    assert series[1]["steps_per_s"][-1] == 4.0  # one step per 0.25 s
    assert data["aggregate"] is None

    kinds = [m["kind"] for m in data["markers"]]
    assert kinds == ["failure", "restart"]
    failure, restart = data["markers"]
    assert (failure["t"], restart["t"]) == (20.5, 20.7)  # when they happened
    rows = {r["rank"]: r for r in data["ranks"]}
    assert rows[0]["final_step"] == series[0]["step"][-1] == 190
    assert rows[1]["median_steps_per_s"] == 4.0
    assert rows[0]["restarts"] == 1
    # rank 0 was stopped by the launcher when rank 1 failed: not a failure of its own
    assert (rows[0]["failures"], rows[1]["failures"]) == (0, 1)
    assert rows[0]["state"] == rows[1]["state"] == "done"
    assert rows[0]["last_loss"] == pytest.approx(2.0 / (1 + 0.05 * 190))


def test_html_report_needs_no_network(run_dir: Path) -> None:
    page = render_html(run_dir).read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=""", page, re.I)  # no resource of any kind is loaded
    assert "@import" not in page and "url(" not in page


def test_html_report_escapes_all_text(run_dir: Path) -> None:
    page = render_html(run_dir).read_text(encoding="utf-8")
    assert RUN_ID not in page
    assert html.escape(RUN_ID) in page
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    # the only script element is the JSON data block, which no text can close early
    assert page.count("<script") == 1 and page.count("</script>") == 1
    assert report_data(page)["run_start"]["config"]["script"] == "train.py & <b>bold</b>"


def test_failure_json_gives_the_root_cause(tmp_path: Path) -> None:
    write_fake_run(tmp_path, with_failure_json=True)
    page = render_html(tmp_path, tmp_path / "new" / "elsewhere.html").read_text(encoding="utf-8")
    assert "Root cause: rank 1 on node-a (node 0), pid 2011" in page
    assert "ValueError: x &lt; y &amp; &lt;z&gt;" in page
    assert "rank 0 then ended too (signal SIGTERM)" in page
    assert not (tmp_path / "report.html").exists()
    # a failure.json older than the run's start was left by an earlier run: not this one's
    os.utime(tmp_path / "failure.json", (T0 - 3600, T0 - 3600))
    assert load_report_data(tmp_path)["failure"]["root_rank"] == 1
    assert "root_cause" not in load_report_data(tmp_path)["failure"]


def test_failure_event_is_the_root_cause_without_failure_json(run_dir: Path) -> None:
    data = load_report_data(run_dir)
    assert data["failure"] == {"outcome": "failed", "message": "rank 1 failed (exit code 1)", "root_rank": 1}
    page = render_html(run_dir).read_text(encoding="utf-8")
    assert "Failure (the run recovered from it)" in page


def test_a_report_during_the_run_reads_what_is_there(tmp_path: Path) -> None:
    write_fake_run(tmp_path, finished=False)
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"v":2,"t":1700000100.0,"event":"progre')  # being written right now
    page = render_html(tmp_path).read_text(encoding="utf-8")
    data = report_data(page)
    assert data["outcome"] == "running" and data["running"]
    assert data["duration_s"] > 50
    assert "had not ended" in page
    assert {r["state"] for r in data["ranks"]} == {"running"}


def test_a_run_that_has_barely_started(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    with EventLog(tmp_path / "events.jsonl", clock=clock) as log:
        log.emit(
            "run_start",
            run_id="r",
            config={},
            world_size=2,
            nnodes=1,
            nproc_per_node=2,
            versions={"python": "3"},
            host="h",
        )
    page = render_html(tmp_path).read_text(encoding="utf-8")
    assert "<svg" not in page
    assert "no data yet" in page and "No rank has registered yet" in page
    assert report_data(page)["series"] == []


def test_no_events_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no events.jsonl"):
        render_html(tmp_path)


def test_only_the_last_run_in_an_appended_file_is_shown(tmp_path: Path) -> None:
    write_fake_run(tmp_path)
    first = load_report_data(tmp_path)
    write_fake_run(tmp_path, world=3)
    data = load_report_data(tmp_path)
    assert [s["rank"] for s in data["series"]] == [0, 1, 2]
    assert len(data["series"][0]["t"]) == len(first["series"][0]["t"])


def test_a_large_world_is_plotted_as_an_aggregate(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    with EventLog(tmp_path / "events.jsonl", clock=clock, progress_interval_s=1.0, per_rank_limit=4) as log:
        for tick in range(10):
            ranks = [
                view(i, 0, RankState.TRAINING, 10 * tick + i, 1.0 / (tick + 1), steps_per_s=5.0 + i) for i in range(6)
            ]
            log.observe(snap(0, ranks, tick))
            clock.now += 1
    page = render_html(tmp_path).read_text(encoding="utf-8")
    data = report_data(page)
    agg = data["aggregate"]
    assert len(agg["t"]) == 10
    assert agg["steps_per_s_min"][0] == 5.0 and agg["steps_per_s_max"][0] == 10.0
    assert {s["rank"] for s in data["series"]} == set(range(6))  # the slowest 8 (here all)
    assert "median over ranks" in page


def test_a_large_world_plots_its_persistently_slow_ranks_not_the_noise(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    world, slow = 20, 7
    with EventLog(tmp_path / "events.jsonl", clock=clock, progress_interval_s=1.0, per_rank_limit=4) as log:
        for tick in range(40):
            # every sample, a different set of ranks is a little slow; rank 7 always is
            noise = {(tick * 3 + k) % world for k in range(2)}
            ranks = [
                view(i, 0, RankState.TRAINING, 10 * tick, 1.0, steps_per_s=1.0 if i == slow else 5.0 - (i in noise))
                for i in range(world)
            ]
            log.observe(snap(0, ranks, tick))
            clock.now += 1
    data = load_report_data(tmp_path)
    assert data["plotted_ranks"] == [slow]
    assert len({s["rank"] for s in data["series"]}) > 8  # the noise is in the data, not in the charts
    assert data["ranks"][0]["rank"] == slow and len(data["ranks"]) == 8
    noisy = next(s for s in data["series"] if s["rank"] == world - 1)  # only sampled when noisy
    assert noisy["points"] >= 2 and not any(noisy["follows"])  # not joined across the gaps
    page = render_html(tmp_path).read_text(encoding="utf-8")
    assert 'data-label="rank 7"' in page and 'data-label="rank 0"' not in page
    assert "step min/median/max 390/390/390" in page


def test_long_series_are_thinned(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_data_module, "MAX_POINTS", 50)
    data = load_report_data(run_dir)
    s = data["series"][0]
    assert s["thinned"] and s["points"] > 50
    assert len(s["t"]) == len(s["loss"]) == 50
    assert s["t"][0] == 0.5 and s["t"][-1] == pytest.approx(data["duration_s"], abs=1.0)


def table_rows(page: str, heading: str) -> list[list[str]]:
    """The cells of the table under <h2>heading</h2>, one list per row (the header left out)."""
    section = page.split(f"<h2>{heading}</h2>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", section, re.S)
    return [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)] for row in rows[1:]]


def train(run: FakeRun, seconds: float, *, start: int = 0) -> int:
    """Every rank steps once per 0.25 s, observed each time; returns the last step."""
    step = start
    for _ in range(round(seconds * 4)):
        run.advance(0.25)
        step += 1
        run.heartbeat_all(optimizer_steps=step, loss=1.0 / step)
        run.observe()
    return step


def test_only_the_rank_that_failed_counts_a_failure(tmp_path: Path) -> None:
    """Rank 2 fails; the launcher then kills the others: they are "stopped", and the ranks
    table counts no failure for them."""
    with FakeRun(tmp_path / "events.jsonl", nproc=4, progress_interval_s=1.0) as run:
        emit_run_start(run, world=4)
        run.advance(0.5)
        run.register_all()
        step = train(run, 5.0)
        run.exit(2, 1)
        run.observe()  # the tick that sees it
        run.advance(0.1)
        run.stop()
        for r in (0, 1, 3):
            run.exit(r, -9)
        run.advance(0.1)
        run.observe()
        emit_run_end(run, "failed", 1, step)
    states = {
        e["rank"]: (e["state"], e["exit"]) for e in read_events(tmp_path / "events.jsonl") if e["event"] == "state"
    }
    assert states == {
        0: ("stopped", "signal SIGKILL"),
        1: ("stopped", "signal SIGKILL"),
        2: ("failed", "exit code 1"),
        3: ("stopped", "signal SIGKILL"),
    }
    data = load_report_data(tmp_path)
    assert {r["rank"]: (r["state"], r["failures"]) for r in data["ranks"]} == {
        0: ("stopped", 0),
        1: ("stopped", 0),
        2: ("failed", 1),
        3: ("stopped", 0),
    }
    assert [(m["kind"], m["label"]) for m in data["markers"]] == [("failure", "rank 2 failed (exit code 1)")]
    page = render_html(tmp_path).read_text(encoding="utf-8")
    rows = table_rows(page, "Ranks")
    header = ["rank", "node", "host", "state", "final step", "median steps/s", "last loss", "restarts", "failures"]
    failures, state = header.index("failures"), header.index("state")
    assert [(row[0], row[state], row[failures]) for row in rows] == [
        ("0", "stopped", "0"),
        ("1", "stopped", "0"),
        ("2", "failed", "1"),
        ("3", "stopped", "0"),
    ]


@pytest.mark.parametrize("codes", [(130, -2), (-2, -2)])
def test_ctrl_c_is_marked_interrupted_not_failed(tmp_path: Path, codes: tuple[int, int]) -> None:
    with FakeRun(tmp_path / "events.jsonl", progress_interval_s=1.0) as run:
        emit_run_start(run, world=2)
        run.advance(0.5)
        run.register_all()
        step = train(run, 5.0)
        run.stop(interrupted=True)  # the launcher got SIGINT and forwards it
        run.advance(0.3)
        run.exit(0, codes[0])
        run.exit(1, codes[1])
        run.observe()
        emit_run_end(run, "interrupted", 130, step)
    events = read_events(tmp_path / "events.jsonl")
    assert [(e["rank"], e["state"]) for e in events if e["event"] == "state"] == [
        (0, "interrupted"),
        (1, "interrupted"),
    ]
    data = load_report_data(tmp_path)
    [marker] = data["markers"]
    assert (marker["kind"], marker["generation"], marker["t"]) == ("interrupted", 0, 5.8)
    assert {r["rank"]: (r["state"], r["failures"]) for r in data["ranks"]} == {
        0: ("interrupted", 0),
        1: ("interrupted", 0),
    }
    page = render_html(tmp_path).read_text(encoding="utf-8")
    timeline = table_rows(page, "Timeline")
    assert [row[1] for row in timeline] == ["interrupted"]
    assert 'class="marker interrupted"' in page and 'class="marker failure"' not in page


@pytest.mark.parametrize("optimizer", [True, False], ids=["optimizer", "reported-only"])
def test_a_resume_from_a_checkpoint_does_not_spike_the_step_rate(tmp_path: Path, optimizer: bool) -> None:
    """The script's step jumps from nothing to 5000 (a checkpoint) and then advances at 10
    steps/s: the step-rate chart shows 10, never the jump."""
    with FakeRun(tmp_path / "events.jsonl", progress_interval_s=1.0) as run:
        emit_run_start(run, world=2)
        last = resume_from_checkpoint(run, optimizer=optimizer)
        emit_run_end(run, "succeeded", 0, last)
    data = load_report_data(tmp_path)
    for s in data["series"]:
        rates = [x for x in s["steps_per_s"] if x is not None]
        assert len(rates) >= 10
        assert max(rates) <= 10.5, rates
        assert rates[-1] == pytest.approx(10.0, rel=0.05)
        assert s["step"][-1] == last
    assert [r["median_steps_per_s"] for r in data["ranks"]] == [pytest.approx(10.0, rel=0.05)] * 2
    page = render_html(tmp_path).read_text(encoding="utf-8")
    rate_chart = page.split('aria-label="Step rate"', 1)[1].split("</svg>", 1)[0]
    ticks = [float(t) for t in re.findall(r'<text class="tick" x="64" [^>]*>([0-9.e+]+)</text>', rate_chart)]
    assert ticks and max(ticks) <= 12  # the axis is scaled to the real rate, not to a spike


def test_nice_ticks() -> None:
    assert nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(0.13, 0.91) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(3, 3) == [3]
    assert nice_ticks(0, 57.3) == [0, 20, 40, 60]
    assert nice_ticks(-3, 2) == [-3, -2, -1, 0, 1, 2]
    assert len(nice_ticks(1e20, 1e20 + 1e4)) <= 21  # float steps that do not move: still ends


def test_png_report(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "png"
    paths = render_png(run_dir, out_dir)
    assert [p.name for p in paths] == ["report-loss.png", "report-step-rate.png", "report-step.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 5000
    assert [p.parent for p in render_png(run_dir)] == [run_dir] * 3


def test_png_report_of_a_run_id_that_looks_like_mathtext(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    write_fake_run(tmp_path, run_id="cost $x^2$ {a_b} $", finished=False)
    assert len(render_png(tmp_path)) == 3


def test_png_without_matplotlib_is_a_clear_error(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ConfigError, match=r"pip install 'ddp-launch\[report\]'"):
        render_png(run_dir)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "/usr/bin/chromium"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(_chromium() is None, reason="no chromium for a headless render")
@pytest.mark.timeout(120)
def test_headless_browser_renders_the_page_offline(run_dir: Path, tmp_path: Path) -> None:
    page = render_html(run_dir)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # any network access would fail
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1000,1600",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        check=True,
        timeout=90,
        capture_output=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000  # a blank page compresses to much less


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_keys = st.sampled_from(
    ["t", "generation", "rank", "ranks", "slowest", "aggregate", "report", "config", "state", "steps_per_s", "step"]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    events=st.lists(
        st.fixed_dictionaries(
            {"event": st.sampled_from([*EVENT_KINDS, "other"])}, optional={"v": st.sampled_from([1, 2])}
        ).flatmap(lambda base: st.dictionaries(_keys, _json_values, max_size=5).map(lambda d: {**d, **base})),
        max_size=12,
    )
)
def test_a_damaged_or_foreign_file_still_renders(tmp_path_factory, events) -> None:
    d = tmp_path_factory.mktemp("run")
    (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + "not json\n")
    page = render_html(d).read_text(encoding="utf-8")
    data = report_data(page)
    assert isinstance(data["series"], list)
    block = re.search(r'id="report-data">(.*?)</script>', page, re.S)
    assert block

    def strict(name: str) -> None:  # what a browser's JSON.parse accepts: no NaN, no Infinity
        raise AssertionError(f"{name} in the data block")

    json.loads(block.group(1), parse_constant=strict)

"""The live view, rendered to an io.StringIO from hand-built snapshots, with a fake clock."""

from __future__ import annotations

import io
import re
import threading

import pytest
import tqdm

from ddp_launch.observe.format import format_rate
from ddp_launch.observe.view import LiveView, format_resize_line, format_summary
from ddp_launch.record import RankRecord, RankState
from ddp_launch.registry import RunSnapshot
from tests.fakes import FakeClock

ANSI = "\x1b"
CLOCK_START = 100.0


def rank(i: int, **kw: object) -> RankRecord:
    """A training rank; `step` is the step its script reported (`optimizer_steps` apart)."""
    fields: dict[str, object] = {
        "rank": i,
        "node_rank": 0,
        "local_rank": i,
        "state": RankState.TRAINING,
        "generation": 0,
        "pid": 1000 + i,
        "hostname": "host",
        "reported_step": 120,
        "optimizer_steps": 120,
        "samples": 120 * 32,
        "steps_per_s": 43.1,
        "loss": 0.231,
        "metrics": {},
        "rss_bytes": 312_000_000,
        "cpu_percent": 98.0,
        "heartbeat_age_s": 0.5,
        "exit_code": None,
        "exception_type": "",
        "traceback": "",
    }
    if "step" in kw:
        kw["reported_step"] = kw.pop("step")
    fields.update(kw)
    return RankRecord(**fields)  # type: ignore[arg-type]


def snapshot(world: int = 4, *, ranks: list[RankRecord] | None = None, **kw: object) -> RunSnapshot:
    fields: dict[str, object] = {
        "run_id": "run-1",
        "world_size": world,
        "generation": 0,
        "max_restarts": 3,
        "elapsed_s": 10.0,
        "total_steps": 300,
        "barrier_open": True,
        "ranks": tuple(ranks if ranks is not None else [rank(i) for i in range(world)]),
    }
    fields.update(kw)
    # Without an elastic change of nodes, every generation after the first is a restart.
    fields.setdefault("restarts", fields["generation"])
    return RunSnapshot(**fields)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_leaked_bars():
    yield
    leaked = list(tqdm.tqdm._instances)
    for bar in leaked:
        bar.close()
    assert not leaked, f"tqdm bars left open: {leaked}"


def lines_of(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


# -- non-interactive ----------------------------------------------------------------------


def test_plain_line_has_step_total_rate_loss_and_no_escape_codes():
    out = io.StringIO()
    view = LiveView(out, interactive=False, clock=FakeClock(CLOCK_START))
    view.update(snapshot())
    view.close()

    (line,) = lines_of(out)
    assert line.startswith("[ddp-launch] step 120/300 (40%)")
    assert "43.1 it/s" in line
    assert "loss 0.231" in line
    assert "4/4 training" in line
    assert "gen 0" in line
    assert ANSI not in out.getvalue()


def test_plain_line_rate_and_eta_are_the_median_of_the_ranks_rates():
    # The world's rate is what status shows per rank, not a rate of its own: one number.
    out = io.StringIO()
    view = LiveView(out, interactive=False, clock=FakeClock(CLOCK_START), plain_interval_s=5.0)
    rates = [18.0, 20.0, 22.0, 5.0, 30.0]
    view.update(snapshot(ranks=[rank(i, step=200, steps_per_s=r) for i, r in enumerate(rates)], world=5))
    view.close()

    # median 20 it/s, 100 steps left: 5 s
    assert "20.0 it/s" in lines_of(out)[-1]
    assert "eta 5s" in lines_of(out)[-1]


def test_a_resume_to_a_checkpoints_step_is_no_rate():
    # The script reports step 5000 right after loading its checkpoint: the ranks' rates (the
    # registry's, over consecutive heartbeats of one source) stay the real ones, and the view
    # shows them, not 5000 steps in one snapshot interval.
    out = io.StringIO()
    view = LiveView(out, interactive=False, clock=FakeClock(CLOCK_START), plain_interval_s=0.0)
    view.update(
        snapshot(
            total_steps=0, ranks=[rank(i, step=None, optimizer_steps=0, steps_per_s=0.0) for i in range(2)], world=2
        )
    )
    view.update(
        snapshot(
            total_steps=0,
            ranks=[rank(i, step=5000, optimizer_steps=2, steps_per_s=10.0) for i in range(2)],
            world=2,
            elapsed_s=11.0,
        )
    )
    view.close()
    assert "| 10.0 it/s |" in lines_of(out)[-1]


def test_without_a_reported_step_the_view_says_optimizer_steps():
    out = io.StringIO()
    view = LiveView(out, interactive=False, clock=FakeClock(CLOCK_START))
    view.update(snapshot(total_steps=0, ranks=[rank(i, step=None, optimizer_steps=7) for i in range(2)], world=2))
    view.close()
    assert lines_of(out)[-1].startswith("[ddp-launch] opt step 7 |")


def test_plain_line_without_total_or_loss():
    out = io.StringIO()
    view = LiveView(out, interactive=False, clock=FakeClock(CLOCK_START))
    view.update(snapshot(total_steps=0, ranks=[rank(i, loss=None) for i in range(4)]))
    view.close()

    (line,) = lines_of(out)
    assert line.startswith("[ddp-launch] step 120 |")
    assert "eta" not in line and "loss" not in line


def test_plain_respects_interval_by_the_clock():
    out = io.StringIO()
    clock = FakeClock(CLOCK_START)
    view = LiveView(out, interactive=False, plain_interval_s=5.0, clock=clock)

    view.update(snapshot())
    clock.now += 1.0
    view.update(snapshot(ranks=[rank(i, step=150) for i in range(4)]))
    clock.now += 3.9
    view.update(snapshot(ranks=[rank(i, step=160) for i in range(4)]))
    assert len(lines_of(out)) == 1

    clock.now += 0.1
    view.update(snapshot(ranks=[rank(i, step=170) for i in range(4)]))
    view.close()
    assert len(lines_of(out)) == 2
    assert "step 170/300" in lines_of(out)[1]


def test_plain_prints_at_once_when_rank_states_change():
    out = io.StringIO()
    clock = FakeClock(CLOCK_START)
    view = LiveView(out, interactive=False, plain_interval_s=5.0, clock=clock)

    view.update(snapshot(ranks=[rank(i, state=RankState.WAITING, step=0) for i in range(4)]))
    clock.now += 0.5
    view.update(snapshot(ranks=[rank(i, step=0) for i in range(4)]))  # barrier opened
    clock.now += 0.5
    view.update(snapshot())  # same states: nothing
    clock.now += 0.5
    failed = [rank(i) for i in range(4)]
    failed[2] = rank(2, state=RankState.FAILED, exit_code=1, exception_type="ValueError")
    view.update(snapshot(ranks=failed))
    view.close()

    lines = lines_of(out)
    assert len(lines) == 3
    assert "4/4 waiting" in lines[0]
    assert "4/4 training" in lines[1]
    assert "3 training, 1 failed (rank 2)" in lines[2]


def test_plain_prints_on_new_generation():
    out = io.StringIO()
    clock = FakeClock(CLOCK_START)
    view = LiveView(out, interactive=False, clock=clock)
    view.update(snapshot())
    clock.now += 0.5
    view.update(snapshot(generation=1, ranks=[rank(i, generation=1, step=100) for i in range(4)]))
    view.close()

    assert len(lines_of(out)) == 2
    assert "gen 1 (restart 1/3)" in lines_of(out)[1]


def test_write_line_is_verbatim_in_both_modes():
    for interactive in (False, True):
        out = io.StringIO()
        view = LiveView(out, interactive=interactive, clock=FakeClock(CLOCK_START))
        view.update(snapshot())
        view.write_line("[rank 1] epoch 3: {acc: 0.9} 100%")
        view.close()
        assert "[rank 1] epoch 3: {acc: 0.9} 100%\n" in out.getvalue()


def test_write_line_does_not_double_a_trailing_newline():
    out = io.StringIO()
    view = LiveView(out, interactive=False)
    view.write_line("hello\n")
    assert out.getvalue() == "hello\n"


def test_write_line_from_threads_during_updates_keeps_lines_whole():
    out = io.StringIO()
    view = LiveView(out, interactive=True, clock=FakeClock(CLOCK_START))
    view.update(snapshot())

    def pump(rank_id: int) -> None:
        for k in range(50):
            view.write_line(f"[rank {rank_id}] line {k}")

    threads = [threading.Thread(target=pump, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for step in range(50):
        view.update(snapshot(ranks=[rank(i, step=step) for i in range(4)]))
    for t in threads:
        t.join(timeout=10)
    view.close()

    text = out.getvalue()
    for i in range(4):
        for k in range(50):
            assert f"[rank {i}] line {k}\n" in text


class CountingIO(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_write_lines_prefixes_every_line_in_one_write():
    out = CountingIO()
    view = LiveView(out, interactive=False)
    view.write_lines([f"line {i}" for i in range(1000)] + [""], prefix="[rank 3] ")
    view.write_lines([])

    assert out.getvalue().splitlines() == [f"[rank 3] line {i}" for i in range(1000)] + ["[rank 3] "]
    assert (out.writes, out.flushes) == (1, 1)


def test_write_lines_on_a_terminal_redraws_the_bars_once_per_batch():
    out = io.StringIO()
    view = LiveView(out, interactive=True, clock=FakeClock(CLOCK_START))
    view.update(snapshot(2))
    before = out.getvalue().count("120/300")
    view.write_lines([f"line {i}" for i in range(100)], prefix="[rank 0] ")
    text = out.getvalue()
    view.close()

    assert text.count("120/300") == before + 1
    for i in range(100):
        assert f"[rank 0] line {i}\n" in text


def test_a_workers_unfinished_line_is_drawn_below_the_bars_replaced_and_removed():
    out = io.StringIO()
    view = LiveView(out, interactive=True, clock=FakeClock(CLOCK_START))
    view.update(snapshot(2))  # the overall bar and two rank lines: positions 0-2

    view.write_live((0, True), "[rank 0]  10%|#")
    assert "[rank 0]  10%|#" in out.getvalue()
    view.write_live((1, False), "[rank 1] (Pdb) ")
    assert "[rank 1] (Pdb) " in out.getvalue()
    assert sorted(abs(bar.pos) for bar in tqdm.tqdm._instances) == [0, 1, 2, 3, 4]
    view.write_live((0, True), "[rank 0]  20%|##")  # redrawn in place: no new line
    assert "[rank 0]  20%|##" in out.getvalue()
    assert len(tqdm.tqdm._instances) == 5

    view.write_live((0, True), None)  # its line is complete
    view.write_live((0, True), None)  # twice is nothing
    lines = {abs(bar.pos): bar for bar in tqdm.tqdm._instances}
    assert sorted(lines) == [0, 1, 2, 3] and "(Pdb)" in str(lines[3])
    view.close()
    view.write_live((1, False), "[rank 1] after the end")  # ignored
    assert "after the end" not in out.getvalue()


def test_an_unfinished_line_drawn_before_the_bars_moves_below_them():
    out = io.StringIO()
    view = LiveView(out, interactive=True, clock=FakeClock(CLOCK_START))
    view.write_live((0, False), "[rank 0] loading")
    assert [abs(bar.pos) for bar in tqdm.tqdm._instances] == [0]

    view.update(snapshot(2))
    lines = {abs(bar.pos): bar for bar in tqdm.tqdm._instances}
    assert sorted(lines) == [0, 1, 2, 3] and "loading" in str(lines[3])
    view.update(snapshot(16))  # one aggregate line now
    lines = {abs(bar.pos): bar for bar in tqdm.tqdm._instances}
    assert sorted(lines) == [0, 1, 2] and "loading" in str(lines[2])
    view.close()


def test_unfinished_lines_are_drawn_for_at_most_per_rank_limit_workers():
    out = io.StringIO()
    view = LiveView(out, interactive=True, per_rank_limit=2, clock=FakeClock(CLOCK_START))
    for r in range(5):
        view.write_live((r, True), f"[rank {r}] bar")
    assert sorted(abs(bar.pos) for bar in tqdm.tqdm._instances) == [0, 1]
    view.write_live((2, True), "[rank 2] bar 50%")  # kept, not drawn
    assert "[rank 2]" not in out.getvalue()

    view.write_live((0, True), None)  # the next one moves up, as it stands now
    assert "[rank 2] bar 50%" in out.getvalue()
    view.close()


def test_an_unfinished_line_off_a_terminal_is_a_line_of_its_own():
    out, err = io.StringIO(), io.StringIO()
    view = LiveView(err, interactive=False)
    view.write_live((0, False), "[rank 0] 50%", file=out)
    view.write_live((0, False), None, file=out)

    assert out.getvalue() == "[rank 0] 50%\n"
    assert err.getvalue() == ""
    assert not tqdm.tqdm._instances


# -- interactive --------------------------------------------------------------------------


def test_interactive_draws_a_line_per_rank_for_small_worlds():
    out = io.StringIO()
    view = LiveView(out, interactive=True, clock=FakeClock(CLOCK_START))
    view.update(snapshot(ranks=[rank(i, step=120 + i) for i in range(4)]))
    text = out.getvalue()
    view.close()

    for i in range(4):
        assert f"rank {i}  step {120 + i}" in text
    assert "43.1 it/s  loss 0.231  rss 312 MB  cpu 98%  training" in text
    assert "120/300" in text
    assert "ranks 4:" not in text


def test_rank_lines_show_failures_and_silent_ranks():
    out = io.StringIO()
    ranks = [rank(i) for i in range(3)]
    ranks[1] = rank(1, state=RankState.FAILED, exit_code=1, exception_type="ValueError")
    ranks[2] = rank(2, heartbeat_age_s=7.0)
    view = LiveView(out, interactive=True, clock=FakeClock(CLOCK_START))
    view.update(snapshot(3, ranks=ranks))
    text = out.getvalue()
    view.close()

    assert "failed (exit 1, ValueError)" in text
    assert "training, no heartbeat for 7s" in text
    assert "2 training, 1 failed (rank 1)" in text  # on the overall bar


def test_interactive_aggregate_line_names_slowest_rank_for_large_worlds():
    out = io.StringIO()
    ranks = [rank(i, steps_per_s=43.0 + i / 100) for i in range(16)]
    ranks[11] = rank(11, step=118, steps_per_s=40.1)
    view = LiveView(out, interactive=True, per_rank_limit=8, clock=FakeClock(CLOCK_START))
    view.update(snapshot(16, ranks=ranks))
    text = out.getvalue()
    view.close()

    assert "ranks 16: step min/median/max 118/120/120" in text
    assert "it/s min/median/max 40.1/" in text
    assert "slowest rank 11" in text
    assert "rank 0  step" not in text


def test_interactive_rebuilds_lines_when_world_size_changes():
    out = io.StringIO()
    view = LiveView(out, interactive=True, per_rank_limit=8, clock=FakeClock(CLOCK_START))
    view.update(snapshot(2))
    assert len(tqdm.tqdm._instances) == 3
    view.update(snapshot(16))
    assert len(tqdm.tqdm._instances) == 2  # overall bar + aggregate line
    view.update(snapshot(4))
    assert len(tqdm.tqdm._instances) == 5
    view.close()


def test_interactive_bar_without_total_and_with_restarts():
    out = io.StringIO()
    view = LiveView(out, interactive=True, clock=FakeClock(CLOCK_START))
    view.update(snapshot(total_steps=0, generation=2))
    text = out.getvalue()
    assert "ddp-launch step 120 [" in text
    assert "restart 2/3" in text
    view.update(snapshot(total_steps=240, generation=2))
    assert " 50%|" in out.getvalue()
    view.close()


def test_a_generation_after_an_elastic_resize_uses_no_restart():
    out = io.StringIO()
    view = LiveView(out, interactive=False, clock=FakeClock(CLOCK_START))
    view.update(snapshot(generation=2, restarts=1))
    view.update(snapshot(generation=3, restarts=1, ranks=[rank(i, generation=3, step=100) for i in range(4)]))
    text = out.getvalue()
    assert "gen 3 (restart 1/3)" in text
    view.close()
    assert format_resize_line("1 node(s) joined (h2)", 3, 3, 6) == (
        "[ddp-launch] 1 node(s) joined (h2); generation 3 runs 3 node(s) (6 ranks), no restart used"
    )


def test_close_is_idempotent_and_leaves_no_bars():
    out = io.StringIO()
    view = LiveView(out, interactive=True, clock=FakeClock(CLOCK_START))
    view.update(snapshot())
    assert tqdm.tqdm._instances
    view.close()
    view.close()
    assert not tqdm.tqdm._instances
    view.update(snapshot())  # after close: ignored, no new bars
    assert not tqdm.tqdm._instances


def test_disabled_view_draws_nothing_but_prints_lines():
    for interactive in (False, True):
        out = io.StringIO()
        view = LiveView(out, interactive=interactive, enabled=False, clock=FakeClock(CLOCK_START))
        view.update(snapshot())
        assert out.getvalue() == ""
        view.write_line("worker says hi")
        view.close()
        assert out.getvalue() == "worker says hi\n"
        assert not tqdm.tqdm._instances


def test_interactive_none_follows_isatty():
    assert LiveView(io.StringIO()).interactive is False


# -- summary and formatting ---------------------------------------------------------------


def test_summary_names_slowest_rank_and_totals():
    ranks = [rank(i, state=RankState.DONE, step=300, samples=9600, steps_per_s=40.0 + i, exit_code=0) for i in range(4)]
    ranks[2] = rank(2, state=RankState.DONE, step=300, samples=9600, steps_per_s=31.5, exit_code=0)
    text = format_summary(snapshot(ranks=ranks), wall_s=12.0, restarts=0)

    assert "slowest rank 2 (31.5 it/s)" in text
    assert "min/median/max 31.5/" in text
    assert "300/300" in text
    assert "4/4 done" in text
    # Each rank reports the world's count (report()'s contract): 9600 samples / 12 s, not 4x.
    assert "samples/s  800.0 (9600 samples)" in text
    assert "restarts   0" in text
    # The mean of what each rank last passed to report(loss=...), and it says so: not the
    # script's own final loss.
    assert "loss       0.231 (each rank's last report(loss=...), mean over 4 ranks)" in text
    assert ANSI not in text


def test_summary_of_a_resumed_unmodified_script_names_optimizer_steps_per_generation():
    # A Hugging Face run resumed at step 10 of 20, with no report(step=...): the workers of
    # generation 1 counted 10 optimizer steps. The summary must not call that "step 10".
    ranks = [rank(i, state=RankState.DONE, step=None, optimizer_steps=10, exit_code=0) for i in range(2)]
    text = format_summary(
        snapshot(2, ranks=ranks, generation=1, total_steps=0), wall_s=9.0, restarts=1, optimizer_steps_all=20
    )
    (line,) = [line for line in text.splitlines() if line.startswith("  step  ")]
    assert line == "  step       10 optimizer steps in generation 1, 20 in all 2 generations"


def test_summary_with_a_reported_step_shows_it_beside_the_optimizer_steps():
    ranks = [rank(i, state=RankState.DONE, step=400, optimizer_steps=381, exit_code=0) for i in range(2)]
    text = format_summary(
        snapshot(2, ranks=ranks, generation=1, total_steps=400), wall_s=9.0, restarts=1, optimizer_steps_all=400
    )
    assert (
        "  step       400/400 (the script's step); 381 optimizer steps in generation 1, 400 in all 2 generations"
        in text
    )


def test_summary_of_ranks_that_disagree_gives_the_range_not_a_zero_beside_a_rate():
    ranks = [rank(0, state=RankState.FAILED, step=None, optimizer_steps=0, steps_per_s=0.0, exit_code=1)]
    ranks.append(rank(1, state=RankState.STOPPED, step=None, optimizer_steps=95, steps_per_s=47.4, exit_code=-15))
    text = format_summary(snapshot(2, ranks=ranks, total_steps=0), wall_s=3.0, restarts=0)
    assert "  step       0-95 (by rank) optimizer steps" in text
    assert "1 failed (rank 0), 1 stopped" in text


def test_restart_line_names_the_rank_how_it_died_the_step_and_the_generation():
    from ddp_launch.observe.view import format_restart_line

    root = rank(2, state=RankState.FAILED, step=347, exit_code=-9)
    assert format_restart_line(root, "rank 2 failed (signal SIGKILL)", 1, 3) == (
        "[ddp-launch] rank 2 died (signal SIGKILL) at step 347; restarting as generation 1 (restart 1/3)"
    )
    root = rank(0, state=RankState.FAILED, step=None, optimizer_steps=12, exit_code=1, exception_type="RuntimeError")
    assert format_restart_line(root, "x", 2, 2) == (
        "[ddp-launch] rank 0 failed (exit code 1, RuntimeError) at optimizer step 12; "
        "restarting as generation 2 (restart 2/2)"
    )
    hung = rank(1, state=RankState.HUNG, step=50)
    assert format_restart_line(hung, "rank 1 hung: no heartbeat for 31 s", 1, 1) == (
        "[ddp-launch] rank 1 hung: no heartbeat for 31 s at step 50; restarting as generation 1 (restart 1/1)"
    )


def test_summary_after_restarts_does_not_claim_a_samples_rate():
    text = format_summary(snapshot(generation=1), wall_s=12.0, restarts=1)
    assert "samples/s" not in text
    assert re.search(r"restarts +1", text)


def test_summary_without_rates_or_loss():
    ranks = [rank(i, steps_per_s=0.0, loss=None, samples=0) for i in range(2)]
    text = format_summary(snapshot(2, ranks=ranks, total_steps=0), wall_s=1.0, restarts=0)
    assert "unknown" in text
    assert "loss" not in text and "samples" not in text


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (43.12, "43.1 it/s"),
        (1234.5, "1234 it/s"),
        (0.52, "0.52 it/s"),
        (0.05, "20.0 s/it"),
        (0.0, "0.0 it/s"),
    ],
)
def test_format_rate(rate, text):
    assert format_rate(rate) == text


def test_format_rate_unknown():
    assert format_rate(float("nan")) == "? it/s"
    assert format_rate(-1.0) == "? it/s"


def test_optimizer_steps_are_never_shown_out_of_the_scripts_total():
    # After a resume at step 30 of 160 and before the script reports a step, the view knows
    # only this generation's optimizer steps: "opt step 0/160 (0%)" would mix two units.
    out = io.StringIO()
    view = LiveView(out, interactive=False, clock=FakeClock(CLOCK_START))
    ranks = [rank(i, step=None, optimizer_steps=0, steps_per_s=10.0) for i in range(2)]
    view.update(snapshot(2, ranks=ranks, total_steps=160, generation=1))
    view.close()
    line = lines_of(out)[-1]
    assert line.startswith("[ddp-launch] opt step 0 |")
    assert "/160" not in line and "eta" not in line


def test_an_interrupted_run_shows_no_eta():
    out = io.StringIO()
    view = LiveView(out, interactive=False, clock=FakeClock(CLOCK_START))
    ranks = [rank(i, step=100, state=RankState.INTERRUPTED, exit_code=130) for i in range(2)]
    view.update(snapshot(2, ranks=ranks, total_steps=300))
    view.close()
    line = lines_of(out)[-1]
    assert "2/2 interrupted" in line and "eta" not in line


def test_run_end_summary_and_console_summary_use_one_rule_for_rates():
    from ddp_launch.launcher import _summary_fields
    from ddp_launch.run.result import GenerationResult, Outcome, RunResult

    # A rank with fewer than two heartbeats has no rate: it is neither the minimum nor the slowest.
    ranks = [rank(0, steps_per_s=0.0), rank(1, steps_per_s=5.0), rank(2, steps_per_s=4.0)]
    snap = snapshot(3, ranks=ranks)
    fields = _summary_fields(snap, RunResult(Outcome.SUCCEEDED, [GenerationResult(0, Outcome.SUCCEEDED)], 1.0))
    text = format_summary(snap, wall_s=1.0, restarts=0)
    assert fields["steps_per_s"] == {"min": 4.0, "median": 4.5, "max": 5.0}
    assert fields["slowest_rank"] == 2
    assert "min/median/max 4.0/4.5/5.0 it/s (recent), slowest rank 2 (4.0 it/s)" in text

"""The fault soak's bookkeeping (benchmarks/soak.py): steps redone per restart, from the
ranks' records; the fault plans stay within the restart budget; the counts by kind."""

from __future__ import annotations

import random
from pathlib import Path

from benchmarks import soak


def record(where: Path, generation: int, rank: int, pid: int, steps: list[int]) -> None:
    lines = [f"pid {pid}", *map(str, steps)]
    (where / f"steps-gen{generation}-rank{rank}").write_text("\n".join(lines) + "\n")


def test_steps_redone_compare_a_generation_with_the_next_one_that_trained(tmp_path):
    run = soak.Run(0, ["during-restart"], tmp_path)
    run.records.mkdir()
    for rank in range(soak.NPROC):
        record(run.records, 0, rank, 100 + rank, list(range(1, 58 if rank else 57)))  # rank 0 one behind
        record(run.records, 1, rank, 200 + rank, [])  # killed while it started: never trained
        record(run.records, 2, rank, 300 + rank, list(range(57, 201)))  # resumed from step 56
    assert run.generations() == [0, 1, 2]
    assert run.redone() == [1]  # step 57 was done in generation 0 (ranks 1-3), then again
    assert run.pid(2, 3) == 303 and run.final_step() == 200
    assert not run.trained(1) and run.trained(2)


def test_two_faults_of_a_run_never_need_more_than_the_restarts_it_has():
    rng = random.Random(1)
    plans = [soak.plan(i, rng) for i in range(400)]
    assert {p[0] for p in plans} == set(soak.KINDS)  # every kind comes first, in turn
    for p in plans:
        assert sum(soak.KINDS[k] for k in p) <= soak.MAX_RESTARTS
        assert all(k not in soak.ENDS_THE_RUN for k in p[:-1])  # nothing after the launcher's end
    assert any(len(p) == 2 for p in plans) and any(len(p) == 1 for p in plans)


def test_the_summary_counts_each_kind_in_the_runs_it_appears_in():
    runs = [
        {"faults": ["worker-sigkill"], "ok": True, "wedged": False, "left_behind": 0, "redone_per_restart": [0]},
        {"faults": ["worker-sigkill", "two-workers"], "ok": False, "wedged": True, "left_behind": 2,
         "redone_per_restart": [1, 0]},
    ]  # fmt: skip
    s = soak.summarise(runs)
    assert (s["runs"], s["ok"], s["wedged"], s["runs_leaving_processes"], s["faults"]) == (2, 1, 1, 1, 3)
    assert s["by_kind"]["worker-sigkill"] == {"runs": 2, "ok": 1, "wedged": 1, "left_behind": 1, "max_redone": 1}
    assert s["by_kind"]["launcher-sigint"] == {}

"""The status table reads its figures as the live view does, and the README's set-up gives
`report --png` what it needs."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from ddp_launch.observe.format import format_bytes
from ddp_launch.observe.status import format_table
from ddp_launch.observe.view import format_rank_line
from ddp_launch.record import RankRecord, RankState, rank_json

ROOT = Path(__file__).resolve().parents[2]


def record(**kw: object) -> RankRecord:
    fields: dict[str, object] = dict(
        rank=0, node_rank=0, local_rank=0, generation=1, state=RankState.TRAINING, pid=4242, hostname="h0"
    )
    fields.update(kw)
    return RankRecord(**fields)  # type: ignore[arg-type]


def status_of(*ranks: RankRecord) -> dict:
    return {
        "run_id": "r",
        "world_size": len(ranks),
        "generation": 1,
        "restarts": 1,
        "max_restarts": 3,
        "elapsed_s": 12.0,
        "total_steps": 0,
        "ranks": [rank_json(r) for r in ranks],
    }


def test_status_prints_memory_in_the_live_views_decimal_megabytes() -> None:
    # 298 MB is 284 MiB: the table once printed "284 MB" beside the view's "298 MB".
    r = record(rss_bytes=298_000_000, optimizer_steps=7, steps_per_s=3.0)
    table = format_table(status_of(r))
    assert format_bytes(r.rss_bytes) == "298 MB"
    assert "298 MB" in table and "284" not in table
    assert "rss 298 MB" in format_rank_line(r)


def test_status_names_the_two_steps_and_how_a_rank_ended() -> None:
    table = format_table(
        status_of(
            record(rank=0, optimizer_steps=12, reported_step=None, state=RankState.STOPPED, exit_code=-15),
            record(rank=1, optimizer_steps=12, reported_step=512, state=RankState.FAILED, exit_code=-9),
        )
    )
    head, row0, row1 = table.splitlines()[1:]
    assert re.search(r"\bstep\s+opt steps\b", head)
    assert re.search(r"stopped \(signal SIGTERM\)\s+1\s+-\s+12\b", row0)
    assert re.search(r"failed \(signal SIGKILL\)\s+1\s+512\s+12\b", row1)


def test_the_readme_set_up_installs_what_report_png_needs() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert "matplotlib" in config["options.extras_require"]["report"]
    readme = (ROOT / "README.md").read_text()
    set_up = readme.split("## Set up and run the example", 1)[1].split("##", 1)[0]
    assert "pip install -e '.[report]'" in set_up

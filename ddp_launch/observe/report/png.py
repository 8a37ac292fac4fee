"""`render_png`: the report's charts as PNG images, drawn with matplotlib (an optional
extra, imported only inside the function)."""

from __future__ import annotations

from pathlib import Path

from ddp_launch import rundir
from ddp_launch.errors import ConfigError
from ddp_launch.observe.report.data import load_report_data
from ddp_launch.observe.report.svg import CHARTS, LEGEND_LIMIT, MARKER_COLORS, _lines_for


def render_png(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the report's charts as PNG images (needs matplotlib, an optional extra).

    Args:
        run_dir: the run directory.
        out_dir: where to write; default `run_dir`. Files: ``report-loss.png`` (when a
            loss was reported), ``report-step-rate.png``, ``report-step.png``.

    Returns:
        The written files; empty when there is no progress data yet.

    Raises:
        ConfigError: matplotlib is not installed, or the directory has no events.jsonl.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("PNG plots need matplotlib: pip install 'ddp-launch[report]'") from None
    run_dir = Path(run_dir)
    data = load_report_data(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = data["run_id"] or run_dir.name
    written = []
    for key, title, y_label, stem, zero_based in CHARTS:
        lines = _lines_for(data, key)
        if not lines:
            continue
        # Figure + Agg canvas, not pyplot: no global state, no GUI backend, thread-safe.
        fig = Figure(figsize=(10, 3.6), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for line in lines:
            for i, seg in enumerate(line.segments):
                ax.plot(
                    [t for t, _ in seg],
                    [y for _, y in seg],
                    color=line.color,
                    linewidth=1.3,
                    marker="." if len(seg) == 1 else None,
                    label=line.label if i == 0 else None,
                )
        for m in data["markers"]:
            ax.axvline(m["t"], color=MARKER_COLORS.get(m["kind"], "#555"), linestyle="--", linewidth=1)
        # "$" would start matplotlib's mathtext in a user's run id.
        ax.set_title(f"{title} - run {run_id} ({data['outcome']})".replace("$", r"\$"))
        if zero_based:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("seconds since start")
        ax.set_ylabel(y_label)
        ax.grid(True, color="#eee")
        if len(lines) <= LEGEND_LIMIT:
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = rundir.png_file(out_dir, stem)
        fig.savefig(path, format="png")
        written.append(path)
    return written

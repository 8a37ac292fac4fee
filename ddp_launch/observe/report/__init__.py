"""`ddp-launch report`: a run's curves and summary, rendered from its ``events.jsonl``.

`render_html` writes one self-contained page: the charts are inline SVG (one polyline per
rank and generation: loss, step rate and step against time since the run started), with
restarts, failures and straggler flags as vertical markers; then the per-rank summary table,
the run's outcome and config, and the failure report's root cause (``failure.json``, else the
last ``failure`` event). The page loads nothing: no scripts, no fonts, no images from anywhere,
so it opens offline and can be mailed around. The plotted data is embedded as JSON in
``<script type="application/json" id="report-data">`` for tools and tests (`load_report_data`
returns the same object).

`render_png` draws the same charts with matplotlib, an optional extra imported only there.

Both read whatever the file holds, so they work during a run too (the outcome is then
"running"). When a run directory holds several runs (appended), the last one is shown.

The parts, imported one way (html -> svg -> data; png -> data, svg):

- `data`: events.jsonl and failure.json read into the report-data dict;
- `svg`: the inline-SVG charts, pure functions from that dict to SVG text;
- `html`: the page;
- `png`: the PNG images.

(The package is not ``ddp_launch.report``: importing a submodule ``ddp_launch.report`` would
replace the package attribute ``ddp_launch.report``, the in-worker API function.)
"""

from ddp_launch.observe.report.data import load_report_data
from ddp_launch.observe.report.html import render_html
from ddp_launch.observe.report.png import render_png
from ddp_launch.observe.report.svg import nice_ticks

__all__ = ["load_report_data", "nice_ticks", "render_html", "render_png"]

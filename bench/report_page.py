"""How long the report page (lottery/ui/) takes for one work directory: the HTML and the plot.

    .venv/bin/python -m bench.report_page <work dir> [--repeat 5] [--draw]

Times what the api-server does for the page's two requests, in this process (no HTTP, no auth):
reading the results (``report_data.build_view``) and rendering the HTML; then the plot: the report
task's PNG when it is up to date, else drawn by matplotlib (first request: cold, matplotlib
imported; then warm, from the cache). The full default experiment (130 tickets and controls) must
stay well under 2 s for page + plot, cold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from lottery.deploy.constants import DAG_ID
from lottery.ui import report_data, report_page
from lottery.ui.report_data import RunFacts


def page_seconds(workdir: Path) -> tuple[float, report_data.ReportView, int]:
    started = time.perf_counter()
    view = report_data.build_view(RunFacts(DAG_ID, "bench", "success", {}, workdir=str(workdir)))
    html = report_page._page(view.facts, view).body  # noqa: SLF001 (the route's own rendering)
    return time.perf_counter() - started, view, len(html)


def plot_seconds(view: report_data.ReportView, draw: bool = False) -> tuple[float, str]:
    started = time.perf_counter()
    drawn = None if draw else report_data.report_plot_file(view)
    if drawn is not None:
        drawn.read_bytes()
        return time.perf_counter() - started, "the report task's PNG"
    report_data.plot_png(view)
    return time.perf_counter() - started, "drawn"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report_page", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="an experiment's work directory (<artifact root>/<experiment id>)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--draw", action="store_true", help="draw the plot even when the report task's PNG is up to date "
                        "(as for a run in progress)")
    args = parser.parse_args(argv)
    if not (args.workdir / "config.json").is_file():
        print(f"error: {args.workdir} is not a work directory (no config.json)", file=sys.stderr)
        return 2
    cold_page, view, size = page_seconds(args.workdir)
    cold_plot, source = plot_seconds(view, args.draw)
    warm = [page_seconds(args.workdir)[0] for _ in range(args.repeat)]
    warm_plot = [plot_seconds(view, args.draw)[0] for _ in range(args.repeat)]
    print(f"work dir {args.workdir}: {len(view.rows)} tickets and controls, {view.done} done, "
          f"{len(view.corrupt)} damaged files; HTML {size / 1024:.0f} KiB; plot: {source}")
    print(f"cold: page {cold_page:.3f} s + plot {cold_plot:.3f} s = {cold_page + cold_plot:.3f} s")
    print(f"warm (median of {args.repeat}): page {statistics.median(warm):.3f} s + plot {statistics.median(warm_plot):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

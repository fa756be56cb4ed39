"""Take docs/img/report-tab.png, the README's picture of the Report tab, from a real run.

    make run          # the default experiment
    make ui &         # the same Airflow home
    make docs-img     # = .venv/bin/python scripts/report_tab_screenshot.py [--run-id R] [--home H]

Logs in to the `make ui` running on the home (as its generated admin), opens the Report tab of the
newest run of lottery_ticket (or --run-id), waits for the plot, and saves the picture. Drives
Debian's Chromium through Playwright, as the browser tests do.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import quote

from playwright import sync_api

from lottery.deploy import airflow_home
from lottery.deploy.api import Api
from lottery.deploy.constants import DAG_ID, REPO

CHROMIUM = os.environ.get("LOTTERY_CHROMIUM", "/usr/bin/chromium")
PICTURE = REPO / "docs" / "img" / "report-tab.png"


def newest_run(api: Api) -> str:
    status, body = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns?order_by=-run_after&limit=1")
    runs = body.get("dag_runs", []) if status == 200 else []
    if not runs:
        sys.exit(f"no run of {DAG_ID} on this Airflow (HTTP {status}): `make run` first")
    return runs[0]["dag_run_id"]


def screenshot(url: str, password: str, run_id: str, out: Path) -> None:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        page = browser.new_context(viewport={"width": 1440, "height": 1350}).new_page()
        page.goto(f"{url}/dags/{DAG_ID}")
        page.fill("input[name=username]", airflow_home.USER)
        page.fill("input[name=password]", password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"**/dags/{DAG_ID}**")
        page.goto(f"{url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/plugin/lottery-report")
        sync_api.expect(page.frame_locator("iframe[title=Report]").locator("img#plot")).to_be_visible(timeout=60_000)
        page.wait_for_function("() => { const f = document.querySelector('iframe[title=Report]');"
                               " const i = f && f.contentDocument.querySelector('img#plot');"
                               " return i && i.complete && i.naturalWidth > 0; }")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=airflow_home.DEFAULT_HOME, help="the Airflow home of `make ui`")
    parser.add_argument("--run-id", help="the run to show (default: the newest)")
    parser.add_argument("--out", type=Path, default=PICTURE)
    args = parser.parse_args()
    home = args.home.resolve()
    port = airflow_home.running_ui(home)
    if port is None:
        sys.exit(f"no `make ui` runs on {home}: start it (LOTTERY_AIRFLOW_HOME={home} make ui)")
    url, password = f"http://127.0.0.1:{port}", airflow_home.password(home)
    run_id = args.run_id or newest_run(Api(url, airflow_home.USER, password))
    screenshot(url, password, run_id, args.out)
    print(f"wrote {args.out} (run {run_id})")


if __name__ == "__main__":
    main()

"""The users' flows in the Airflow UI, in a real browser: Playwright driving Debian's Chromium
(``/usr/bin/chromium``, installed by ``make system-deps``; never ``playwright install``) against a
``make ui``-style Airflow (api-server, scheduler, dag-processor) on a throwaway home.

In order, on one tiny run triggered from the form (300 images, 1 epoch, 2 masks x 2 rewind points,
no controls): log in; a bad param refused; trigger with changed params; the mapped late_reset
instances with readable names; a ticket's log with an epoch line; the report tab (plot loaded, the
table), saved in build/ui-screenshots/; three tickets made to fail (their masks damaged), the run failed, repaired, and the run's "Clear only
failed tasks" re-running exactly those; two more runs of the same config, one ticket failed in each of
the three, re-run through REST ``only_failed`` and ``lottery rerun-failed --since``. A failed test
leaves a screenshot in build/ui-screenshots/.
"""

import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pytest

from lottery.deploy import airflow_home
from lottery.deploy.constants import DAG_ID, REPO
from tests import helpers

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("LOTTERY_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = REPO / "build" / "ui-screenshots"
# What the form is changed to: the tiny experiment of the other end-to-end tests, in fields a user edits.
FORM = {"dataset_limit": "300", "training_steps": "1ep", "batch_size": "32", "lr_milestones": "2it",
        "rewind_points": "0it\n2it", "num_levels": "2", "prune_rate": "0.5"}
SECTION = {"dataset_limit": "Data", "training_steps": "Model and training", "batch_size": "Model and training",
           "lr_milestones": "Model and training", "rewind_points": "Pruning", "num_levels": "Pruning",
           "prune_rate": "Pruning", "controls": "Controls", "artifact_root": "Execution"}
NAME = re.compile(r"^\d+\.\d% left, rewind (0it|2it)$")  # "50.1% left, rewind 0it"
STATE: dict = {}  # what one test leaves to the next (the run id)

# `make test` installs both, so a missing one is an error, not a silent skip (LOTTERY_SKIP_BROWSER_TESTS=1 skips).
if os.environ.get("LOTTERY_SKIP_BROWSER_TESTS") == "1":
    pytest.skip("LOTTERY_SKIP_BROWSER_TESTS=1", allow_module_level=True)
if not CHROMIUM.exists():
    pytest.fail(f"no Chromium at {CHROMIUM}: `make install` installs Debian's chromium "
                "(or set LOTTERY_SKIP_BROWSER_TESTS=1)", pytrace=False)
try:
    from playwright import sync_api
except ImportError:
    pytest.fail("no playwright: `make install` installs it (requirements.txt)", pytrace=False)
sync_api.expect.set_options(timeout=30_000)  # a loaded machine renders slowly; a real failure still fails


# ---- Airflow and the browser ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    home, art = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("artifacts")
    env = {"LOTTERY_ARTIFACT_ROOT": str(art), "LOTTERY_RETRY_DELAY_S": "1"}  # read when the DAG is parsed
    with helpers.local_airflow(home, "api-server", "scheduler", "dag-processor", env=env) as (local, api):
        yield local, api, art


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses root without it
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def context(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    context.set_default_timeout(30_000)
    yield context
    context.close()


@pytest.fixture
def page(context, request):
    page = context.pages[0] if context.pages else context.new_page()
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{request.node.name}.png"), full_page=True)
        print(f"screenshot: {SCREENSHOTS / (request.node.name + '.png')}")


def run_url(local, run_id: str, tail: str = "") -> str:
    return f"{local.url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}{tail}"


def tickets(api, run_id: str) -> dict[int, tuple[str, str]]:
    """The mapped late_reset instances: map index -> (name, state)."""
    return {t["map_index"]: (t.get("rendered_map_index"), t.get("state")) for t in api.task_instances(run_id)
            if t["task_id"] == "late_reset" and t["map_index"] >= 0}


def first_ticket_state(api, run_id: str) -> str | None:
    return tickets(api, run_id).get(0, (None, None))[1]


def run_state(api, run_id: str) -> str | None:
    status, run = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}")
    return run.get("state") if status == 200 else None


def states(api, run_id: str) -> str:
    """The run's state and every task instance's, for a failure message."""
    tis = sorted(f"{t['task_id']}{'[%d]' % t['map_index'] if t['map_index'] >= 0 else ''}={t.get('state')}"
                 for t in api.task_instances(run_id))
    return f"run {run_state(api, run_id)}; " + ", ".join(tis)


def wait_for(local, api, run_id: str, predicate, what: str, timeout: float = 300, interval: float = 2):
    """Wait on this run; a timeout names every task's state."""
    return helpers.wait_for(predicate, timeout, what, interval=interval, state=lambda: states(api, run_id),
                            supervisor=local.supervisor)


def wait_for_ticket(local, api, run_id: str, state: str, what: str) -> None:
    wait_for(local, api, run_id, lambda: first_ticket_state(api, run_id) == state, what)


def wait_for_run(local, api, run_id: str, what: str, timeout: float = 300, interval: float = 2) -> str:
    """The run's state once it has finished (every task done, the report included)."""
    def finished() -> str | None:
        state = run_state(api, run_id)
        return state if state in ("success", "failed") else None
    return wait_for(local, api, run_id, finished, what, timeout, interval)


# ---- the flows --------------------------------------------------------------------------------------
def test_log_in(airflow, page):
    local, _, _ = airflow
    page.goto(f"{local.url}/dags/{DAG_ID}")
    page.fill("input[name=username]", airflow_home.USER)
    page.fill("input[name=password]", airflow_home.password(local.home))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(rf"/dags/{DAG_ID}"))
    sync_api.expect(page.get_by_text(DAG_ID).first).to_be_visible()


def open_trigger_form(local, page) -> None:
    page.goto(f"{local.url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger").first.click()
    sync_api.expect(page.get_by_role("dialog").get_by_text("Trigger Dag")).to_be_visible()


def field(page, name: str):
    """The form field of param ``name``, its section opened (the form shows one section at a time)."""
    header = page.get_by_role("dialog").get_by_role("button", name=SECTION[name], exact=True)
    if header.get_attribute("aria-expanded") != "true":
        header.click()
        sync_api.expect(header).to_have_attribute("aria-expanded", "true")
    return page.get_by_role("dialog").locator(f"[name=element_{name}]")


def fill(page, name: str, value: str) -> None:
    element = field(page, name)
    element.fill(value)
    element.press("Tab")


def submit_trigger(page) -> None:
    page.get_by_role("dialog").get_by_role("button", name="Trigger").last.click()


def test_a_bad_param_is_refused_in_the_form(airflow, page):
    local, api, _ = airflow
    runs_before = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns")[1]["total_entries"]
    open_trigger_form(local, page)
    fill(page, "training_steps", "6 weeks")  # not a step string: the schema's pattern refuses it
    submit_trigger(page)
    sync_api.expect(page.get_by_text(re.compile("training_steps")).first).to_be_visible()
    assert api.get(f"/api/v2/dags/{DAG_ID}/dagRuns")[1]["total_entries"] == runs_before


def test_trigger_from_the_form_with_changed_params(airflow, page):
    local, api, art = airflow
    open_trigger_form(local, page)
    for name, value in FORM.items():
        fill(page, name, value)
    field(page, "controls").dispatch_event("click")  # the switch: off, no controls in this run
    fill(page, "artifact_root", str(art))
    submit_trigger(page)
    sync_api.expect(page.get_by_text("Dag Run Triggered").first).to_be_visible()
    runs = helpers.wait_for(lambda: api.get(f"/api/v2/dags/{DAG_ID}/dagRuns")[1]["dag_runs"], 30, "the run", interval=1)
    assert len(runs) == 1
    conf = runs[0]["conf"]
    assert conf["dataset_limit"] == 300 and conf["training_steps"] == "1ep" and conf["num_levels"] == 2, conf
    assert conf["rewind_points"] == ["0it", "2it"] and conf["lr_milestones"] == ["2it"] and conf["controls"] is False, conf
    STATE["run_id"] = runs[0]["dag_run_id"]


def the_run(api) -> str:
    if "run_id" not in STATE:
        pytest.skip("no run: the trigger test failed")
    return STATE["run_id"]


def test_mapped_late_reset_instances_appear_with_readable_names(airflow, page):
    local, api, _ = airflow
    run_id = the_run(api)
    def named():  # an instance is named (from its kwargs) when it starts
        found = tickets(api, run_id)
        return len(found) == 4 and all(NAME.match(name or "") for name, _ in found.values()) and found

    found = helpers.wait_for(named, 600, "the 4 mapped late_reset instances, named", interval=3, supervisor=local.supervisor)
    names = {name for name, _ in found.values()}
    assert len(names) == 4, found
    page.goto(run_url(local, run_id, "/tasks/late_reset/mapped"))
    for name in names:
        sync_api.expect(page.get_by_text(name, exact=True).first).to_be_visible()


def test_a_tickets_log_has_an_epoch_line(airflow, page):
    local, api, _ = airflow
    run_id = the_run(api)
    helpers.wait_for(lambda: first_ticket_state(api, run_id) in ("success", "failed"), 600, "the first ticket to finish",
                     interval=3, supervisor=local.supervisor)
    page.goto(run_url(local, run_id, "/tasks/late_reset/mapped/0"))
    sync_api.expect(page.get_by_text(re.compile(r"epoch 1/1 +step")).first).to_be_visible(timeout=60_000)


def test_the_report_tab_shows_the_plot_and_the_table(airflow, page):
    local, api, _ = airflow
    run_id = the_run(api)
    assert wait_for_run(local, api, run_id, "the run to finish", 600, 3) == "success"
    page.goto(run_url(local, run_id, "/plugin/lottery-report"))
    frame = page.frame_locator("iframe[title=Report]")
    sync_api.expect(frame.locator("#table-tickets")).to_be_visible()
    sync_api.expect(frame.get_by_text("Tickets (4 of 4 done)")).to_be_visible()
    plot = frame.locator("img#plot")
    sync_api.expect(plot).to_be_visible()
    page.wait_for_function("() => { const f = document.querySelector('iframe[title=Report]');"
                           " const i = f && f.contentDocument.querySelector('img#plot');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    assert plot.evaluate("img => img.naturalWidth") > 0
    page.set_viewport_size({"width": 1440, "height": 1350})  # the plot and the table in one picture
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)  # the README's picture comes from a real run: `make docs-img`
    page.screenshot(path=str(SCREENSHOTS / "report-tab.png"))
    page.set_viewport_size({"width": 1440, "height": 1000})


# The tickets made to fail (their masks damaged): three of the four; the fourth is never touched.
FAILING = ("sp50.000__0it", "sp50.000__2it", "sp75.000__2it")
KEPT = "sp75.000__0it"


def the_workdir(art: Path) -> Path:
    return next(p for p in art.iterdir() if p.name.startswith("lenet_300_100-"))


def mtimes(directory: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def ticket_indices(api, run_id: str, names) -> list[int]:
    """The map indices of the late_reset instances that train the tickets ``names`` (plan_tickets' XCom)."""
    kwargs = api.xcom(run_id, "plan_tickets")
    return [i for i, k in enumerate(kwargs) if f"{k['masks'][0]['mask_id']}__{k['rewind']}" in names]


def break_tickets(workdir: Path, names) -> dict[Path, bytes]:
    """Delete the tickets ``names`` and damage their masks (a ticket then fails at once, without
    retries, naming the mask); returns the masks' good bytes, to repair them."""
    good = {}
    for name in names:
        shutil.rmtree(workdir / "tickets" / name)
        mask = workdir / "masks" / f"{name.split('__')[0]}.npz"
        good.setdefault(mask, mask.read_bytes())
        mask.write_bytes(good[mask][:-40] + b"\0" * 40)
    return good


def check_try(api, run_id: str) -> int:
    return next(t["try_number"] for t in api.task_instances(run_id) if t["task_id"] == "check_results")


def wait_rerun(local, api, run_id: str, before: int, what: str) -> str:
    """The run's state once a clear has re-run it to the end: check_results (cleared by every kind of
    clear) has a new try and the run has finished (a fast re-run may finish before a poll sees it run)."""
    def finished() -> str | None:
        state = run_state(api, run_id)
        return state if state in ("success", "failed") and check_try(api, run_id) > before else None
    return wait_for(local, api, run_id, finished, what)


def fail_tickets(local, api, run_ids, names) -> None:
    """Clear the late_reset instances of ``names`` (with downstream) in each finished run: they fail."""
    before = {}
    for run_id in run_ids:
        before[run_id] = check_try(api, run_id)
        indices = ticket_indices(api, run_id, names)
        status, out = api.post(f"/api/v2/dags/{DAG_ID}/clearTaskInstances", {
            "dag_run_id": run_id, "task_ids": [["late_reset", i] for i in indices], "include_downstream": True,
            "only_failed": False, "dry_run": False})
        assert status == 200, out
    for run_id in run_ids:
        assert wait_rerun(local, api, run_id, before[run_id], "the run to fail") == "failed", states(api, run_id)
        failed = {i for i, (_, state) in tickets(api, run_id).items() if state == "failed"}
        assert failed == set(ticket_indices(api, run_id, names)), states(api, run_id)


def clear_only_failed_in_the_ui(page, local, run_id: str) -> None:
    """The run's *Clear Run* (the icon button on its page; its tooltip names Shift+C), *Clear only
    failed tasks*, *Confirm*."""
    page.goto(run_url(local, run_id))
    page.get_by_role("button", name=re.compile(r"^(Press shift\+c to clear|Clear Dag Run)$", re.I)).first.click()
    dialog = page.get_by_role("dialog")
    sync_api.expect(dialog.get_by_text(re.compile("Clear .*Run", re.I)).first).to_be_visible()
    dialog.get_by_text("Clear only failed tasks", exact=True).first.click()
    sync_api.expect(dialog.get_by_role("button", name="Confirm")).to_be_enabled()
    dialog.get_by_role("button", name="Confirm").click()


def report_tab(page, local, run_id: str):
    page.goto(run_url(local, run_id, "/plugin/lottery-report"))
    return page.frame_locator("iframe[title=Report]")


def test_the_failed_tickets_of_a_run_rerun_with_one_clear(airflow, page):
    """Three of four tickets fail (their masks damaged), the run fails; the cause is fixed and the
    run's "Clear only failed tasks" re-runs exactly those three: the run ends success and its report
    is written again (check_results rebuilds it from disk; ``report`` itself is not cleared)."""
    local, api, art = airflow
    run_id = the_run(api)
    workdir = the_workdir(art)
    kept = mtimes(workdir / "tickets" / KEPT)
    good = break_tickets(workdir, FAILING)
    try:
        fail_tickets(local, api, [run_id], FAILING)
        frame = report_tab(page, local, run_id)
        sync_api.expect(frame.locator("#problems-title")).to_have_text("Failed or missing (3)")
        sync_api.expect(frame.locator("#problems")).to_contain_text("CorruptArtifactError")
        sync_api.expect(frame.locator("#rerun")).to_contain_text("Clear only failed tasks")
        sync_api.expect(frame.locator("#rerun a")).to_have_attribute("href", re.compile(rf"/runs/{re.escape(quote(run_id, safe=''))}$"))
    finally:
        for mask, data in good.items():
            mask.write_bytes(data)
    report_before = (workdir / "report" / "report.md").stat().st_mtime_ns
    tries = {t["task_id"]: t["try_number"] for t in api.task_instances(run_id) if t["map_index"] < 0}
    clear_only_failed_in_the_ui(page, local, run_id)
    assert wait_rerun(local, api, run_id, tries["check_results"], "the run after the clear") == "success", states(api, run_id)
    assert all((workdir / "tickets" / name / "result.json").is_file() for name in FAILING)
    assert mtimes(workdir / "tickets" / KEPT) == kept  # never trained again
    tis = {t["task_id"]: t for t in api.task_instances(run_id) if t["map_index"] < 0}
    # report was not cleared (it had succeeded): check_results rewrote the report from disk
    assert tis["report"]["try_number"] == tries["report"] and tis["check_results"]["try_number"] == tries["check_results"] + 1
    md = workdir / "report" / "report.md"
    assert md.stat().st_mtime_ns > report_before and "## Failed or missing (0)" in md.read_text()
    frame = report_tab(page, local, run_id)
    sync_api.expect(frame.locator("#done")).to_have_text("4 of 4")
    sync_api.expect(frame.locator("#problems-title")).to_have_text("Failed or missing (0)")
    page.goto(run_url(local, run_id, f"/tasks/late_reset/mapped/{ticket_indices(api, run_id, FAILING)[0]}"))
    sync_api.expect(page.get_by_text(re.compile(r"epoch 1/1 +step")).first).to_be_visible(timeout=60_000)


def lottery_cli(local, *args: str):
    """``python -m lottery`` as the README shows it, on this Airflow's home."""
    env = {**os.environ, "LOTTERY_AIRFLOW_HOME": str(local.home)}
    return subprocess.run([sys.executable, "-m", "lottery", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_failed_runs_rerun_through_rest_and_the_cli(airflow):
    """Three runs of one config (one work directory); one ticket fails in each. The first is re-run
    with REST ``clearTaskInstances`` ``only_failed``, the other two with ``lottery rerun-failed
    --since``: all end success, and the ticket trains once (the other runs find it done)."""
    local, api, art = airflow
    first = the_run(api)
    conf = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(first, safe='')}")[1]["conf"]
    since = datetime.now(timezone.utc).isoformat()
    others = [api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})[1]["dag_run_id"]
              for _ in range(2)]
    busy = lottery_cli(local, "rerun-failed", "--run-id", others[0])  # while it runs: refused, with what to do
    assert busy.returncode == 1 and "wait until it has finished" in busy.stdout, busy
    for run_id in others:  # the same experiment: every unit is already done
        assert wait_for_run(local, api, run_id, "the second run to finish", 600, 3) == "success", states(api, run_id)
    workdir = the_workdir(art)
    untouched = {p: t for p, t in mtimes(workdir / "tickets").items() if FAILING[0] not in str(p)}
    good = break_tickets(workdir, FAILING[:1])
    try:
        fail_tickets(local, api, [first, *others], FAILING[:1])
    finally:
        for mask, data in good.items():
            mask.write_bytes(data)
    tries = {run_id: check_try(api, run_id) for run_id in [first, *others]}
    status, out = api.post(f"/api/v2/dags/{DAG_ID}/clearTaskInstances",
                           {"dag_run_id": first, "only_failed": True, "include_downstream": True, "dry_run": False})
    assert status == 200 and {t["task_id"] for t in out["task_instances"]} == {"late_reset", "check_results"}, out
    assert wait_rerun(local, api, first, tries[first], "the REST-cleared run") == "success", states(api, first)
    done = mtimes(workdir / "tickets" / FAILING[0])
    cli = lottery_cli(local, "rerun-failed", "--since", since)
    assert cli.returncode == 0, cli
    assert "2 failed run(s)" in cli.stdout and all(f"{r}: cleared 2 failed task(s)" in cli.stdout for r in others), cli.stdout
    for run_id in others:
        assert wait_rerun(local, api, run_id, tries[run_id], "a CLI-cleared run") == "success", states(api, run_id)
    assert mtimes(workdir / "tickets" / FAILING[0]) == done  # trained once, by the first run
    assert {p: t for p, t in mtimes(workdir / "tickets").items() if FAILING[0] not in str(p)} == untouched

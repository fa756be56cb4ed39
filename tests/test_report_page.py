"""The report page (plugins/lottery_report.py, lottery/ui/) served by a real api-server.

A throwaway Airflow home runs the api-server and the dag-processor (no scheduler: the runs stay
queued, i.e. in progress). Runs are created through the REST API and given the XComs a real run's
validate_config and prepare_workdir would have pushed, pointing at work directories written here:
a partial experiment (done, failed and missing tickets), a damaged one, one that is gone. A second
DAG in the test's dags folder gives "another DAG's run". About 15 s, most of it Airflow starting.
"""

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from lottery.config import ExperimentConfig
from lottery.deploy.constants import DAG_ID, REPO
from lottery.files import output_records, write_json
from lottery.paths import FORMAT_VERSION
from lottery.plan import RunPlan
from tests import helpers
from tests.helpers import tiny_run

pytestmark = pytest.mark.slow

TINY = tiny_run(drop=("dataset_limit", "batch_size"))
OTHER_DAG = '''
from airflow.sdk import dag, task

@dag(dag_id="other_dag", schedule=None)
def other_dag():
    @task
    def hello():
        return 1
    hello()

other_dag()
'''


# ---- a synthetic work directory ---------------------------------------------------------------------
def write_workdir(path: Path) -> Path:
    """A partial experiment: dense done, one ticket failed, one missing, the rest (and the controls) done."""
    cfg = ExperimentConfig.from_dict(TINY)
    plan = RunPlan.from_config(cfg)
    (path / "dense").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (path / "run.json").write_text(json.dumps({"experiment_id": path.name, "format_version": FORMAT_VERSION}))
    write_json(path / "dense" / "result.json", {"val_accuracy": 0.85, "best_val_accuracy": 0.86, "epochs": 1}, sealed=True)
    for i, spec in enumerate(plan.expected):
        ticket = path / "tickets" / spec.name
        if spec.name == "sp80.000__2it":
            continue  # missing
        ticket.mkdir(parents=True)
        if spec.name == "sp50.000__2it":
            (ticket / "error.json").write_text(json.dumps({"error": "CorruptArtifactError: sp50.000.npz is truncated"}))
            continue
        sparsity = {m.mask_id: m.sparsity for m in plan.masks}[spec.mask_id]
        (ticket / "model.keras").write_bytes(b"model of " + spec.name.encode())
        write_json(ticket / "result.json", {
            "remaining": 1 - sparsity, "rewind_step": 0, "val_accuracy": 0.86 - 0.01 * i, "best_val_accuracy": 0.87,
            **output_records(ticket, ["model.keras"])}, sealed=True)
    return path


def plan_of(workdir: Path) -> dict:
    return {"config": json.loads((workdir / "config.json").read_text())}


# ---- Airflow ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    """api-server + dag-processor on a throwaway home; the dags folder holds lottery_ticket and other_dag."""
    home, dags = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("dags")
    (dags / "lottery_ticket.py").symlink_to(REPO / "dags" / "lottery_ticket.py")
    (dags / "other_dag.py").write_text(OTHER_DAG)
    env = {"AIRFLOW__CORE__DAGS_FOLDER": str(dags)}
    with helpers.local_airflow(home, "api-server", "dag-processor", env=env) as (local, api):
        helpers.wait_for(lambda: api.get("/api/v2/dags/other_dag")[0] == 200, 120, "other_dag to be parsed", interval=2,
                         supervisor=local.supervisor)
        yield local, api


def new_run(api, dag_id: str = DAG_ID, xcoms: dict | None = None) -> str:
    status, run = api.post(f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": {}})
    assert status in (200, 201), run
    for (task_id, key), value in (xcoms or {}).items():
        status, out = api.post(f"/api/v2/dags/{dag_id}/dagRuns/{quote(run['dag_run_id'], safe='')}/taskInstances/{task_id}"
                               "/xcomEntries", {"key": key, "value": value, "map_index": -1})
        assert status in (200, 201), out
    return run["dag_run_id"]


def lottery_run(api, workdir: Path, *, with_plan: bool = True) -> str:
    xcoms = {("prepare_workdir", "return_value"): {"workdir": str(workdir), "experiment_id": workdir.name}}
    if with_plan:
        xcoms[("validate_config", "plan")] = plan_of(workdir)
    return new_run(api, DAG_ID, xcoms)


@pytest.fixture(scope="module")
def runs(airflow, tmp_path_factory):
    _, api = airflow
    root = tmp_path_factory.mktemp("artifacts")
    good = write_workdir(root / "lenet_300_100-partial")
    outside = root / "secret.txt"
    outside.write_text("model of sp50.000__0it")  # what its record says: refused for where it is, not what
    (good / "tickets" / "sp50.000__0it" / "model.keras").unlink()
    (good / "tickets" / "sp50.000__0it" / "model.keras").symlink_to(outside)  # a symlink out of the work dir
    damaged = write_workdir(root / "lenet_300_100-damaged")
    (damaged / "dense" / "result.json").write_text("{not json")
    (damaged / "tickets" / "sp50.000__0it" / "result.json").write_bytes(b"\x00\x01garbage")
    truncated = good / "tickets" / "sp80.000__2it__random_prune" / "model.keras"
    truncated.write_bytes(truncated.read_bytes()[:10])  # half its bytes: flagged, never served
    gone = write_workdir(root / "lenet_300_100-deleted")
    runs = {"gone": lottery_run(api, gone)}
    shutil.rmtree(gone)
    return runs | {
        "good": lottery_run(api, good), "good_dir": good,
        "damaged": lottery_run(api, damaged, with_plan=False),
        "early": new_run(api, DAG_ID),
        "other": new_run(api, "other_dag"),
    }


def fetch(local, path: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    """A raw GET (no URL normalisation: the path goes to the server as written)."""
    req = urllib.request.Request(local.url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def authed(api) -> dict:
    if api.token is None:
        api.login()
    return {"Authorization": f"Bearer {api.token}"}


def base(dag_id: str, run_id: str) -> str:
    return f"/lottery/dags/{dag_id}/runs/{quote(run_id, safe='')}/"


def file_urls(run_id: str) -> list[str]:
    b = base(DAG_ID, run_id)
    return [b + "plot.png", b + "plot.png?download=1", b + "results.csv", b + "model.keras?ticket=sp80.000__2it__random_prune"]


# ---- the tests --------------------------------------------------------------------------------------
def test_the_plugin_is_registered(airflow):
    _, api = airflow
    status, payload = api.get("/api/v2/plugins")
    assert status == 200, payload
    plugin = next(p for p in payload["plugins"] if p["name"] == "lottery_report")
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/lottery"]
    views = {v["destination"]: v for v in plugin["external_views"]}
    assert views["dag_run"]["href"] == "/lottery/dags/{DAG_ID}/runs/{RUN_ID}/"
    assert views["task_instance"]["href"].endswith("?task_id={TASK_ID}")


def test_every_url_refuses_unauthenticated_requests(airflow, runs):
    local, api = airflow
    urls = [base(DAG_ID, runs["good"]), *file_urls(runs["good"]), base("other_dag", runs["other"]),
            base(DAG_ID, "no-such-run")]
    for url in urls:
        assert fetch(local, url)[0] == 401, url
        assert fetch(local, url, {"Authorization": "Bearer not-a-jwt"})[0] in (401, 403), url
        assert fetch(local, url, {"Cookie": "_token=not-a-jwt"})[0] in (401, 403), url
    for path in ("/lottery/docs", "/lottery/openapi.json", "/lottery/redoc", "/lottery/"):
        assert fetch(local, path)[0] == 404, path


def test_the_ui_session_cookie_is_accepted(airflow, runs):
    """The page is loaded by the browser in an iframe: the UI's JWT cookie authenticates it."""
    local, api = airflow
    authed(api)
    status, body, _ = fetch(local, base(DAG_ID, runs["good"]), {"Cookie": f"_token={api.token}"})
    assert status == 200 and b"Tickets (" in body


def test_the_page_of_a_partial_run(airflow, runs):
    local, api = airflow
    status, body, headers = fetch(local, base(DAG_ID, runs["good"]), authed(api))
    html = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "lenet_300_100-partial" in html and "85.00%" in html  # experiment id, dense accuracy
    assert "Tickets (2 of 4 done)" in html and "Control random_prune (1 of 2 done)" in html
    assert 'class="match"' in html  # a ticket within a point of the dense network
    # The run is in progress: the ticket without a result and without a finished task is queued, not a problem.
    problems = html[html.index('id="problems-title"'):]
    assert "Failed or missing (2)" in html and "CorruptArtifactError: sp50.000.npz is truncated" in problems
    assert "Queued or running (1)" in html and "sp80.000 (20.00% left), rewind 2it: <b>queued</b>" in html
    assert "sp80.000 (20.00% left), rewind 2it:" not in problems
    assert "model.keras: 10 bytes, result.json says 36" in problems and "<b>corrupt</b>" in problems
    assert "The run is still in progress: once it has finished" in html and "lottery rerun-failed" not in html
    assert '<meta http-equiv="refresh"' in html  # queued: in progress
    assert 'src="plot.png?v=' in html and 'href="results.csv"' in html and "<option>sp80.000__0it</option>" in html
    assert "<code>training_steps=1ep</code>" in html


def test_downloads(airflow, runs):
    local, api = airflow
    b = base(DAG_ID, runs["good"])
    status, png, headers = fetch(local, b + "plot.png", authed(api))
    assert status == 200 and png.startswith(b"\x89PNG") and len(png) > 10_000 and headers["content-type"] == "image/png"
    status, _, headers = fetch(local, b + "plot.png?download=1", authed(api))
    assert status == 200 and headers["content-disposition"].startswith("attachment;")
    status, csv, headers = fetch(local, b + "results.csv", authed(api))
    lines = csv.decode().strip().splitlines()
    assert status == 200 and lines[0].startswith("mask_id,sparsity") and len(lines) == 1 + 8
    assert sum(",failed," in line for line in lines) == 1 and sum(",queued," in line for line in lines) == 1
    assert sum(",corrupt," in line for line in lines) == 1
    status, model, headers = fetch(local, b + "model.keras?ticket=sp80.000__0it", authed(api))
    assert status == 200 and model == b"model of sp80.000__0it"
    assert "lenet_300_100-partial-sp80.000__0it-model.keras" in headers["content-disposition"]


def test_a_truncated_model_is_flagged_and_refused(airflow, runs):
    """Checked against its result.json's record of its size and sha256 (lottery.files.damaged_files)."""
    local, api = airflow
    b = base(DAG_ID, runs["good"])
    html = fetch(local, b, authed(api))[1].decode()
    damaged = html[html.index('id="corrupt"'):html.index("</div>", html.index('id="corrupt"'))]
    assert "tickets/sp80.000__2it__random_prune: model.keras: 10 bytes, result.json says 36" in damaged
    assert "<option>sp80.000__2it__random_prune</option>" not in html
    status, body, headers = fetch(local, b + "model.keras?ticket=sp80.000__2it__random_prune", authed(api))
    assert status == 409 and headers["content-type"].startswith("text/html"), (status, body[:200])
    assert "does not match its result.json (model.keras: 10 bytes, result.json says 36)" in body.decode()
    assert "refused the damaged model.keras of sp80.000__2it__random_prune" in local.supervisor.log("api-server").read_text()


TICKET_TRICKS = [
    "../../../../../../etc/passwd", "..", ".", "/etc/passwd", "%2Fetc%2Fpasswd", "..%2F..%2Fconfig.json",
    "sp50.000__0it/../../config.json", "sp50.000__0it%2F..%2F..%2Fconfig.json", "..\\..\\config.json",
    "%2e%2e%2f%2e%2e%2fconfig.json", "tickets/../config.json", "sp50.000__0it%00", "", "sp80.000__2it",  # missing
    "sp50.000__0it",  # its model.keras is a symlink out of the work directory
    "sp50.000__2it",  # failed: no model.keras
]
PATH_TRICKS = [
    "../../../../../../etc/passwd", "..%2F..%2F..%2Fconfig.json", "%2e%2e/%2e%2e/config.json", "config.json",
    "tickets/", "tickets/sp80.000__0it/model.keras", "report/", "report/report.md", "dense/result.json",
    "%2Fetc%2Fpasswd", "plot.png/..%2F..%2Fconfig.json", "//etc/passwd", "..;/config.json",
]


def test_path_tricks_get_404_and_are_logged(airflow, runs):
    local, api = airflow
    b = base(DAG_ID, runs["good"])
    for trick in TICKET_TRICKS:
        assert fetch(local, b + "model.keras?ticket=" + trick, authed(api))[0] == 404, trick
    for trick in PATH_TRICKS:
        assert fetch(local, b + trick, authed(api))[0] == 404, trick
    for run_trick in ("..", "..%2F..%2Fother", "%2e%2e", runs["good"] + "%2F..", "/etc/passwd", "..%5C..%5Cx"):
        for name in ("", "plot.png", "results.csv", "model.keras?ticket=sp80.000__0it"):
            assert fetch(local, f"/lottery/dags/{DAG_ID}/runs/{run_trick}/{name}", authed(api))[0] == 404, (run_trick, name)
    log = local.supervisor.log("api-server").read_text()
    assert "refused model.keras?ticket='../../../../../../etc/passwd'" in log
    assert "no run '..'" in log


def test_an_unknown_run_is_a_404_page(airflow):
    local, api = airflow
    status, body, headers = fetch(local, base(DAG_ID, "no-such-run"), authed(api))
    assert status == 404 and headers["content-type"].startswith("text/html")
    assert "No run &#39;no-such-run&#39; of DAG &#39;lottery_ticket&#39;" in body.decode()


def test_another_dags_run(airflow, runs):
    local, api = airflow
    status, body, _ = fetch(local, base("other_dag", runs["other"]), authed(api))
    assert status == 404 and "This is not a lottery_ticket run" in body.decode()
    for url in (base("other_dag", runs["other"]) + "plot.png", base("other_dag", runs["other"]) + "results.csv"):
        assert fetch(local, url, authed(api))[0] == 404
    # the right run id under the wrong DAG id is no run at all
    assert fetch(local, base("other_dag", runs["good"]), authed(api))[0] == 404


def test_damaged_files_are_named_not_a_500(airflow, runs):
    local, api = airflow
    status, body, _ = fetch(local, base(DAG_ID, runs["damaged"]), authed(api))
    html = body.decode()
    assert status == 200 and "Damaged files" in html, html[:3000]
    assert "dense/result.json" in html and "tickets/sp50.000__0it" in html
    assert "Traceback" not in html and "Dense network</b>: not trained yet" in html
    assert "Tickets (1 of 4 done)" in html  # the damaged ticket is marked, the others are read
    assert fetch(local, base(DAG_ID, runs["damaged"]) + "plot.png", authed(api))[0] == 200
    (runs["good_dir"] / "config.json").rename(runs["good_dir"] / "config.json.bak")
    try:  # the run's own plan (XCom) still names the tickets
        assert fetch(local, base(DAG_ID, runs["good"]), authed(api))[0] == 200
    finally:
        (runs["good_dir"] / "config.json.bak").rename(runs["good_dir"] / "config.json")


def test_a_run_whose_artifacts_are_gone(airflow, runs):
    local, api = airflow
    status, body, _ = fetch(local, base(DAG_ID, runs["gone"]), authed(api))
    assert status == 200 and "The artifacts of this run are gone" in body.decode()
    for url in file_urls(runs["gone"]):
        assert fetch(local, url, authed(api))[0] == 404, url


def test_a_run_before_prepare_workdir(airflow, runs):
    local, api = airflow
    status, body, _ = fetch(local, base(DAG_ID, runs["early"]), authed(api))
    html = body.decode()
    assert status == 200 and "has not created its work directory yet" in html and 'http-equiv="refresh"' in html


def test_backfill_is_refused_with_the_reason_in_the_dags_docs(airflow):
    """Backfill is off for an experiment DAG (schedule=None): the REST API refuses it in words, and
    the DAG's docs in the UI say why and what to do instead."""
    _, api = airflow
    status, out = api.post("/api/v2/backfills", {"dag_id": DAG_ID, "from_date": "2026-01-01T00:00:00Z",
                                                 "to_date": "2026-01-02T00:00:00Z", "reprocess_behavior": "failed"})
    assert status == 422 and "non-periodic schedule that does not support backfills" in str(out), (status, out)
    status, details = api.get(f"/api/v2/dags/{DAG_ID}/details")
    assert status == 200 and details["timetable_summary"] in (None, "None"), details.get("timetable_summary")
    assert "**Backfill is off**" in details["doc_md"] and "Clear only failed tasks" in details["doc_md"]


def test_rerun_failed_refuses_a_run_whose_work_directory_is_gone(airflow, runs, capsys):
    from lottery.deploy import rerun

    _, api = airflow
    status, out = api.patch(f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(runs['gone'], safe='')}", {"state": "failed"})
    assert status == 200, out
    said: list[str] = []
    assert rerun.rerun_failed(api, [runs["gone"]], None, None, say=said.append) == 1
    assert len(said) == 1 and "not cleared: its work directory" in said[0] and "lenet_300_100-deleted is gone" in said[0], said

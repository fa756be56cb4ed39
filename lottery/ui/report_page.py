"""The experiment's report inside the Airflow UI: a FastAPI app the api-server mounts (plugin
``plugins/lottery_report.py``), shown in the "Report" tab of a DAG run.

    /lottery/dags/<dag id>/runs/<run id>/                      the page (HTML)
    /lottery/dags/<dag id>/runs/<run id>/plot.png[?download=1] accuracy vs sparsity
    /lottery/dags/<dag id>/runs/<run id>/instability.png       instability vs rewind point
    /lottery/dags/<dag id>/runs/<run id>/results.csv           one row per expected ticket
    /lottery/dags/<dag id>/runs/<run id>/model.keras?ticket=<ticket name>

Access: the api-server's own ``requires_access_dag("GET", RUN)`` is the app's dependency, so no
route can forget it (no token 401, a bad one or no permission 403). Files are served only from the
run's own work directory; anything else is a logged 404.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response
from jinja2 import Environment

from lottery.deploy.api import xcom_value
from lottery.deploy.constants import DAG_ID
from lottery.files import csv_text
from lottery.replicate_report import SET_RESULT_COLUMNS, cell_text, spread
from lottery.report import MATCH_TOLERANCE, RESULT_COLUMNS
from lottery.stability_report import instability_text, network_label
from lottery.ui import report_data
from lottery.ui.mount import ui_base
from lottery.ui.page_template import PAGE
from lottery.ui.report_data import ReportView, RunFacts, TaskInstanceFacts

log = logging.getLogger("lottery.ui")

RUN_PATH = "/dags/{dag_id}/runs/{run_id}"
REFRESH_S = 15
_TEMPLATE = Environment(autoescape=True).from_string(PAGE)


def create_app() -> FastAPI:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    app = FastAPI(
        title="Lottery-ticket report", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False,
        dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))],
    )
    app.get(RUN_PATH + "/", response_class=HTMLResponse)(report_page)
    app.get(RUN_PATH + "/plot.png")(plot)
    app.get(RUN_PATH + "/instability.png")(instability_plot)
    app.get(RUN_PATH + "/results.csv")(results_csv)
    app.get(RUN_PATH + "/model.keras")(ticket_model)
    return app


# ---- the routes (sync: they read files; FastAPI runs them in its thread pool) -----------------------
def report_page(dag_id: str, run_id: str) -> HTMLResponse:
    facts, refusal = _lottery_run(dag_id, run_id)
    if refusal is not None:
        return refusal
    try:
        view = report_data.build_view(facts)
    except Exception as exc:  # a bug, not bad data: logged with its trace, the page names it only
        log.exception("report page of %s %s failed", dag_id, run_id)
        return _page(facts, None, f"The report could not be built ({type(exc).__name__}: {exc}); see the api-server log.",
                     status=500)
    return _page(facts, view)


def plot(dag_id: str, run_id: str, download: str = "") -> Response:
    view = _view_or_none(dag_id, run_id)
    if view is None or not view.rows:
        return _not_found("no results to plot")
    disposition = {"Content-Disposition": f'attachment; filename="{view.experiment_id}-accuracy_vs_sparsity.png"'} if download in ("1", "true") else {}
    drawn = report_data.report_plot_file(view)
    if drawn is not None:
        return FileResponse(drawn, media_type="image/png", headers=disposition)
    return Response(report_data.plot_png(view), media_type="image/png", headers=disposition)


def instability_plot(dag_id: str, run_id: str) -> Response:
    view = _view_or_none(dag_id, run_id)
    if view is None or not view.stability:
        return _not_found("no instability analyses")
    return Response(report_data.instability_png(view), media_type="image/png")


def results_csv(dag_id: str, run_id: str) -> Response:
    view = _view_or_none(dag_id, run_id)
    if view is None or not view.rows:
        return _not_found("no results")
    text = csv_text(SET_RESULT_COLUMNS, view.replicate_rows) if view.replicates > 1 else csv_text(RESULT_COLUMNS, view.rows)
    return Response(text, media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{view.experiment_id}-results.csv"'})


def ticket_model(dag_id: str, run_id: str, ticket: str = "") -> Response:
    view = _view_or_none(dag_id, run_id)
    if view is None or not view.rows or view.replicates > 1:  # a replicate set's models: in each replicate's work directory
        return _not_found("no tickets")
    path = report_data.ticket_file(view.facts.workdir, ticket, [report_data.spec_name(r) for r in view.rows])
    if path is None:
        log.warning("report page: refused model.keras?ticket=%r of %s %s (not a model file of this run)", ticket, dag_id, run_id)
        return _not_found("no such file")
    if ticket not in view.models:  # on disk, but it does not match its result.json (or the ticket is not done)
        damage = "; ".join(report_data.ticket_damage(view.facts.workdir, ticket)) or "the ticket has no intact result"
        log.warning("report page: refused the damaged model.keras of %s in %s %s: %s", ticket, dag_id, run_id, damage)
        return _message_page(dag_id, run_id, f"Not served: the model.keras of ticket {ticket} does not match its "
                             f"result.json ({damage}). Delete tickets/{ticket} and clear its task to train it again.", 409)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{view.experiment_id}-{ticket}-model.keras")


# ---- the run, from the metadata database -----------------------------------------------------------
def _lottery_run(dag_id: str, run_id: str) -> tuple[RunFacts | None, HTMLResponse | None]:
    """The run's facts, or the page that says why there are none (404)."""
    facts = load_facts(dag_id, run_id)
    if facts is None:
        log.warning("report page: no run %r of DAG %r", run_id, dag_id)
        return None, _message_page(dag_id, run_id, f"No run {run_id!r} of DAG {dag_id!r}.", 404)
    if dag_id != DAG_ID:
        return None, _page(facts, None, f"This is not a {DAG_ID} run: the report page is for runs of {DAG_ID} only.",
                           status=404)
    return facts, None


def _view_or_none(dag_id: str, run_id: str) -> ReportView | None:
    """The view behind a file route; None (the route answers 404) for no run, another DAG's run or a bug."""
    facts, refusal = _lottery_run(dag_id, run_id)
    if refusal is not None:
        return None
    try:
        return report_data.build_view(facts)
    except Exception:
        log.exception("report files of %s %s: the view could not be built", dag_id, run_id)
        return None


def load_facts(dag_id: str, run_id: str) -> RunFacts | None:
    """The run, its plan and work directory (XCom) and its task instances; None when there is no such run."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        if run is None:
            return None
        facts = RunFacts(dag_id, run_id, _text(run.state), run.conf if isinstance(run.conf, dict) else {})
        if dag_id != DAG_ID:
            return facts
        wanted = ("validate_config", "prepare_workdir", "plan_tickets", "plan_controls", "plan_chains", "plan_stability")
        rows = session.scalars(select(XComModel).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.map_index == -1, XComModel.task_id.in_(wanted)))
        xcom = {(x.task_id, x.key): XComModel.deserialize_value(x) for x in rows}
        tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id))
        facts.task_instances = [TaskInstanceFacts(ti.task_id, ti.map_index, _text(ti.state), ti.rendered_map_index,
                                                  ti.try_number or 0) for ti in tis]
    facts.plan = _dict(xcom.get(("validate_config", "plan")))
    prepared = _dict(xcom.get(("prepare_workdir", "return_value"))) or {}
    facts.workdir, facts.report_dir = prepared.get("workdir"), prepared.get("report_dir")
    facts.workdirs = [str(w) for w in prepared.get("workdirs") or []]
    facts.mapped_kwargs = {task: value for task, key in (("late_reset", "plan_tickets"), ("controls", "plan_controls"),
                                                             ("imp_chain", "plan_chains"), ("stability", "plan_stability"))
                           if isinstance(value := xcom_value(xcom.get((key, "return_value"))), list)}
    return facts


def _dict(value: Any) -> dict | None:
    value = xcom_value(value)
    return value if isinstance(value, dict) else None


def _text(state: Any) -> str:
    return str(getattr(state, "value", state) or "none")


# ---- rendering --------------------------------------------------------------------------------------
def _page(facts: RunFacts, view: ReportView | None, message: str = "", *, status: int = 200) -> HTMLResponse:
    title = f"Lottery-ticket experiment {view.experiment_id}" if view and view.experiment_id else "Lottery-ticket report"
    html = _TEMPLATE.render(
        title=title, facts=facts, view=view, message=message, tables=tables(view) if view else [],
        stability_lines=stability_lines(view) if view else [],
        instability_version=report_data.instability_key(view) if view and view.stability else "",
        refresh=None if facts.finished or facts.dag_id != DAG_ID else REFRESH_S,
        plot_version=report_data.plot_key(view) if view and view.rows else "",
        tolerance=f"{100 * MATCH_TOLERANCE:g}", pct=_pct, spread=spread,
        config_json=json.dumps(view.config, indent=2, sort_keys=True) if view else "",
        log_url=lambda ti: log_url(facts, ti), run_url=run_url(facts),
    )
    return HTMLResponse(html, status_code=status)


def _message_page(dag_id: str, run_id: str, message: str, status: int) -> HTMLResponse:
    html = _TEMPLATE.render(title="Lottery-ticket report", facts=RunFacts(dag_id, run_id, "unknown", {}), view=None,
                            message=message, tables=[], refresh=None)
    return HTMLResponse(html, status_code=status)


def _not_found(why: str) -> Response:
    return Response(f"Not found: {why}\n", status_code=404, media_type="text/plain")


def run_url(facts: RunFacts) -> str:
    """The run's page in the UI: its *Clear Run* button re-runs the failed tasks (Airflow's own
    action, under Airflow's own permissions)."""
    return f"{ui_base()}/dags/{quote(facts.dag_id, safe='')}/runs/{quote(facts.run_id, safe='')}"


def log_url(facts: RunFacts, ti: TaskInstanceFacts) -> str:
    """The task instance's page in the UI (its first tab is the log)."""
    url = f"{run_url(facts)}/tasks/{quote(ti.task_id, safe='')}"
    return url + (f"/mapped/{ti.map_index}" if ti.map_index >= 0 else "")


def _pct(fraction: float | None) -> str:
    return "?" if fraction is None else f"{100 * fraction:.2f}%"


def tables(view: ReportView) -> list[dict[str, Any]]:
    """The tickets table, then one per control kind: a line per sparsity level, a cell per rewind point."""
    out = []
    for control in [""] + sorted({r["control"] for r in view.rows if r["control"]}):
        subset = [r for r in view.rows if r["control"] == control]
        done = sum(r["status"] == "ok" for r in subset)
        title = f"Tickets ({done} of {len(subset)} done)" if not control else f"Control {control} ({done} of {len(subset)} done)"
        lines = [_line(view, [r for r in subset if r["mask_id"] == mask_id])
                 for mask_id in dict.fromkeys(r["mask_id"] for r in subset)]
        out.append({"title": title, "control": control, "lines": lines})
    return out


def _line(view: ReportView, cells: list[dict]) -> dict[str, Any]:
    by_rewind = {r["rewind"]: r for r in cells}
    left = next((r["remaining"] for r in cells if r["remaining"] is not None), 1 - cells[0]["sparsity"])
    return {"sparsity": _pct(cells[0]["sparsity"]), "left": _pct(left),
            "cells": [_cell(view, by_rewind.get(label)) for label in view.labels]}


def _cell(view: ReportView, row: dict | None) -> dict[str, str]:
    if row is None:
        return {"text": "", "css": "", "title": ""}
    if row["status"] != "ok":
        return {"text": row["status"], "css": row["status"], "title": row.get("error") or ""}
    dense = view.dense_accuracy
    match = dense is not None and row["val_accuracy"] >= dense - MATCH_TOLERANCE
    if "n" in row:  # a replicate set: the mean, matched on the means
        return {"text": cell_text(row), "css": "match" if match else "ok", "title": _replicate_values(row)}
    return {"text": f"{100 * row['val_accuracy']:.2f}", "css": "match" if match else "ok",
            "title": f"{report_data.spec_name(row)}: best {_pct(row.get('best_val_accuracy'))}"}


def _replicate_values(row: dict) -> str:
    """``sp50.000__0it: replicate 0 80.00%, replicate 1 failed, …``."""
    status = {d["replicate"]: d["status"] for d in row["not_done"]}
    values = [f"replicate {i} {_pct(v)}" if v is not None else f"replicate {i} {status.get(i, 'missing')}"
              for i, v in enumerate(row["values"])]
    return f"{report_data.spec_name(row)}: " + ", ".join(values)


def stability_lines(view: ReportView) -> list[dict[str, Any]]:
    """The instability table: a line per (network, rewind point), its instability (bold, green:
    stable) and the network's val accuracy there (the dense run's, or the ticket's)."""
    text = cell_text if view.replicates > 1 else (lambda r: f"{100 * r['val_accuracy']:.2f}")
    accuracy = {key: text(row) for key, row in report_data.stability_accuracy(view).items()}
    lines = []
    for row in view.stability:
        done = row["status"] == "ok"
        cells = [instability_text(row), instability_text(row, "instability_train", "train_std")] if done else [row["status"], ""]
        css = ("match" if row["instability"] < view.stability_threshold else "ok") if done else row["status"]
        lines.append({"network": network_label(row), "rewind": row["rewind"], "css": css, "title": row.get("error") or "",
                      "cells": [*cells, accuracy.get((row["network"], row["rewind"]), "")]})
    return lines

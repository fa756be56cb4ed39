"""The instability analyses in the report and the Report tab, on hand-made results (no training).

Work directories and replicate sets as tests/test_replicate_report.py fabricates them, with sealed
``stability/<network>__<rewind>/result.json`` files as `lottery.stability` writes them (the fields
the report reads), an ``error.json`` for a failed analysis, a truncated result for a damaged one.
"""

import csv
from pathlib import Path

import pytest

from lottery.config import ExperimentConfig
from lottery.files import write_json
from lottery.plan import RunPlan, StabilitySpec
from lottery.report import write_report
from lottery.stability_report import accuracy_rows, aggregate_stability, plot_instability, verdicts
from tests.test_replicate_report import BASE, make_set, make_workdir

TICKETS = {(0.5, "0it"): 0.84, (0.5, "1ep"): 0.85, (0.8, "0it"): 0.80, (0.8, "1ep"): 0.83}


def write_analysis(workdir: Path, name: str, instability: float | None, *, remaining: float | None = None) -> Path:
    """A finished analysis (``instability`` in percentage points; the training subset's is half of it),
    or a failed one (None)."""
    directory = Path(workdir, "stability", name)
    if instability is None:
        write_json(directory / "error.json", {"error": "RuntimeError: out of memory\ntrace"})
        return directory
    write_json(directory / "result.json", {
        "instability": instability, "instability_train": instability / 2, "points": 11, "rewind_step": 0,
        "remaining": remaining, "network": "ticket" if remaining else "dense",
        "endpoints": {"a": {"val_accuracy": 0.85, "val_loss": 0.4}, "b": {"val_accuracy": 0.86, "val_loss": 0.39}},
        "path": [], "files": {}, "arrays": {}}, sealed=True)
    return directory


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def stable_workdir(tmp_path: Path, **changes):
    """Dense: 3.5 points at 0it, 0.8 at 1ep (stable there); the 20%-left ticket: failed at 0it, 2.5 at 1ep."""
    cfg = ExperimentConfig.from_dict({**BASE, "controls": False, "stability_sparsities": [0.8], **changes})
    w = make_workdir(tmp_path / "lenet_300_100-w", cfg, TICKETS, dense=0.86)
    write_analysis(w.path, "dense__0it", 3.5)
    write_analysis(w.path, "dense__1ep", 0.8)
    write_analysis(w.path, "sp80.000__0it", None)
    write_analysis(w.path, "sp80.000__1ep", 2.5, remaining=0.2)
    return w, cfg


def test_the_report_has_the_instability_table_plot_csv_and_where_to_rewind(tmp_path):
    w, cfg = stable_workdir(tmp_path)
    out = write_report(w, plan=RunPlan.from_config(cfg), run_id="manual__s")
    assert out["rewind_here"] == {"dense": "1ep", "sp80.000": None}
    assert out["stability_expected"] == 4 and out["stability_done"] == 3
    assert out["stability_problems"] == ["stability 20.0% left (sp80.000), rewind 0it: failed: RuntimeError: out of memory"]
    assert out["problems"] == []  # the tickets' own problems: unchanged
    rows = read_csv(w.path / "stability.csv")
    assert [(r["network"], r["rewind"], r["status"], r["instability"]) for r in rows] == [
        ("dense", "0it", "ok", "3.5"), ("dense", "1ep", "ok", "0.8"), ("sp80.000", "0it", "failed", ""),
        ("sp80.000", "1ep", "ok", "2.5")]
    assert rows[0]["val_accuracy_a"] == "0.85" and rows[0]["points"] == "11"
    png = Path(out["instability_plot"]).read_bytes()
    assert out["instability_plot"] == str(w.path / "report" / "instability_vs_rewind.png") and png[:4] == b"\x89PNG"
    assert len(png) > 10_000
    assert int.from_bytes(png[16:20], "big") == 13 * 120  # two panels: the instability, the accuracy beside it
    md = Path(out["report"]).read_text()
    assert "## Instability (3 of 4 analyses done)" in md and "![instability vs rewind point](instability_vs_rewind.png)" in md
    assert "| dense network | 0it | 3.50 | 1.75 | 86.00 |" in md
    assert "| dense network | 1ep | **0.80** | 0.40 | 86.00 |" in md  # stable: below 2 points
    assert "| 20.0% left | 0it | failed |  | 80.00 |" in md and "| 20.0% left | 1ep | 2.50 | 1.25 | 83.00 |" in md
    assert ("- **dense network**: rewind here: **1ep**, the earliest rewind point whose instability is below 2 points "
            "(0.80).") in md
    assert ("- **20.0% left** (`sp80.000`): no rewind point is stable: the instability is at least 2 points at every one "
            "done (1 of 2; lowest 2.50 at 1ep). Not done at 0it: an earlier rewind point may be stable too.") in md
    assert "- stability 20.0% left (sp80.000), rewind 0it: failed: RuntimeError: out of memory" in md
    assert md.index("## Instability") < md.index("## Failed or missing (0)")


def test_the_threshold_is_the_runs(tmp_path):
    """The plan's stability_threshold judges (a work directory's config.json keeps the first run's)."""
    w, cfg = stable_workdir(tmp_path)
    out = write_report(w, plan=RunPlan.from_config(cfg.replace(stability_threshold=0.5)))
    assert out["rewind_here"] == {"dense": None, "sp80.000": None}
    md = Path(out["report"]).read_text()
    assert "- **dense network**: no rewind point is stable: the instability is at least 0.5 points" in md
    assert "| dense network | 1ep | 0.80 |" in md
    out = write_report(w, plan=RunPlan.from_config(cfg.replace(stability_threshold=4.0)))
    assert out["rewind_here"] == {"dense": "0it", "sp80.000": "1ep"}


def test_planned_analyses_are_expected_found_ones_are_reported(tmp_path):
    """With the run's plan, the analyses it asks for are expected (missing ones listed); without one
    (the CLI), only those with a directory; none at all: no section, no files."""
    cfg = ExperimentConfig.from_dict(BASE)
    w = make_workdir(tmp_path / "w", cfg, TICKETS, dense=0.86)
    out = write_report(w)
    assert out["stability_expected"] == 0 and out["stability_csv"] is None and out["rewind_here"] == {}
    assert not (w.path / "stability.csv").exists() and "## Instability" not in Path(out["report"]).read_text()
    out = write_report(w, plan=RunPlan.from_config(cfg))  # stability is on by default: the dense network
    assert out["stability_problems"] == ["stability dense network, rewind 0it: missing",
                                         "stability dense network, rewind 1ep: missing"]
    md = Path(out["report"]).read_text()
    assert "## Instability (0 of 2 analyses done)" in md and "- **dense network**: no instability result yet." in md
    assert write_report(w, plan=RunPlan.from_config(cfg.replace(stability=False)))["stability_expected"] == 0
    write_analysis(w.path, "sp50.000__1ep", 1.0, remaining=0.5)  # run by hand: reported, planned or not
    out = write_report(w)
    assert out["rewind_here"] == {"sp50.000": "1ep"} and out["stability_problems"] == []


def test_a_damaged_result_is_named_and_the_report_still_written(tmp_path):
    w, cfg = stable_workdir(tmp_path)
    result = w.path / "stability" / "dense__1ep" / "result.json"
    result.write_text(result.read_text()[:30])
    out = write_report(w, plan=RunPlan.from_config(cfg))
    assert out["rewind_here"]["dense"] is None
    (damaged,) = [p for p in out["stability_problems"] if "dense" in p]
    assert damaged.startswith("stability dense network, rewind 1ep: corrupt: ") and "not valid JSON" in damaged


def test_the_verdicts_follow_the_rewind_points_in_order():
    def row(rewind, value, status="ok", network="dense"):
        return {"network": network, "mask_id": "", "sparsity": None, "remaining": 1.0, "rewind": rewind, "status": status,
                "instability": value}

    rows = [row("2ep", 0.1), row("0it", 5.0), row("1ep", 1.9), row("100it", None, "missing")]
    verdict = verdicts(rows, ["0it", "100it", "1ep", "2ep"], 2.0)["dense"]
    assert verdict["rewind"] == "1ep" and verdict["before"] == ["100it"] and verdict["done"] == 3
    assert verdicts(rows, ["0it", "100it", "1ep", "2ep"], 1.9)["dense"]["rewind"] == "2ep"  # below, not at


def test_aggregate_counts_only_the_replicates_done():
    def row(value, status="ok"):
        return {"network": "dense", "mask_id": "", "sparsity": None, "remaining": 1.0, "rewind": "0it", "status": status,
                "instability": value, "instability_train": value, "error": "" if status == "ok" else "boom"}

    (combined,) = aggregate_stability([[row(1.0)], [row(None, "failed")], [row(2.0)]])
    assert combined["instability"] == pytest.approx(1.5) and combined["std"] == pytest.approx(0.7071067811)
    assert combined["n"] == 2 and combined["replicates"] == 3 and combined["values"] == [1.0, None, 2.0]
    assert combined["not_done"] == [{"replicate": 1, "status": "failed", "error": "boom"}]


def test_a_replicate_sets_report_shows_mean_std_and_judges_the_means(tmp_path):
    per = [TICKETS] * 3
    s = make_set(tmp_path, per, [0.86, 0.87, 0.88])
    for i, (early, late) in enumerate([(3.0, 1.0), (4.0, 1.5), (5.0, None)]):
        write_analysis(tmp_path / f"lenet_300_100-r{i}", "dense__0it", early)
        if late is not None:
            write_analysis(tmp_path / f"lenet_300_100-r{i}", "dense__1ep", late)
    out = write_report(s)
    assert out["rewind_here"] == {"dense": "1ep"} and out["stability_expected"] == 6 and out["stability_done"] == 5
    assert out["stability_problems"] == ["replicate 2 (lenet_300_100-r2): stability dense network, rewind 1ep: missing"]
    rows = read_csv(s / "stability.csv")
    assert [(r["replicate"], r["experiment_id"], r["rewind"], r["status"]) for r in rows] == [
        (str(i), f"lenet_300_100-r{i}", rewind, "missing" if (i, rewind) == (2, "1ep") else "ok")
        for i in range(3) for rewind in ("0it", "1ep")]
    md = Path(out["report"]).read_text()
    assert "## Instability (5 of 6 analyses done)" in md
    assert "| dense network | 0it | 4.00 ± 1.00 (3) | 2.00 ± 0.50 (3) | 87.00 ± 1.00 (3) |" in md
    assert "| dense network | 1ep | **1.25 ± 0.35 (2)** | 0.62 ± 0.18 (2) | 87.00 ± 1.00 (3) |" in md
    assert "rewind here: **1ep**, the earliest rewind point whose instability is below 2 points (1.25 ± 0.35 (2))" in md
    assert Path(out["instability_plot"]).read_bytes()[:4] == b"\x89PNG"
    own = (tmp_path / "lenet_300_100-r2" / "report" / "report.md").read_text()  # each replicate's own report
    assert "## Instability (1 of 2 analyses done)" in own and "rewind here: **0it**" not in own


# ---- the Report tab ----------------------------------------------------------------------------------
def _facts(w, cfg, state="success"):
    from lottery.ui.report_data import RunFacts

    return RunFacts("lottery_ticket", "manual__s", state, {}, plan={"config": cfg.to_dict()}, workdir=str(w),
                    report_dir=str(w), workdirs=[str(w)])


def test_the_report_tab_shows_the_instability_table_plot_and_where_to_rewind(tmp_path):
    from lottery.ui import report_data, report_page

    w, cfg = stable_workdir(tmp_path)
    view = report_data.build_view(_facts(w.path, cfg))
    assert [(r["network"], r["rewind"], r["status"]) for r in view.stability] == [
        ("dense", "0it", "ok"), ("dense", "1ep", "ok"), ("sp80.000", "0it", "failed"), ("sp80.000", "1ep", "ok")]
    assert view.rewind_here[0] == ("dense network: rewind here: 1ep, the earliest rewind point whose instability is "
                                   "below 2 points (0.80).")
    lines = report_page.stability_lines(view)
    assert [(line["network"], line["rewind"], line["cells"]) for line in lines][1] == ("dense network", "1ep", ["0.80", "0.40", "86.00"])
    assert lines[1]["css"] == "match" and lines[2]["css"] == "failed"
    html = report_page._page(view.facts, view).body.decode()  # noqa: SLF001 - the route's own rendering
    assert 'id="table-stability"' in html and 'src="instability.png?v=' in html and "rewind here: 1ep" in html
    assert "Instability (3 of 4 analyses done)" in html and "below 2 points, stable" in html
    assert report_data.instability_png(view)[:4] == b"\x89PNG"


def test_the_report_tab_names_a_damaged_analysis_and_shows_the_rest(tmp_path):
    from lottery.ui import report_data, report_page

    w, cfg = stable_workdir(tmp_path)
    (w.path / "stability" / "dense__0it" / "result.json").write_text("{")
    view = report_data.build_view(_facts(w.path, cfg, "running"))
    assert [c.split(":")[0] for c in view.corrupt] == ["stability/dense__0it"]
    assert [r["status"] for r in view.stability] == ["corrupt", "ok", "failed", "ok"]
    assert "86.00" in report_page._page(view.facts, view).body.decode()  # noqa: SLF001


def test_the_report_tab_expects_what_the_run_planned(tmp_path):
    """A finished run expects the analyses its plan_stability planned; a finished run without that
    XCom (older than the analysis, or stopped before it) shows only those on disk."""
    from lottery.ui import report_data

    cfg = ExperimentConfig.from_dict({**BASE, "controls": False})
    w = make_workdir(tmp_path / "w", cfg, TICKETS, dense=0.86)
    assert report_data.build_view(_facts(w.path, cfg)).stability == []
    planned = _facts(w.path, cfg)
    planned.mapped_kwargs["stability"] = [{"workdir": str(w.path), "rewind": r, "mask": None, "points": 11,
                                           "group": f"dense, rewind {r}"} for r in ("0it", "1ep")]
    assert [(r["rewind"], r["status"]) for r in report_data.build_view(planned).stability] == [("0it", "missing"), ("1ep", "missing")]
    write_analysis(w.path, "dense__1ep", 1.0)
    assert [(r["rewind"], r["status"]) for r in report_data.build_view(_facts(w.path, cfg)).stability] == [("1ep", "ok")]


def test_the_report_tab_of_a_set_shows_the_means(tmp_path):
    from lottery.ui import report_data
    from lottery.ui.report_data import RunFacts

    s = make_set(tmp_path, [TICKETS] * 2, [0.86, 0.88])
    for i, value in enumerate((1.0, 2.0)):
        write_analysis(tmp_path / f"lenet_300_100-r{i}", "dense__0it", value)
    workdirs = [str(tmp_path / f"lenet_300_100-r{i}") for i in range(2)]
    facts = RunFacts("lottery_ticket", "m", "running", {}, plan={"config": {**BASE, "replicates": 2}}, workdir=workdirs[0],
                     report_dir=str(s), workdirs=workdirs)
    view = report_data.build_view(facts)
    first = view.stability[0]
    assert (first["rewind"], first["instability"], first["n"]) == ("0it", pytest.approx(1.5), 2)
    assert [r["status"] for r in view.stability] == ["ok", "queued"]  # the run is in progress
    assert view.rewind_here == ["dense network: rewind here: 0it, the earliest rewind point whose instability is below "
                                "2 points (1.50 ± 0.71 (2))."]


def test_stability_specs_name_their_directories():
    assert StabilitySpec(None, "1ep").name == "dense__1ep" and StabilitySpec("sp89.263", "1ep").name == "sp89.263__1ep"
    assert StabilitySpec.from_name("dense__1ep") == StabilitySpec(None, "1ep")
    assert StabilitySpec.from_name("sp89.263__2ep") == StabilitySpec("sp89.263", "2ep")
    assert StabilitySpec.from_name("junk") is None and StabilitySpec.from_name("a__b__c") is None


def test_the_accuracy_beside_an_analysis_is_the_ticket_s_at_its_rewind_point_and_the_dense_run_s():
    tickets = [{"mask_id": "sp80.000", "rewind": "0it", "control": None, "status": "ok", "val_accuracy": 0.80},
               {"mask_id": "sp80.000", "rewind": "1ep", "control": None, "status": "failed", "val_accuracy": None},
               {"mask_id": "sp80.000", "rewind": "1ep", "control": "random_reinit", "status": "ok", "val_accuracy": 0.7}]
    rows = accuracy_rows(tickets, ["0it", "1ep"], {"val_accuracy": 0.86})
    assert {k: r["val_accuracy"] for k, r in rows.items()} == {
        ("sp80.000", "0it"): 0.80, ("dense", "0it"): 0.86, ("dense", "1ep"): 0.86}
    assert accuracy_rows(tickets, ["0it"], None).keys() == {("sp80.000", "0it")}


def test_without_accuracy_the_plot_has_one_panel(tmp_path):
    rows = [{"network": "dense", "mask_id": None, "rewind": "0it", "status": "ok", "instability": 1.0, "remaining": None}]
    png = plot_instability(rows, ["0it"], 2.0, tmp_path / "p.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") == 8 * 120

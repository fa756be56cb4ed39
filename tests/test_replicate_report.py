"""The report over replicates and the comparison of experiments, on hand-made results (no training).

A replicate set as the engine leaves it: ``ReplicateSet.prepare`` (replicates.json) over work
directories with config.json, run.json, a sealed dense result.json and sealed ticket result.json
files (some replicates failed or missing)."""

import csv
from pathlib import Path

import pytest

from lottery.config import ExperimentConfig
from lottery.files import output_records, write_json
from lottery.paths import FORMAT_VERSION, ReplicateSet, Workdir
from lottery.plan import TicketSpec, mask_id
from lottery.replicate_report import aggregate, load_results, stats
from lottery.report import format_table, result_rows, write_report

SPARSITIES = [0.5, 0.8]
REWINDS = ["0it", "1ep"]
BASE = {"training_steps": "2ep", "lr_milestones": [], "rewind_points": REWINDS, "sparsities": SPARSITIES}


def make_workdir(path: Path, cfg: ExperimentConfig, accuracies: dict, *, dense: float | None, dataset_id: str = "d1",
                 fail=()) -> Workdir:
    """``accuracies``: (sparsity, rewind[, control]) -> val accuracy; a pair left out is missing, one in
    ``fail`` failed. Each result records the model.keras beside it, as the engine's do."""
    write_json(path / "config.json", cfg.to_dict())
    write_json(path / "run.json", {"experiment_id": path.name, "data_dir": "/data/x", "dataset_id": dataset_id,
                                   "format_version": FORMAT_VERSION})
    if dense is not None:
        (path / "dense").mkdir(parents=True)
        (path / "dense" / "final.keras").write_bytes(b"dense model of " + path.name.encode())
        write_json(path / "dense" / "result.json", {"val_accuracy": dense, "best_val_accuracy": dense, "epochs": 2,
                                                    **output_records(path / "dense", ["final.keras"])}, sealed=True)
    for key, acc in accuracies.items():
        s, r, control = (*key, None)[:3]
        ticket = path / "tickets" / TicketSpec(mask_id(s), r, control).name
        if key in fail:
            write_json(ticket / "error.json", {"error": "CorruptArtifactError: bad checksum\ntrace"})
            continue
        ticket.mkdir(parents=True)
        (ticket / "model.keras").write_bytes(b"model of " + ticket.name.encode())
        write_json(ticket / "result.json", {"val_accuracy": acc, "best_val_accuracy": acc + 0.001, "remaining": 1 - s,
                                            "rewind_step": 0 if r == "0it" else 10, "sparsity": s, "rewind": r,
                                            "control": control, "mask_id": mask_id(s),
                                            **output_records(ticket, ["model.keras"])}, sealed=True)
    return Workdir(path)


def make_set(root: Path, per_replicate: list[dict], dense: list[float | None], *, fail=None, **changes) -> Path:
    """A replicate set of ``len(per_replicate)`` replicates; ``fail``: replicate index -> failed pairs."""
    cfg = ExperimentConfig.from_dict({**BASE, **changes, "replicates": len(per_replicate)})
    workdirs = [make_workdir(root / f"lenet_300_100-r{i}", cfg.replicate(i), accs, dense=dense[i], fail=(fail or {}).get(i, ()))
                for i, accs in enumerate(per_replicate)]
    return ReplicateSet(root / "lenet_300_100-r0-x3").prepare(cfg, workdirs).path


def three_replicates(root: Path, **kwargs) -> Path:
    """Every ticket at 0.80, 0.82 and 0.84 (+ 0.01 for 1ep, - 0.1 x sparsity): mean 0.82, std 0.02 at the base."""
    per = [{(s, r): base + (0.01 if r == "1ep" else 0) - 0.1 * s for s in SPARSITIES for r in REWINDS}
           for base in (0.80, 0.82, 0.84)]
    return make_set(root, per, [0.86, 0.87, 0.88], **kwargs)


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ---- the statistics ------------------------------------------------------------------------------
def test_stats_mean_and_sample_standard_deviation():
    assert stats([0.80, 0.82, 0.84]) == pytest.approx({"mean": 0.82, "std": 0.02, "n": 3})
    assert stats([0.80, None, 0.84]) == pytest.approx({"mean": 0.82, "std": 0.0282842712, "n": 2})  # n - 1
    assert stats([0.8]) == {"mean": 0.8, "std": None, "n": 1}  # one value: no sample spread, not 0
    assert stats([None, None]) == {"mean": None, "std": None, "n": 0}


def test_aggregate_counts_only_the_replicates_done():
    def row(acc, status="ok", error=""):
        return {"mask_id": "sp50.000", "sparsity": 0.5, "remaining": 0.5, "rewind": "0it", "control": "", "status": status,
                "val_accuracy": acc, "best_val_accuracy": acc, "error": error}

    (combined,) = aggregate([[row(0.80)], [row(None, "failed", "OOM")], [row(0.84)]])
    assert combined["val_accuracy"] == pytest.approx(0.82) and combined["n"] == 2 and combined["replicates"] == 3
    assert combined["status"] == "ok" and combined["values"] == [0.80, None, 0.84]
    assert combined["not_done"] == [{"replicate": 1, "status": "failed", "error": "OOM"}]
    (nothing,) = aggregate([[row(None, "missing")], [row(None, "failed", "OOM")], []])
    assert nothing["n"] == 0 and nothing["val_accuracy"] is None and nothing["status"] == "failed"
    assert [d["status"] for d in nothing["not_done"]] == ["missing", "failed", "missing"]  # absent from a replicate: missing


# ---- the set's report ------------------------------------------------------------------------------
def test_set_report_mean_std_files_and_problems(tmp_path):
    s = three_replicates(tmp_path, fail={1: {(0.8, "1ep")}})
    out = write_report(s, run_id="manual__set")
    summary = {(r["mask_id"], r["rewind"]): r for r in read_csv(s / "summary.csv")}
    base = summary[(mask_id(0.5), "0it")]
    assert float(base["mean_val_accuracy"]) == pytest.approx(0.82 - 0.05) and float(base["std_val_accuracy"]) == pytest.approx(0.02)
    assert base["n"] == "3" and base["replicates"] == "3" and base["not_done"] == ""
    failed = summary[(mask_id(0.8), "1ep")]
    assert failed["n"] == "2" and failed["not_done"] == "1:failed"
    assert float(failed["mean_val_accuracy"]) == pytest.approx(0.82 + 0.01 - 0.08)  # of replicates 0 and 2
    rows = read_csv(out["results_csv"])
    assert len(rows) == 3 * 4 and list(rows[0])[:2] == ["replicate", "experiment_id"]
    assert {(r["replicate"], r["experiment_id"]) for r in rows} == {(str(i), f"lenet_300_100-r{i}") for i in range(3)}
    assert out["expected"] == 12 and out["done"] == 11 and out["replicates"] == 3 and out["combinations"] == 4
    assert out["problems"] == [f"replicate 1 (lenet_300_100-r1): {mask_id(0.8)} (20.0% left), rewind 1ep: failed: "
                               "CorruptArtifactError: bad checksum"]
    assert out["dense_val_accuracy"] == pytest.approx(0.87) and out["dense_std"] == pytest.approx(0.01)
    md = Path(out["report"]).read_text()
    assert md.startswith("# Lottery-ticket experiment `lenet_300_100-r0-x3`: 3 replicates")
    assert "| 50.00% | 50.0% | 77.00 ± 2.00 (3) | 78.00 ± 2.00 (3) |" in md
    assert "| 80.00% | 20.0% | 74.00 ± 2.00 (3) | 75.00 ± 2.83 (2) |" in md
    assert "**Dense network**: val accuracy (%) 87.00 ± 1.00 (3)" in md and "manual__set" in md
    assert "## Failed or missing (1)" in md and "replicate 1 (lenet_300_100-r1): sp80.000" in md
    png = Path(out["plot"]).read_bytes()
    assert out["plot"] == str(s / "report" / "accuracy_vs_sparsity.png") and png[:4] == b"\x89PNG" and len(png) > 10_000
    for i, own in enumerate(out["replicate_reports"]):  # each replicate's own report, in its work directory
        assert own == str(tmp_path / f"lenet_300_100-r{i}" / "report" / "report.md") and Path(own).is_file()
        assert (tmp_path / f"lenet_300_100-r{i}" / "results.csv").is_file()


def test_matching_is_judged_on_the_means(tmp_path):
    """A ticket matches when its mean is within the tolerance of the dense mean, whatever single
    replicates do: 0.86 / 0.875 / 0.89 matches the dense 0.88 (mean 0.875); 0.89 / 0.84 / 0.84 does
    not (mean 0.857), though its first replicate alone is above the dense network."""
    values = {(0.5, "0it"): (0.86, 0.875, 0.89), (0.8, "0it"): (0.89, 0.84, 0.84)}
    per = [{key: v[i] for key, v in values.items()} for i in range(3)]
    s = make_set(tmp_path, per, [0.875, 0.88, 0.885], rewind_points=["0it"])
    out = write_report(s)
    assert out["matching"]["0it"] == {"matching": 1, "done": 2, "sparsest_mask_id": mask_id(0.5), "sparsest_remaining": 0.5}
    md = Path(out["report"]).read_text()
    assert "| 50.00% | 50.0% | **87.50 ± 1.50 (3)** |" in md and "| 80.00% | 20.0% | 85.67 ± 2.89 (3) |" in md
    assert ("rewind 0it: 1 of 2 levels match; the sparsest matching ticket keeps 50.0% of the weights "
            "(`sp50.000`: 87.50 ± 1.50 (3) against the dense 88.00 ± 0.50 (3))") in md


def test_one_replicate_without_results(tmp_path):
    """A replicate with no dense run and no tickets: means over the others, each of its tickets a problem."""
    per = [{(s, r): 0.8 for s in SPARSITIES for r in REWINDS}, {}, {(s, r): 0.82 for s in SPARSITIES for r in REWINDS}]
    s = make_set(tmp_path, per, [0.85, None, 0.87])
    out = write_report(s)
    assert out["dense_val_accuracy"] == pytest.approx(0.86) and out["done"] == 8 and len(out["problems"]) == 4
    assert all(p.startswith("replicate 1 (lenet_300_100-r1): ") and p.endswith(": missing") for p in out["problems"])
    md = Path(out["report"]).read_text()
    assert "| 1 | 1 | `lenet_300_100-r1` | not trained | 0 of 4 |" in md
    assert "81.00 ± 1.41 (2)" in md


def test_the_entry_points_read_a_set(tmp_path):
    s = three_replicates(tmp_path)
    rows = result_rows(s)
    assert len(rows) == 12 and rows[0]["replicate"] == 0 and rows[-1]["experiment_id"] == "lenet_300_100-r2"
    table = format_table(s, rows)
    assert "77.00 ± 2.00 (3)" in table and "dense network: 87.00 ± 1.00 (3)" in table
    assert format_table(s) == table
    results = load_results(s)
    assert results.replicates == 3 and results.run_info["dataset_id"] == "d1"


def test_a_work_directory_alone_is_one_replicate(tmp_path):
    cfg = ExperimentConfig.from_dict(BASE)
    w = make_workdir(tmp_path / "w", cfg, {(0.5, "0it"): 0.8}, dense=0.85)
    (row, *_) = load_results(w).summary
    assert row["n"] == 1 and row["std"] is None and row["replicates"] == 1


def test_cli_report_and_summarize_on_a_set(tmp_path, capsys):
    import json

    from lottery.cli import main

    s = three_replicates(tmp_path)
    assert main(["report", "--workdir", str(s)]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(s / "report" / "report.md")
    assert main(["summarize", "--workdir", str(s)]) == 0
    printed = capsys.readouterr().out
    assert "77.00 ± 2.00 (3)" in printed and f"wrote {s / 'results.csv'}" in printed and (s / "summary.csv").is_file()


# ---- comparing experiments ------------------------------------------------------------------------
def two_schedules(root: Path, **second) -> tuple[Path, Path]:
    """A one-shot work directory and an iterative replicate set of the same model and data."""
    one_shot = make_workdir(root / "lenet_300_100-oneshot", ExperimentConfig.from_dict(BASE),
                            {(s, r): 0.85 - 0.05 * s for s in SPARSITIES for r in REWINDS}, dense=0.86).path
    per = [{(s, r): base - 0.02 * s for s in SPARSITIES for r in REWINDS} for base in (0.84, 0.86, 0.88)]
    iterative = make_set(root / "iterative", per, [0.85, 0.86, 0.87], pruning_schedule="iterative", **second)
    return one_shot, iterative


def test_compare_writes_the_plot_and_table_labelled_by_what_differs(tmp_path):
    from lottery.report import compare

    one_shot, iterative = two_schedules(tmp_path, rewind_mode="weights")
    out = compare([one_shot, iterative], tmp_path / "cmp")
    assert out["plot"] == str(tmp_path / "cmp" / "comparison.png") and out["table"] == str(tmp_path / "cmp" / "comparison.md")
    assert Path(out["plot"]).read_bytes()[:4] == b"\x89PNG" and Path(out["plot"]).stat().st_size > 10_000
    labels = [e["label"] for e in out["experiments"]]
    assert labels == ["pruning_schedule=one_shot, rewind_mode=full", "pruning_schedule=iterative, rewind_mode=weights"]
    assert [e["replicates"] for e in out["experiments"]] == [1, 3]
    md = Path(out["table"]).read_text()
    assert "| sparsity | weights left | pruning_schedule=one_shot, rewind_mode=full | pruning_schedule=iterative, rewind_mode=weights |" in md
    assert "| 50.00% | 50.0% | 82.50 ± – (1) | **85.00 ± 2.00 (3)** |" in md  # 0.825 < 0.86 - 0.01; 0.85 >= 0.86 - 0.01
    assert "## Rewind 0it" in md and "## Rewind 1ep" in md and "| 3 | 86.00 ± 1.00 (3) |" in md and "| 1 | 86.00 ± – (1) |" in md
    only = compare([one_shot, iterative], tmp_path / "cmp1", rewinds=["1ep"])
    assert "## Rewind 0it" not in Path(only["table"]).read_text()


def test_compare_refuses_other_models_and_data_sets(tmp_path):
    from lottery.errors import NotComparableError
    from lottery.report import compare

    one_shot, _ = two_schedules(tmp_path)
    conv = make_workdir(tmp_path / "conv2-x", ExperimentConfig.from_dict({**BASE, "model": "conv2"}), {(0.5, "0it"): 0.7}, dense=0.8).path
    with pytest.raises(NotComparableError, match=f"cannot compare {one_shot} \\(model lenet_300_100\\) with {conv} \\(model conv2\\)"):
        compare([one_shot, conv], tmp_path / "cmp")
    other_data = make_workdir(tmp_path / "lenet_300_100-d2", ExperimentConfig.from_dict(BASE), {(0.5, "0it"): 0.7}, dense=0.8,
                              dataset_id="d2").path
    with pytest.raises(NotComparableError, match=f"{one_shot} \\(data set d1\\) with {other_data} \\(data set d2\\)"):
        compare([one_shot, other_data], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


def test_labels_of_the_same_config_are_the_directory_names():
    from lottery.compare import experiment_labels

    cfg = ExperimentConfig.from_dict(BASE)
    assert experiment_labels([cfg, cfg], ["a", "b"]) == ["a", "b"]
    assert experiment_labels([cfg, cfg.replace(seed=3), cfg.replace(seed=3)], ["a", "b", "c"]) == ["seed=0", "seed=3 (b)", "seed=3 (c)"]
    assert experiment_labels([cfg, cfg.replace(sparsities=[0.2, 0.5, 0.8, 0.9, 0.95])], ["a", "b"]) == [
        "sparsities=0.5,0.8", "sparsities=5 levels to 0.95"]


def test_cli_compare(tmp_path, capsys):
    import json

    from lottery.cli import main

    one_shot, iterative = two_schedules(tmp_path)
    assert main(["report", "--compare", str(one_shot), str(iterative), "--out", str(tmp_path / "cmp")]) == 0
    assert json.loads(capsys.readouterr().out)["table"] == str(tmp_path / "cmp" / "comparison.md")
    conv = make_workdir(tmp_path / "conv2-x", ExperimentConfig.from_dict({**BASE, "model": "conv2"}), {(0.5, "0it"): 0.7}, dense=0.8).path
    assert main(["report", "--compare", str(one_shot), str(conv), "--out", str(tmp_path / "cmp2")]) == 2
    assert "error: cannot compare" in capsys.readouterr().err
    assert main(["report", "--compare", str(one_shot), str(iterative)]) == 2
    assert "error: --compare needs --out DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one or the other
        main(["report", "--workdir", str(one_shot), "--compare", str(one_shot), str(iterative), "--out", str(tmp_path)])


# ---- the Report tab of a run with replicates ------------------------------------------------------
def set_facts(s: Path, state: str = "failed", **kwargs):
    from lottery.ui.report_data import RunFacts

    workdirs = [str(s.parent / f"lenet_300_100-r{i}") for i in range(3)]
    plan = {"config": {**BASE, "replicates": 3, "controls": False}}
    return RunFacts("lottery_ticket", "manual__set", state, {}, plan=plan, workdir=workdirs[0], report_dir=str(s),
                    workdirs=workdirs, **kwargs)


def test_report_tab_of_a_set_shows_mean_std_n_and_names_the_replicates(tmp_path):
    from lottery.ui import report_data, report_page

    s = three_replicates(tmp_path, fail={1: {(0.8, "1ep")}})
    view = report_data.build_view(set_facts(s))
    assert view.replicates == 3 and view.experiment_id == s.name and view.corrupt == [] and view.notice == ""
    assert view.dense_accuracy == pytest.approx(0.87) and view.dense_std == pytest.approx(0.01)
    assert view.done == 11 and view.expected == 12 and len(view.replicate_rows) == 12
    (table,) = report_page.tables(view)
    cells = [[c["text"] for c in line["cells"]] for line in table["lines"]]
    assert cells == [["77.00 ± 2.00 (3)", "78.00 ± 2.00 (3)"], ["74.00 ± 2.00 (3)", "75.00 ± 2.83 (2)"]]
    assert table["lines"][1]["cells"][1]["title"] == "sp80.000__1ep: replicate 0 73.00%, replicate 1 failed, replicate 2 77.00%"
    assert [(p.what, p.status) for p in view.problems] == [
        ("replicate 1 (lenet_300_100-r1): sp80.000 (20.00% left), rewind 1ep", "failed")]
    html = report_page._page(view.facts, view).body.decode()  # noqa: SLF001 - the route's own rendering
    assert "87.00 ± 1.00 (3)" in html and "77.00 ± 2.00 (3)" in html and 'id="replicate-dirs"' in html
    assert view.models == []  # each replicate's models: in its own work directory


def test_report_tab_of_a_set_uses_the_reports_plot_until_a_result_changes(tmp_path):
    import os

    from lottery.ui import report_data

    s = three_replicates(tmp_path)
    view = report_data.build_view(set_facts(s, "success"))
    assert report_data.report_plot_file(view) is None  # no report yet: drawn
    assert report_data.plot_png(view)[:4] == b"\x89PNG"
    write_report(s, plan=None)
    assert report_data.report_plot_file(view) == (s / "report" / "accuracy_vs_sparsity.png").resolve()
    later = (s / "report" / "accuracy_vs_sparsity.png").stat().st_mtime + 10
    os.utime(tmp_path / "lenet_300_100-r2" / "tickets" / "sp50.000__0it" / "result.json", (later, later))
    assert report_data.report_plot_file(view) is None


def test_report_tab_of_a_set_in_progress_damaged_or_gone(tmp_path):
    from lottery.ui import report_data

    per = [{(s, r): 0.8 for s in SPARSITIES for r in REWINDS} for _ in range(2)] + [{(0.5, "0it"): 0.8}]
    s = make_set(tmp_path, per, [0.85, 0.86, None])
    (tmp_path / "lenet_300_100-r1" / "tickets" / "sp50.000__0it" / "model.keras").write_bytes(b"x")
    view = report_data.build_view(set_facts(s, "running"))
    assert view.corrupt == ["replicate 1 (lenet_300_100-r1): tickets/sp50.000__0it: model.keras: 1 bytes, result.json says 22"]
    assert [(p.what, p.status) for p in view.problems] == [
        ("replicate 1 (lenet_300_100-r1): sp50.000 (50.00% left), rewind 0it", "corrupt")]
    assert [p.what for p in view.waiting] == [f"{m} ({left} left), rewind {r}, replicate 2" for m, left, r in (
        ("sp50.000", "50.00%", "1ep"), ("sp80.000", "20.00%", "0it"), ("sp80.000", "20.00%", "1ep"))]
    first = view.rows[0]
    assert first["n"] == 2 and first["values"] == [0.8, None, 0.8] and view.dense["n"] == 2
    finished = report_data.build_view(set_facts(s, "failed"))
    assert not finished.waiting and sum(p.status == "missing" for p in finished.problems) == 3
    gone = report_data.build_view(set_facts(tmp_path / "nowhere"))
    assert "no longer exists" in gone.notice and gone.rows == []


def test_report_tab_of_one_replicate_is_the_work_directorys(tmp_path):
    from lottery.ui import report_data
    from lottery.ui.report_data import RunFacts

    w = make_workdir(tmp_path / "w", ExperimentConfig.from_dict(BASE), {(0.5, "0it"): 0.8}, dense=0.85)
    facts = RunFacts("lottery_ticket", "r", "success", {}, workdir=str(w), report_dir=str(w), workdirs=[str(w)])
    view = report_data.build_view(facts)
    assert view.replicates == 1 and "n" not in view.rows[0] and view.done == 1

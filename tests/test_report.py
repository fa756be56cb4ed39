"""lottery.report on a hand-made work directory (no training, no TensorFlow)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lottery.config import ExperimentConfig
from lottery.files import write_json
from lottery.paths import FORMAT_VERSION
from lottery.plan import RunPlan, TicketSpec, mask_id
from lottery.report import accuracy_table, matching_levels, write_report


def ticket_name(mid, rewind, control=None):
    return TicketSpec(mid, rewind, control).name

ROOT = Path(__file__).resolve().parents[1]
SPARSITIES = [0.5, 0.8, 0.95]
REWINDS = ["0it", "1ep"]


def _write(path: Path, data) -> None:
    """As the engine writes it: a result sealed, any other JSON plain."""
    write_json(path, data, sealed=path.name == "result.json")


def make_workdir(tmp_path: Path, *, dense=0.88, fail=(), skip=(), controls=()) -> Path:
    """A work dir as the engine leaves it: config, dense result, tickets (some failed or missing)."""
    cfg = ExperimentConfig.from_dict({"training_steps": "2ep", "lr_milestones": [], "rewind_points": REWINDS, "sparsities": SPARSITIES})
    w = tmp_path / "lenet_300_100-abc"
    _write(w / "config.json", cfg.to_dict())
    _write(w / "run.json", {"experiment_id": w.name, "data_dir": "/data/x", "dataset_id": "d1", "format_version": FORMAT_VERSION})
    if dense is not None:
        _write(w / "dense" / "result.json", {"val_accuracy": dense, "best_val_accuracy": dense + 0.001, "epochs": 2})
    for s in SPARSITIES:
        for r in REWINDS:
            for control in [None, *controls]:
                name = ticket_name(mask_id(s), r, control)
                if (s, r, control) in skip:
                    continue
                if (s, r, control) in fail:
                    _write(w / "tickets" / name / "error.json", {"error": "CorruptArtifactError: bad checksum\ntrace", "traceback": "..."})
                    continue
                # sparser = worse; later rewind = better; controls much worse
                acc = dense + 0.005 - 0.02 * s * s + (0.004 if r == "1ep" else 0.0) - (0.1 if control else 0.0)
                _write(w / "tickets" / name / "result.json", {
                    "val_accuracy": acc, "best_val_accuracy": acc + 0.002, "remaining": 1 - s, "rewind_step": 0 if r == "0it" else 10,
                    "sparsity": s, "rewind": r, "control": control, "mask_id": mask_id(s),
                })
    return w


def test_write_report_all_done(tmp_path):
    w = make_workdir(tmp_path)
    out = write_report(w)
    for key in ("results_csv", "plot", "report"):
        assert Path(out[key]).is_file(), key
    assert out["expected"] == 6 and out["done"] == 6 and out["problems"] == []
    with open(out["results_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    png = Path(out["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = Path(out["report"]).read_text()
    assert "Dense network**: val accuracy 88.00%" in md
    assert "| 50.00% | 50.0% |" in md and "| 95.00% | 5.0% |" in md
    assert "accuracy_vs_sparsity.png" in md
    assert "None: every combination finished." in md
    # 0.88 + 0.005 - 0.02 * 0.95**2 = 0.867 < 0.87: the sparsest level does not match; 80% does
    assert out["matching"]["0it"]["sparsest_mask_id"] == mask_id(0.8)
    assert "sparsest matching ticket keeps 20.0%" in md


def test_failed_and_missing_are_listed_not_fatal(tmp_path):
    w = make_workdir(tmp_path, fail={(0.8, "1ep", None)}, skip={(0.95, "0it", None)}, controls=["random_prune"],
                     )
    cfg = ExperimentConfig.from_dict({"training_steps": "2ep", "lr_milestones": [], "rewind_points": REWINDS,
                                      "sparsities": SPARSITIES, "control_sparsities": [0.8]})
    out = write_report(w, plan=RunPlan.from_config(cfg))
    problems = out["problems"]
    assert any(p.startswith(f"{mask_id(0.8)} (20.0% left), rewind 1ep: failed: CorruptArtifactError") for p in problems), problems
    assert any(p.startswith(f"{mask_id(0.95)} (5.0% left), rewind 0it: missing") for p in problems), problems
    # the planned random_reinit controls never ran: missing
    assert sum("control random_reinit: missing" in p for p in problems) == 2, problems
    assert len(problems) == 4
    md = Path(out["report"]).read_text()
    assert "## Failed or missing (4)" in md
    assert "## Control `random_prune` (6 of 6 done)" in md
    assert "## Control `random_reinit` (0 of 2 done)" in md
    assert Path(out["plot"]).is_file()
    with open(out["results_csv"]) as f:  # the planned controls are rows too; found ones are kept
        rows = [(r["mask_id"], r["rewind"], r["control"], r["status"]) for r in csv.DictReader(f)]
    assert len(rows) == 6 + 6 + 2 and rows[6][2] == "random_reinit" and rows[8][2] == "random_prune"
    assert out["expected"] == 14


def test_damaged_results_are_listed_and_the_report_still_written(tmp_path):
    w = make_workdir(tmp_path)
    old = write_report(w, run_id="manual__first")
    truncated = w / "tickets" / ticket_name(mask_id(0.5), "0it") / "result.json"
    truncated.write_text(truncated.read_text()[:20])
    no_accuracy = w / "tickets" / ticket_name(mask_id(0.8), "1ep") / "result.json"
    _write(no_accuracy, {"remaining": 0.2})
    out = write_report(w, run_id="manual__second")
    assert out["done"] == 4 and out["run_id"] == "manual__second"
    corrupt = [p for p in out["problems"] if ": corrupt: " in p]
    assert len(corrupt) == 2, out["problems"]
    assert any(str(truncated) in p and "not valid JSON" in p for p in corrupt), corrupt
    assert any(str(no_accuracy) in p and " lacks " in p for p in corrupt), corrupt
    md = Path(out["report"]).read_text()
    assert "## Failed or missing (2)" in md and "manual__second" in md and "manual__first" not in md
    assert f"Written {out['written']} for DAG run `manual__second`." in md and old["written"] <= out["written"]
    with open(out["results_csv"]) as f:
        assert sorted(r["status"] for r in csv.DictReader(f)) == ["corrupt", "corrupt", "ok", "ok", "ok", "ok"]


def test_without_a_plan_only_started_controls_are_expected(tmp_path):
    """The CLI runs controls on request only: a config's default controls are not reported missing."""
    w = make_workdir(tmp_path)
    assert ExperimentConfig.from_dict(json.loads((w / "config.json").read_text())).controls
    out = write_report(w)
    assert out["expected"] == 6 and out["problems"] == []
    out = write_report(w, plan=RunPlan.from_config(ExperimentConfig.from_dict(json.loads((w / "config.json").read_text()))))
    assert out["expected"] == 6 + 2 * 2 * 2  # default control levels follow the run's: 0.5 and 0.95


def test_report_without_dense_result(tmp_path):
    w = make_workdir(tmp_path, dense=None, skip={(s, r, None) for s in SPARSITIES for r in REWINDS})
    out = write_report(w)
    assert out["done"] == 0 and len(out["problems"]) == 6 and out["dense_val_accuracy"] is None
    md = Path(out["report"]).read_text()
    assert "not trained (missing)" in md
    assert Path(out["plot"]).is_file()


def test_accuracy_table_bold_marks_matching_tickets():
    rows = [
        {"mask_id": "a", "sparsity": 0.5, "remaining": 0.5, "rewind": "0it", "control": "", "status": "ok", "val_accuracy": 0.875},
        {"mask_id": "a", "sparsity": 0.5, "remaining": 0.5, "rewind": "1ep", "control": "", "status": "failed", "val_accuracy": None},
        {"mask_id": "b", "sparsity": 0.9, "remaining": 0.1, "rewind": "0it", "control": "", "status": "ok", "val_accuracy": 0.80},
        {"mask_id": "b", "sparsity": 0.9, "remaining": 0.1, "rewind": "1ep", "control": "", "status": "ok", "val_accuracy": 0.86},
    ]
    table = accuracy_table(rows, ["0it", "1ep"], dense_acc=0.88, tolerance=0.01)
    assert "| 50.00% | 50.0% | **87.50** | failed |" in table
    assert "| 90.00% | 10.0% | 80.00 | 86.00 |" in table
    m = matching_levels(rows, ["0it", "1ep"], 0.88, 0.01)
    assert m["0it"] == {"matching": 1, "done": 2, "sparsest_mask_id": "a", "sparsest_remaining": 0.5}
    assert m["1ep"]["matching"] == 0


def test_cli_report(tmp_path):
    w = make_workdir(tmp_path)
    out = subprocess.run([sys.executable, "-m", "lottery", "report", "--workdir", str(w)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["report"] == str(w / "report" / "report.md")


def test_report_imports_no_tensorflow():
    code = "import sys, lottery.report; print(any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("n_rewinds", [1, 5])
def test_plot_many_lines(tmp_path, n_rewinds):
    from lottery.report import plot

    labels = [f"{i}ep" for i in range(n_rewinds)]
    rows = [{"mask_id": f"m{k}", "sparsity": 1 - 0.8 ** k, "remaining": 0.8 ** k, "rewind": label, "control": c,
             "status": "ok", "val_accuracy": 0.9 - 0.01 * k - (0.05 if c else 0)}
            for k in range(1, 21) for label in labels for c in ("", "random_reinit")]
    path = plot(rows, labels, 0.9, tmp_path / "p.png", title="t")
    assert path.stat().st_size > 10_000


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_report_files_are_readable_like_the_plot(tmp_path, umask, mode):
    """report.md, results.csv and the plot get the mode a plain open() gives (0666 less the umask),
    not the 0600 of the temporary file they are written to."""
    w = make_workdir(tmp_path)
    old = os.umask(umask)
    try:
        out = write_report(w)
    finally:
        os.umask(old)
    modes = {key: Path(out[key]).stat().st_mode & 0o777 for key in ("report", "results_csv", "plot")}
    assert modes == {"report": mode, "results_csv": mode, "plot": mode}, {k: oct(v) for k, v in modes.items()}


def test_a_ticket_not_done_shows_the_weights_left_of_its_mask(tmp_path):
    """Before its result exists, a ticket's "weights left" is its mask's (masks/index.json), the
    value its result will carry, not 1 - the planned sparsity: the page does not change it when done."""
    from lottery.report import result_rows

    w = make_workdir(tmp_path, skip={(0.5, "0it", None)})
    _write(w / "masks" / "index.json", [{"index": i, "mask_id": mask_id(s), "sparsity": s, "remaining": 1 - s + 0.0009}
                                        for i, s in enumerate(SPARSITIES)])
    row = next(r for r in result_rows(w) if r["status"] == "missing")
    assert row["mask_id"] == mask_id(0.5) and row["remaining"] == pytest.approx(0.5009)
    assert any(p.startswith(f"{mask_id(0.5)} (50.1% left), rewind 0it: missing") for p in write_report(w)["problems"])


def test_the_plot_has_the_same_axes_in_progress_and_finished(tmp_path, monkeypatch):
    """The x axis spans every planned ticket, with or without results: no 10^k ticks on an empty plot."""
    from matplotlib.figure import Figure

    from lottery.report import plot

    drawn = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), real_savefig(fig, *a, **k))[1])
    rows = [{"mask_id": mask_id(s), "sparsity": s, "remaining": 1 - s, "rewind": "0it", "control": "", "status": "ok",
             "val_accuracy": 0.9} for s in SPARSITIES]
    plot(rows, ["0it"], 0.9, tmp_path / "done.png")
    plot([{**r, "status": "missing", "val_accuracy": None} for r in rows], ["0it"], 0.9, tmp_path / "empty.png")
    (done,), (empty,) = (fig.axes for fig in drawn)
    assert empty.get_xlim() == done.get_xlim() and list(empty.get_xticks()) == list(done.get_xticks()) == [100, 50, 20, 10, 5]
    assert [t.get_text() for t in empty.texts] == ["no ticket results yet"] and not done.texts


@pytest.mark.parametrize("conf, expected", [
    ({}, "Non-default settings: none."),
    ({"sparsities": [0.5]}, "Non-default settings: `sparsities` (custom)."),
    ({"sparsities": [0.5], "lr": 0.01}, "Non-default settings: `lr=0.01`, `sparsities` (custom)."),
])
def test_the_settings_line_names_what_differs_from_the_defaults(conf, expected):
    from lottery.workdir_report import settings_section

    assert expected in settings_section(ExperimentConfig.from_dict(conf), {}, ["0it"])

"""The whole DAG with ``dag.test()`` on a tiny config: real Spark job, real training, real report.

300 Fashion-MNIST images per split, LeNet-300-100 for one epoch, 2 masks x 2 rewind points, both
controls at one level; once with one ticket per task instance, once with ``tickets_per_task`` 2;
once with the instability analysis of the dense network. ``dag.test()`` runs the tasks one after
the other in this process (the scheduler-based run is tests/test_make_run.py). About a minute for
the first run on 2 cores.
"""

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from tests.helpers import init_db_here, tiny_run, use_test_home  # noqa: E402  (before airflow is imported)

HOME = use_test_home()
os.environ["AIRFLOW_CONN_SPARK_DEFAULT"] = json.dumps({"conn_type": "spark", "host": "local[2]"})
os.environ["LOTTERY_RETRY_DELAY_S"] = "1"  # read when the DAG file is parsed

pytestmark = pytest.mark.slow

# tickets_per_task (and the schedule, the replicates) explicit: dag.test() runs the tasks in this process,
# where Airflow's process_params writes a run's conf into the DAG object's Param values, so a key left
# out inherits the previous run's.
TINY = tiny_run(queue="gpu_e2e", tickets_per_task=1, pruning_schedule="one_shot", replicates=1)
# The tasks on the training queue (the run's `queue`); the rest stay on the default queue.
TRAINING_TASKS = ("train_dense", "late_reset", "imp_chain", "controls", "stability")


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    init_db_here()
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["lottery_ticket"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


def run_dag(dag, conf):
    started = time.perf_counter()
    run = dag.test(run_conf=conf)
    print(f"dag.test: {run.state} in {time.perf_counter() - started:.1f}s")
    return run, task_instances(run)


def task_instances(run) -> dict:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id, TaskInstance.dag_id == run.dag_id)
        return {(ti.task_id, ti.map_index): _ti(ti) for ti in tis}


def _ti(ti):
    return {"state": str(ti.state.value if hasattr(ti.state, "value") else ti.state), "queue": ti.queue,
            "name": ti.rendered_map_index, "try_number": ti.try_number}


def states(tis, task_id):
    return sorted(v["state"] for (t, _), v in tis.items() if t == task_id)


@pytest.fixture(scope="module")
def first(dag, root):
    run, tis = run_dag(dag, {**TINY, "artifact_root": str(root)})
    workdirs = [p for p in root.iterdir() if p.name.startswith("lenet_300_100-")]
    assert len(workdirs) == 1, workdirs
    return run, tis, workdirs[0]


def test_first_run_produces_every_artifact(first, root):
    run, tis, w = first
    assert len([k for k in tis if k[0] == "late_reset"]) == 4
    assert len([k for k in tis if k[0] == "controls"]) == 4  # 2 kinds x 1 level x 2 rewind points
    assert_every_artifact(run, tis, w, root)


def assert_every_artifact(run, tis, w, root):
    """What a successful run of the TINY experiment leaves behind, whatever its tickets_per_task."""
    assert str(run.state) in ("success", "DagRunState.SUCCESS"), tis
    assert states(tis, "imp_chain") == ["skipped"]  # one-shot: no chain to map
    assert states(tis, "stability") == ["skipped"]  # stability false: no analysis to map
    others = {k: v for k, v in tis.items() if k[0] not in ("imp_chain", "stability")}
    assert all(v["state"] == "success" for v in others.values()), {k: v for k, v in others.items() if v["state"] != "success"}
    assert [v["name"] for (t, _), v in tis.items() if t in ("train_dense", "make_masks")] == [w.name] * 2  # one replicate
    data = root / "data" / "fashion_mnist-28px-c1-png-n300"
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 300
    assert (root / "sources" / "fashion_mnist-n300" / "train").is_dir()
    assert json.loads((w / "config.json").read_text())["training_steps"] == "1ep"
    assert (w / "dense" / "result.json").is_file() and (w / "dense" / "final.keras").is_file()
    assert sorted(p.name for p in (w / "masks").glob("*.npz")) == ["sp50.000.npz", "sp80.000.npz"]
    tickets = sorted(p.name for p in (w / "tickets").iterdir() if (p / "result.json").is_file())
    assert tickets == sorted([
        "sp50.000__0it", "sp50.000__2it", "sp80.000__0it", "sp80.000__2it",
        "sp80.000__0it__random_prune", "sp80.000__2it__random_prune",
        "sp80.000__0it__random_reinit", "sp80.000__2it__random_reinit",
    ])
    assert len((w / "results.csv").read_text().strip().splitlines()) == 1 + 8
    assert (w / "report" / "accuracy_vs_sparsity.png").stat().st_size > 10_000
    md = (w / "report" / "report.md").read_text()
    assert "## Failed or missing (0)" in md and "Control `random_prune`" in md


def test_mapped_instances_are_named_and_routed_to_the_run_queue(first):
    _, tis, _ = first
    names = {v["name"] for (t, _), v in tis.items() if t == "late_reset"}
    assert names == {"50.1% left, rewind 0it", "50.1% left, rewind 2it", "20.2% left, rewind 0it", "20.2% left, rewind 2it"}, names
    assert "random_prune: 20.2% left, rewind 2it" in {v["name"] for (t, _), v in tis.items() if t == "controls"}
    for (task_id, _), v in tis.items():
        want = "gpu_e2e" if task_id in TRAINING_TASKS else "default"
        assert v["queue"] == want, (task_id, v)


def test_rerun_reuses_finished_work(first, dag, root, caplog):
    import logging

    _, _, w = first
    mtimes = {p: p.stat().st_mtime_ns for p in w.glob("tickets/*/result.json")}
    caplog.set_level(logging.INFO)
    run, tis = run_dag(dag, {**TINY, "artifact_root": str(root)})
    log = caplog.text
    assert str(run.state) in ("success", "DagRunState.SUCCESS")
    assert {p: p.stat().st_mtime_ns for p in w.glob("tickets/*/result.json")} == mtimes
    assert "train_dense: already done" in log
    assert "is already up to date" in log and "Spark not started" in log  # preprocess: no spark-submit, no JVM
    assert log.count(": already done (val_accuracy") == 8, log[-5000:]  # 4 tickets + 4 controls
    assert "50.1% left, rewind 2it: already done" in log
    assert [p.name for p in root.iterdir() if p.name.startswith("lenet_300_100-")] == [w.name]


def test_instability_analysis_of_the_dense_network(first, dag, root):
    """stability true (the same experiment: the tickets are found done): one stability instance per
    rewind point of the dense network, each training two copies and walking the line between them at
    stability_points points; the report's table, plot, stability.csv and where to rewind."""
    import csv

    _, _, w = first
    run, tis = run_dag(dag, {**TINY, "artifact_root": str(root), "stability": True, "stability_points": 5})
    assert str(run.state) in ("success", "DagRunState.SUCCESS"), {k: v for k, v in tis.items() if v["state"] != "success"}
    analyses = {v["name"]: v for (t, i), v in tis.items() if t == "stability" and i >= 0}
    assert set(analyses) == {"dense, rewind 0it", "dense, rewind 2it"}, tis
    assert all(v["state"] == "success" and v["queue"] == "gpu_e2e" for v in analyses.values()), analyses
    assert states(tis, "check_results") == ["success"]
    results = {r: json.loads((w / "stability" / f"dense__{r}" / "result.json").read_text()) for r in ("0it", "2it")}
    for result in results.values():
        assert result["network"] == "dense" and result["points"] == 5 and len(result["path"]) == 5, result
        assert result["instability"] >= 0 and {"a", "b"} <= set(result["endpoints"])
    out = [_xcom(run, "stability", i) for i in range(2)]
    assert {o["stability"] for o in out} == {"dense__0it", "dense__2it"} and all("path" not in o for o in out)
    with open(w / "stability.csv") as f:
        assert [(r["network"], r["rewind"], r["status"]) for r in csv.DictReader(f)] == [("dense", "0it", "ok"), ("dense", "2it", "ok")]
    assert (w / "report" / "instability_vs_rewind.png").stat().st_size > 10_000
    md = (w / "report" / "report.md").read_text()
    assert "## Instability (2 of 2 analyses done)" in md
    stable = next((r for r in ("0it", "2it") if results[r]["instability"] < 2.0), None)
    assert (f"- **dense network**: rewind here: **{stable}**" if stable else "- **dense network**: no rewind point is stable") in md
    assert _xcom(run, "report")["rewind_here"] == {"dense": stable}


GROUPS = {"rewind 0it: masks 1-2 (50.1%…20.2% left)", "rewind 2it: masks 1-2 (50.1%…20.2% left)"}


def test_grouped_run_passes_the_same_end_to_end_test(first, dag, root, monkeypatch):
    """tickets_per_task 2, from scratch (the data set is reused): one late_reset instance per rewind
    point, one controls instance per (kind, rewind point); the same experiment id, the same artifacts."""
    import shutil

    _, _, w = first
    shutil.rmtree(w)
    monkeypatch.setenv("LOTTERY_PHASE_LISTENER", "bench.run_breakdown:record")  # the tasks run in this process
    run, tis = run_dag(dag, {**TINY, "artifact_root": str(root), "tickets_per_task": 2})
    assert_every_artifact(run, tis, w, root)
    assert {v["name"] for (t, _), v in tis.items() if t == "late_reset"} == GROUPS
    assert {v["name"] for (t, _), v in tis.items() if t == "controls"} == {
        f"{kind}, rewind {r}: mask 2 (20.2% left)" for kind in ("random_reinit", "random_prune") for r in ("0it", "2it")}
    for (task_id, _), v in tis.items():
        assert v["queue"] == ("gpu_e2e" if task_id in TRAINING_TASKS else "default"), (task_id, v)
    assert json.loads((w / "tickets" / "sp80.000__0it" / "result.json").read_text())["wall_s"] > 0
    from bench import run_breakdown

    seconds = run_breakdown.breakdown(HOME, run.run_id)["seconds"]
    assert (seconds["late_reset"]["instances"], seconds["late_reset"]["trained"]) == (2, 4), seconds
    assert seconds["controls"]["trained"] == 4 and seconds["late_reset"]["epochs"] > 0, seconds


def test_clearing_a_group_trains_only_its_unfinished_tickets(first, dag, root, caplog):
    """A group whose tickets are partly done (as after a clear, a kill or a failure): only the
    missing ones train; every file of the done ones is untouched."""
    import logging
    import shutil

    _, _, w = first
    gone = ["sp80.000__0it", "sp80.000__2it__random_prune"]
    for name in gone:
        shutil.rmtree(w / "tickets" / name)
    kept = {p: p.stat().st_mtime_ns for p in (w / "tickets").rglob("*") if p.is_file()}
    caplog.set_level(logging.INFO)
    run, tis = run_dag(dag, {**TINY, "artifact_root": str(root), "tickets_per_task": 2})
    assert str(run.state) in ("success", "DagRunState.SUCCESS"), tis
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert all((w / "tickets" / name / "result.json").is_file() for name in gone)
    log = caplog.text
    assert "rewind 0it: masks 1-2 (50.1%…20.2% left): done in" in log and "1 trained, 1 already done" in log
    assert "50.1% left, rewind 0it: already done" in log and "rewind 2it: masks 1-2 (50.1%…20.2% left): done in" in log
    assert log.count(": already done (val_accuracy") == 6, log[-5000:]  # 8 tickets and controls, 2 trained


def test_failing_late_reset_does_not_stop_the_others_or_the_report(first, dag, root, monkeypatch):
    """One mask file is damaged after make_masks wrote it: its two late_reset instances fail at
    once (no retry: a corrupt artifact is not transient); the rest, the report and the listing go on."""
    import shutil

    from lottery import masks

    _, _, w = first
    for name in ("sp50.000__0it", "sp50.000__2it"):
        shutil.rmtree(w / "tickets" / name)
    real_make_masks = masks.make_masks

    def make_masks_then_damage(workdir):
        out = real_make_masks(workdir)
        path = Path(workdir) / "masks" / "sp50.000.npz"
        path.write_bytes(path.read_bytes()[:-40] + b"\0" * 40)
        return out

    monkeypatch.setattr(masks, "make_masks", make_masks_then_damage)
    run, tis = run_dag(dag, {**TINY, "artifact_root": str(root)})
    assert str(run.state) in ("failed", "DagRunState.FAILED")
    failed = {v["name"]: v for (t, _), v in tis.items() if t == "late_reset" and v["state"] == "failed"}
    assert set(failed) == {"50.1% left, rewind 0it", "50.1% left, rewind 2it"}, tis
    assert all(v["try_number"] == 1 for v in failed.values())  # not retried
    assert states(tis, "late_reset").count("success") == 2
    assert states(tis, "controls") == ["success"] * 4
    assert states(tis, "report") == ["success"]
    assert states(tis, "check_results") == ["failed"]
    md = (w / "report" / "report.md").read_text()
    assert "## Failed or missing (2)" in md
    assert "sp50.000 (50.1% left), rewind 0it: failed: CorruptArtifactError" in md  # the mask's own share, as its instances are named
    rows = (w / "results.csv").read_text()
    assert rows.count(",failed,") == 2


def test_rewind_after_the_end_of_training_fails_fast(dag, root):
    """A cross-field error the form cannot see: validate_config fails, nothing else runs."""
    run, tis = run_dag(dag, {**TINY, "artifact_root": str(root), "rewind_points": ["0it", "3ep"]})
    assert str(run.state) in ("failed", "DagRunState.FAILED")
    assert states(tis, "validate_config") == ["failed"]
    assert tis[("validate_config", -1)]["try_number"] == 1
    assert states(tis, "train_dense") == ["upstream_failed"]


def test_rewind_after_the_end_in_iterations_fails_before_any_training_without_retry(dag, root):
    """``100it`` is after the end of a 9-iteration epoch: known once the data set exists, so
    validate_config names it when the data is already written (as here, after the earlier runs) and
    prepare_workdir right after preprocess otherwise; never train_dense."""
    run, tis = run_dag(dag, {**TINY, "artifact_root": str(root), "rewind_points": ["0it", "100it"]})
    assert str(run.state) in ("failed", "DagRunState.FAILED")
    failed = [t for t in ("validate_config", "prepare_workdir") if states(tis, t) == ["failed"]]
    assert len(failed) == 1 and tis[(failed[0], -1)]["try_number"] == 1, tis
    assert states(tis, "train_dense") == ["upstream_failed"]


def test_iterative_replicates_run_every_chain_then_their_controls_and_a_third_replicate_trains_alone(dag, tmp_path_factory):
    """pruning_schedule iterative, 2 replicates: one imp_chain instance per (replicate, rewind point),
    the controls after them, each replicate's levels in its own work directory, one report over both.
    The same conf with 3 replicates then trains only the third: the first two are found done."""
    root = tmp_path_factory.mktemp("iterative")
    conf = {**TINY, "artifact_root": str(root), "pruning_schedule": "iterative", "replicates": 2}
    run, tis = run_dag(dag, conf)
    assert str(run.state) in ("success", "DagRunState.SUCCESS"), {k: v for k, v in tis.items() if v["state"] != "success"}
    names = lambda task_id: sorted(v["name"] for (t, i), v in tis.items() if t == task_id and i >= 0)  # noqa: E731
    assert names("train_dense") == names("make_masks") == ["rep 1", "rep 2"]
    assert names("imp_chain") == sorted(f"rep {k}: chain, rewind {r}" for k in (1, 2) for r in ("0it", "2it"))
    assert names("controls") == sorted(f"rep {k}: {kind}: 20.0% left, rewind {r}" for k in (1, 2)
                                       for kind in ("random_reinit", "random_prune") for r in ("0it", "2it"))
    assert states(tis, "late_reset") == ["skipped"] and states(tis, "check_results") == ["success"]
    prepared = _xcom(run, "prepare_workdir")
    workdirs = [Path(w) for w in prepared["workdirs"]]
    assert len(workdirs) == 2 and prepared["workdir"] == str(workdirs[0]) and prepared["experiment_ids"] == [w.name for w in workdirs]
    assert prepared["report_dir"] == str(root / f"{workdirs[0].name}-x2") and Path(prepared["report_dir"], "replicates.json").is_file()
    for seed, w in enumerate(workdirs):
        assert json.loads((w / "config.json").read_text())["seed"] == seed
        for level, mask_id in ((1, "sp50.000"), (2, "sp80.000")):
            for rewind in ("0it", "2it"):
                result = json.loads((w / "tickets" / f"{mask_id}__{rewind}" / "result.json").read_text())
                assert (result["schedule"], result["level"]) == ("iterative", level), result
        assert len(list(w.glob("tickets/sp80.000__*__random_*/result.json"))) == 4
        assert not (w / "masks" / "sp50.000.npz").exists()  # each chain makes its own
    done = {p: p.stat().st_mtime_ns for w in workdirs for p in w.glob("**/result.json")}

    run, tis = run_dag(dag, {**conf, "replicates": 3})
    assert str(run.state) in ("success", "DagRunState.SUCCESS"), {k: v for k, v in tis.items() if v["state"] != "success"}
    assert {p: p.stat().st_mtime_ns for p in done} == done  # the first two replicates: nothing trained again
    third = Path(_xcom(run, "prepare_workdir")["workdirs"][2])
    assert json.loads((third / "config.json").read_text())["seed"] == 2
    assert len(list(third.glob("tickets/*/result.json"))) == 4 + 4
    chains = {v["name"]: _xcom(run, "imp_chain", i) for (t, i), v in tis.items() if t == "imp_chain" and i >= 0}
    assert len(chains) == 6
    for name, out in chains.items():
        assert [lv["skipped"] for lv in out["levels"]] == [not name.startswith("rep 3")] * 2, (name, out)


def _xcom(run, task_id, map_index=-1):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter(XComModel.run_id == run.run_id, XComModel.task_id == task_id,
                                              XComModel.map_index == map_index, XComModel.key == "return_value").one()
        value = row.value
    return json.loads(value) if isinstance(value, str) else value

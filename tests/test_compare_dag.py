"""The lottery_compare DAG: two finished experiments (hand-made results) compared by a real
``dag.test()`` run; bad params named at once."""

from pathlib import Path

import pytest

from tests.helpers import init_db_here, use_test_home  # noqa: E402  (before airflow is imported)

HOME = use_test_home()

from lottery.config import ConfigError  # noqa: E402
from tests.test_replicate_report import make_workdir, three_replicates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def experiments(tmp_path):
    """A one-shot replicate set and an iterative experiment in an allowed artifact root (the test
    deployment allows the temp directory: tests.helpers.use_test_home)."""
    from lottery.config import ExperimentConfig

    one_shot = three_replicates(tmp_path)
    cfg = ExperimentConfig.from_dict({"training_steps": "2ep", "lr_milestones": [], "rewind_points": ["0it", "1ep"],
                                      "sparsities": [0.5, 0.8], "pruning_schedule": "iterative"})
    iterative = make_workdir(tmp_path / "lenet_300_100-imp", cfg, {(s, r): 0.85 for s in (0.5, 0.8) for r in ("0it", "1ep")},
                             dense=0.87)
    return tmp_path, one_shot, iterative


def test_the_compare_dag_writes_the_plot_and_table(experiments):
    from airflow.dag_processing.dagbag import DagBag

    root, one_shot, iterative = experiments
    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["lottery_compare"]
    init_db_here()
    run = dag.test(run_conf={"artifact_root": str(root), "experiments": [one_shot.name, str(iterative.path)], "name": "schedules"})
    assert run.state == "success"
    out = root / "comparisons" / "schedules"
    assert (out / "comparison.png").stat().st_size > 0
    assert "pruning_schedule=iterative" in (out / "comparison.md").read_text()


def test_bad_compare_params_are_named_at_once(experiments):
    from lottery.dag.compare import experiment_paths

    root, one_shot, _ = experiments
    with pytest.raises(ConfigError) as info:
        experiment_paths({"artifact_root": str(root), "experiments": [one_shot.name, "no-such-experiment", "../etc"],
                          "name": "a b"})
    named = [(field, value) for field, value, _ in info.value.errors]
    assert named == [("experiments", "no-such-experiment"), ("experiments", "../etc"), ("name", "a b")]
    with pytest.raises(ConfigError, match="fewer than two"):
        experiment_paths({"artifact_root": str(root), "experiments": [one_shot.name]})

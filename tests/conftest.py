"""Shared test setup: the tiers, the Keras backend, a quiet deterministic CPU.

The project is installed (editable) in the venv, so `lottery` and `spark_jobs` import from
anywhere; the two path entries below are the only ones the project makes: the repository root
(for `tests.helpers`, `tests.datasets`, `bench`) and plugins/ (for `airflow_local_settings`, which
Airflow itself imports from its plugins folder).

Tiers (markers, given here by module so that test modules carry no tier bookkeeping):
  unit   no subprocess (enforced below), no Spark, no Airflow scheduler, at most a few training
         steps: `make test-unit`, about a minute;
  e2e    the whole product as users start it (Airflow scheduler, `make run`, clusters, the browser):
         left out of `make test-fast`;
  neither: integration tests (Spark in local mode, training processes, the DAG in this process).
The backend is the one `make run` trains on (`default_backend()`: JAX where it is installed);
tests of TensorFlow-only code set ``KERAS_BACKEND=tensorflow`` in their subprocess or module.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "plugins"))

from lottery.deploy.airflow_home import default_backend  # noqa: E402  (imports neither Keras nor Airflow)

os.environ.setdefault("KERAS_BACKEND", default_backend())
# JAX compiles every new shape, initialisers included (building the 8 registered models: minutes on
# 2 cores): like `make run`, tests and their subprocesses share a persistent compilation cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


import pytest  # noqa: E402

E2E_MODULES = {
    "test_cluster_healing", "test_cluster_lock_wait", "test_concurrent_runs", "test_dag_e2e", "test_make_run", "test_report_page",
    "test_spark_cluster", "test_supervision_airflow", "test_ui_browser", "test_ui_lifecycle", "test_worker_loss",
}
UNIT_MODULES = {
    "test_config", "test_fetch", "test_import_rules", "test_models", "test_pipeline", "test_pruning",
    "test_records", "test_reliability_doc", "test_replicate_report", "test_report", "test_stability_report",
    "test_structure", "test_val_labels", "test_preprocess_resume",
}
# Tests of the unit modules that start a process (a fresh Python, the CLI): the integration tier.
NOT_UNIT = {
    "test_pipeline": {"test_same_seed_and_epoch_give_identical_batches_in_fresh_processes",
                      "test_mirrored_strategy_with_two_logical_cpus"},
    "test_report": {"test_cli_report", "test_report_imports_no_tensorflow"},
    "test_records": {"test_record_format_and_fetch_do_not_import_tensorflow"},
    "test_val_labels": {"test_flat_val_end_to_end"},
    "test_preprocess_resume": {"test_a_killed_job_run_again_writes_only_the_missing_shards",
                               "test_a_killed_job_whose_input_changed_starts_over",
                               "test_the_dag_tasks_retry_resumes_a_killed_job"},
}


def tier(item) -> str | None:
    module = getattr(item, "module", None)
    module = module.__name__.rpartition(".")[2] if module else ""
    if module in E2E_MODULES:
        return "e2e"
    if module in UNIT_MODULES and item.originalname not in NOT_UNIT.get(module, ()):
        return "unit"
    return None


def pytest_ignore_collect(collection_path, config):
    """`-m unit` and `-m "not e2e"` (make test-unit, test-fast) do not import the modules they would
    deselect whole: importing Airflow, Spark and Playwright costs more than the unit tests take."""
    module = collection_path.stem
    markexpr = config.getoption("markexpr", "").replace("'", '"').strip()
    if markexpr == "unit" and module.startswith("test_") and module not in UNIT_MODULES:
        return True
    if markexpr == "not e2e" and module in E2E_MODULES:
        return True
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = tier(item)
        if name and not item.get_closest_marker(name):
            item.add_marker(name)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request, monkeypatch):
    """The unit tier's promise, kept: a unit test that starts a process fails and says so."""
    if request.node.get_closest_marker("unit"):
        def refuse(self, args, *rest, **kwargs):
            raise AssertionError(f"a unit test started a process ({args!r}): leave it out of the unit tier "
                                 "(tests/conftest.py NOT_UNIT)")
        monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    yield


@pytest.fixture
def tensorflow_runtime(monkeypatch):
    """``lottery.data.runtime`` takes its TensorFlow branches in this (JAX) process: for tests of
    TensorFlow's thread pools and devices, which do not go through Keras."""
    from lottery.data import runtime

    monkeypatch.setattr(runtime, "backend", lambda: "tensorflow")
    return runtime


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (``item.rep_call``): the browser tests save a
    screenshot when their test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report

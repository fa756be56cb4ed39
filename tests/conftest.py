"""Shared test setup: a quiet, single-threaded, deterministic TensorFlow on the CPU.

The project is installed (editable) in the venv, so `lottery` and `spark_jobs` import from
anywhere; the two path entries below are the only ones the project makes: the repository root
(for `tests.datasets`, `bench`) and plugins/ (for `airflow_local_settings`, which Airflow
itself imports from its plugins folder).
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "plugins"))

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


import pytest  # noqa: E402


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (``item.rep_call``): the browser tests save a
    screenshot when their test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report

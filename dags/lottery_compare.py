"""Compare finished lottery-ticket experiments (one-shot against iterative pruning, one rewind mode
against another): one plot and one table, written under ``<artifact_root>/comparisons/<name>/``.

Trigger it with the experiments' ids or replicate sets' names (the work directories the
``lottery_ticket`` runs wrote); the task body is ``lottery.dag.compare.compare_experiments``.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import dag, task

from lottery.dag import compare as compare_task


@task
def compare_experiments() -> dict[str, Any]:
    """Check the experiments (same data set and model), write comparison.png and comparison.md."""
    return compare_task.compare_experiments()


@dag(
    dag_id=compare_task.COMPARE_DAG_ID,
    schedule=None,
    catchup=False,
    params=compare_task.COMPARE_PARAMS,
    doc_md=__doc__,
    tags=["lottery-ticket", "report"],
    default_args={"owner": "lottery", "retries": 0},
)
def lottery_compare():
    compare_experiments()


lottery_compare()

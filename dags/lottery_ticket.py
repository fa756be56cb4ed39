"""One lottery-ticket experiment (Frankle & Carbin; late resetting) per DAG run.

validate_config -> fetch_dataset -> preprocess (Spark, when the data needs writing) -> prepare_workdir -> train_dense -> make_masks
    -> late_reset[mask x rewind point, or groups of tickets_per_task masks]  (+ plan_controls -> controls[...])
    -> report (all_done) -> check_results (all_done: rewrites the report from disk, fails when a ticket is not done)

This file only wires the tasks: each task body calls one function of ``lottery.dag.tasks``, which
calls one engine step. At parse time it imports nothing heavier than ``lottery.config``,
``lottery.plan``, ``lottery.deploy`` and ``lottery.dag``; TensorFlow, Keras, NumPy and PySpark are
imported inside the tasks (or in the Spark job's own process). See docs/dag.md.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any

from airflow.sdk import TriggerRule, dag, task

from lottery.dag import tasks
from lottery.dag.params import PARAMS
from lottery.dag.preprocess import PreprocessOperator
from lottery.dag.tasks import GROUP_LABEL
from lottery.deploy.constants import DAG_ID, GPU_QUEUE, POOL, REPO, RETRIES, RETRY_DELAY, SPARK_CONN_ID

# The Python of the Spark driver and executors (the job ships lottery/ to the executors itself).
SPARK_PYTHON = os.environ.get("LOTTERY_SPARK_PYTHON", sys.executable)
# Training tasks take a pool slot, run on the GPU queue (or the run's `queue`) and are retried.
TRAINING = {"pool": POOL, "queue": GPU_QUEUE, "retries": RETRIES, "retry_delay": RETRY_DELAY}

DOC_MD = """
### Lottery tickets with late resetting

One run = one experiment: Spark preprocesses the images once (cached per data set + image size +
channels + encoding under `<artifact_root>/data/`), the dense network is trained once and saves a
checkpoint at every rewind point, it is magnitude-pruned at every sparsity level, and every
(mask, rewind point) pair is retrained from its rewind point with the mask fixed (`late_reset`, one
mapped task instance each: 20 levels x 5 rewind points = 100 by default). `report` collects every
result (also when some failed) into `results.csv`, `accuracy_vs_sparsity.png` and `report.md`;
`check_results` writes the report again from what is on disk and fails the run if any combination
failed or is missing.

**When tickets fail**: fix the cause, then on the failed run *Clear* → *Clear only failed tasks*
(REST `clearTaskInstances` with `only_failed`; CLI `lottery rerun-failed --run-id <run id>`, or
`--since <date>` for every failed run since then). Only the failed tickets train again, finished
ones are never recomputed, and `check_results` judges (and the Report tab shows) a fresh report,
so the run ends *success* when every ticket is done. Clear once the run has finished.

**Backfill is off**: a run is one experiment chosen by its params, not a date interval
(`schedule=None`), so Airflow greys out *Backfill* and refuses `POST /api/v2/backfills` (422,
"non-periodic schedule"). A backfill would only start the same experiment again for each date;
to re-run failed tickets, clear them as above.

**Work directory**: `<artifact_root>/<experiment id>`; the id hashes the non-default config fields
and the data set. Re-triggering the same config reuses everything already finished; another config
never collides.

**Params** (the trigger form; invalid values are refused before the run is created):

* *Data*: `dataset` (`fashion_mnist` or an absolute path to an ImageNet-layout folder),
  `dataset_limit` (Fashion-MNIST only: first N images per split), `image_size`, `channels`, `encoding`.
* *Model and training*: `model`, `training_steps` (step strings: `8ep`, `500it`, `2ep100it`),
  `batch_size`, `optimizer`, `lr`, `momentum`, `nesterov`, `weight_decay`, `warmup_steps`,
  `lr_milestones`, `lr_gamma`, `augmentation`, `mixed_precision`, `jit_compile`, `seed`.
* *Pruning*: `rewind_points`; `sparsities` (explicit list) **or**, when it is empty (the default),
  `num_levels` levels at `prune_rate`: sparsity_k = 1 - (1 - prune_rate)^k;
  `pruning_scope`, `output_layer_prune_factor`.
* *Controls*: `controls` (on by default: both kinds at three levels), `control_kinds`, `control_sparsities` (matched to the
  nearest level; empty = all levels); run at every rewind point.
* *Execution*: `artifact_root`, `queue` (the Celery queue of the training tasks), `tickets_per_task`
  (1: one `late_reset` / `controls` instance per ticket; K > 1: groups of K consecutive masks of one
  rewind point, trained in one process, named `rewind 1ep: masks 1-10 (80.0%…10.7% left)`; no result
  and not the experiment id changes).

The form checks types and choices. Every other error (a value out of range, a bad step string, a
path outside the allowed roots, a rewind point after the end of training, an unknown conf key, a control
sparsity that is not a level) fails `validate_config` at once, without retries, naming every bad field in
words; one that needs the data set's size fails `prepare_workdir` (after preprocess, before any
training) when the data set was not written yet.
"""


@task(multiple_outputs=True)
def validate_config() -> dict[str, Any]:
    """Check the run's params (fail fast, no retries); derive the run plan, the data paths, the Spark args."""
    return tasks.validate_config()


@task
def fetch_dataset(dataset: str, source: str, limit: int | None) -> dict[str, Any]:
    """Export the bundled Fashion-MNIST to an image folder (cached); skipped for an image folder."""
    return tasks.fetch_dataset(dataset, source, limit)


@task
def prepare_workdir(plan: dict, data_dir: str, artifact_root: str) -> dict[str, Any]:
    """``<artifact_root>/<experiment id>``: created, or checked to hold this very experiment."""
    return tasks.prepare_workdir(plan, data_dir, artifact_root)


@task(**TRAINING)
def train_dense(plan: dict, data_dir: str, workdir: str) -> dict[str, Any]:
    """Train the dense network once, with a checkpoint at every rewind point (resumes)."""
    return tasks.train_dense(plan, data_dir, workdir)


@task
def make_masks(workdir: str) -> list[dict[str, Any]]:
    """One magnitude mask per sparsity level; returns one small descriptor per mask."""
    return tasks.make_masks(workdir)


@task
def plan_tickets(masks: list[dict], plan: dict, per_task: int) -> list[dict[str, Any]]:
    """Every (mask, rewind point) pair, one per instance or in groups: the kwargs of the mapped late_reset."""
    return tasks.plan_tickets(masks, plan, per_task)


# Tickets before controls: the experiment's result comes first, and the controls' shorter
# instances then fill the last free slots, so the run does not end with one long group alone.
@task(**TRAINING, map_index_template=GROUP_LABEL, priority_weight=2)
def late_reset(workdir: str, masks: list[dict], rewind: str, group: str) -> dict[str, Any]:
    """Rewind to ``rewind``, apply each of the group's ``masks``, retrain to the end with the mask fixed."""
    return tasks.retrain(workdir, masks, rewind, group)


@task
def plan_controls(masks: list[dict], plan: dict, per_task: int) -> list[dict[str, Any]]:
    """(control kind, mask, rewind point) triples, one per instance or in groups; empty when the controls are off."""
    return tasks.plan_controls(masks, plan, per_task)


@task(**TRAINING, map_index_template=GROUP_LABEL)
def controls(workdir: str, masks: list[dict], rewind: str, group: str, control: str) -> dict[str, Any]:
    """A control (random_reinit / random_prune) for each of the group's ``masks`` at rewind point ``rewind``."""
    return tasks.retrain(workdir, masks, rewind, group, control)


@task(trigger_rule=TriggerRule.ALL_DONE)
def report(workdir: str | None, plan: dict) -> dict[str, Any]:
    """Collect every result (failed and missing ones listed, never fatal): csv, plot, report.md."""
    return tasks.report(workdir, plan)


@task(trigger_rule=TriggerRule.ALL_DONE)
def check_results(workdir: str | None, plan: dict) -> dict[str, Any]:
    """Rewrite the report from what is on disk, then fail the run when any combination failed or is missing."""
    return tasks.check_results(workdir, plan)


@dag(
    dag_id=DAG_ID,
    schedule=None,
    catchup=False,
    max_active_runs=4,
    max_active_tasks=32,
    params=PARAMS,
    doc_md=DOC_MD,
    tags=["lottery-ticket", "pruning", "spark", "tensorflow"],
    default_args={"owner": "lottery", "retries": 0},
    render_template_as_native_obj=False,
)
def lottery_ticket():
    checked = validate_config()
    plan = checked["plan"]
    fetched = fetch_dataset(checked["dataset"], checked["source_dir"], checked["dataset_limit"])
    preprocess = PreprocessOperator(
        task_id="preprocess",
        conn_id=SPARK_CONN_ID,
        application=str(REPO / "spark_jobs" / "preprocess_images.py"),
        application_args=checked["spark_args"],
        name="lottery-preprocess",
        env_vars={"PYSPARK_PYTHON": SPARK_PYTHON},
        conf={"spark.pyspark.python": SPARK_PYTHON, "spark.ui.showConsoleProgress": "false"},
        trigger_rule=TriggerRule.NONE_FAILED,  # fetch_dataset is skipped for an image folder
        retries=1,
        retry_delay=timedelta(seconds=30),
        doc_md="Spark job: image folder -> TFRecord shards + manifest.json. Waits for another run writing the "
               "same data; when the data is up to date, says so and starts no Spark.",
    )
    fetched >> preprocess
    prepared = prepare_workdir(plan, checked["data_dir"], checked["artifact_root"])
    preprocess >> prepared
    workdir = prepared["workdir"]
    dense = train_dense(plan, checked["data_dir"], workdir)
    masks = make_masks(workdir)
    dense >> masks
    per_task = checked["tickets_per_task"]
    tickets = late_reset.partial(workdir=workdir).expand_kwargs(plan_tickets(masks, plan, per_task))
    control_runs = controls.partial(workdir=workdir).expand_kwargs(plan_controls(masks, plan, per_task))
    summary = report(workdir, plan)
    [tickets, control_runs] >> summary
    # The check waits for the tickets themselves, not only for the report: "Clear only failed tasks"
    # leaves a successful report alone, and the check must judge the tickets it re-ran.
    [tickets, control_runs, summary] >> check_results(workdir, plan)


lottery_ticket()

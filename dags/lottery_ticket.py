"""One lottery-ticket experiment (Frankle & Carbin; late resetting) per DAG run.

validate_config -> fetch_dataset -> preprocess (Spark, when the data needs writing) -> prepare_workdir
    -> plan_replicates -> train_dense[replicate] -> make_masks[replicate]
    -> late_reset[replicate x mask x rewind point, or groups of tickets_per_task masks]   (one-shot)
    -> imp_chain[replicate x rewind point] -> chains_done (all_done)                      (iterative)
    (+ plan_controls, after chains_done -> controls[...])
    (+ plan_stability, after chains_done -> stability[replicate x network x rewind point])
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

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import TriggerRule, dag, task

from lottery.dag import tasks
from lottery.dag.params import PARAMS
from lottery.dag.preprocess import PreprocessOperator
from lottery.dag.tasks import GROUP_LABEL, REPLICATE_LABEL
from lottery.deploy.constants import (DAG_ID, GPU_QUEUE, POOL, PREPROCESS_TIMEOUT, REPO, RETRIES, RETRY_DELAY,
                                     SPARK_CONN_ID)

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

**Replicates** (`replicates` N > 1): N experiments with seeds `seed` … `seed + N - 1`, each in its own
work directory; `train_dense` and `make_masks` run once per replicate (named `rep 1`, `rep 2`, …),
every ticket, chain and control once per replicate (named `rep 2: 5.0% left, rewind 2ep`), and the
report over them goes to `<artifact_root>/<experiment id of the first replicate>-x<N>/`.

**Iterative pruning** (`pruning_schedule` iterative): instead of `late_reset`, one `imp_chain`
instance per rewind point (and replicate), `chain, rewind 1ep`, trains levels 1..K one after another,
each pruned from the level before and rewound; its levels are the tickets of the report. The
controls run once every chain has ended (`chains_done`), on their chain's level masks.

**Instability analysis** (`stability`, on by default for the dense network): one `stability`
instance per (replicate, network, rewind point), `dense, rewind 1ep` or `5.0% left, rewind 1ep`
(tickets at `stability_sparsities`), trains two copies from the rewind point with different data
orders and measures the error on the line between them. The report adds `stability.csv`,
`instability_vs_rewind.png` and per network the earliest rewind point whose instability is below
`stability_threshold` ("rewind here").

**When tickets fail**: fix the cause, then on the failed run *Clear* → *Clear only failed tasks*
(REST `clearTaskInstances` with `only_failed`; CLI `lottery rerun-failed --run-id <run id>`, or
`--since <date>` for every failed run since then). Only the failed tickets train again, finished
ones are never recomputed, and `check_results` judges (and the Report tab shows) a fresh report,
so the run ends *success* when every ticket is done. Clear once the run has finished. A failed
chain fails its own controls (they need its level masks): clear the chain's instance with
*Downstream*, so that they run after it; it resumes at its first level not done.

**Backfill is off**: a run is one experiment chosen by its params, not a date interval
(`schedule=None`), so Airflow greys out *Backfill* and refuses `POST /api/v2/backfills` (422,
"non-periodic schedule"). A backfill would only start the same experiment again for each date;
to re-run failed tickets, clear them as above.

**Work directory**: `<artifact_root>/<experiment id>`, one per replicate; the id hashes the non-default
config fields (not `replicates`) and the data set. Re-triggering the same config reuses everything
already finished (with more replicates, only the new ones train); another config never collides.

**Params** (the trigger form; invalid values are refused before the run is created):

* *Data*: `dataset` (`fashion_mnist` or an absolute path to an ImageNet-layout folder),
  `dataset_limit` (Fashion-MNIST only: first N images per split), `image_size`, `channels`, `encoding`.
* *Model and training*: `model`, `training_steps` (step strings: `8ep`, `500it`, `2ep100it`),
  `batch_size`, `optimizer`, `lr`, `momentum`, `nesterov`, `weight_decay`, `warmup_steps`,
  `lr_milestones`, `lr_gamma`, `augmentation`, `mixed_precision`, `jit_compile`, `seed`,
  `replicates` (1-10: independent experiments with seeds seed, seed+1, …).
* *Pruning*: `rewind_points`; `sparsities` (explicit list) **or**, when it is empty (the default),
  `num_levels` levels at `prune_rate`: sparsity_k = 1 - (1 - prune_rate)^k;
  `pruning_schedule` (`one_shot`: every level from the dense network's final weights; `iterative`:
  per rewind point a chain of levels, each from the previous level's trained weights; the levels
  must increase); `rewind_mode` (`full`: weights, optimizer state and schedule position of the
  rewind point; `weights`: its weights, a fresh optimizer; `learning_rate`: the final weights, the
  schedule replayed from the rewind point, which must not be `0it`);
  `pruning_scope`, `output_layer_prune_factor`.
* *Controls*: `controls` (on by default: both kinds at three levels), `control_kinds`, `control_sparsities` (matched to the
  nearest level; empty = all levels); run at every rewind point.
* *Stability*: `stability` (on by default: the dense network at every rewind point), `stability_sparsities`
  (ticket levels beside it, matched to a level within 0.005; e.g. [0.79, 0.95]: about 20% and 5% left),
  `stability_points` (3-101, default 11), `stability_threshold` (percentage points, default 2).
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
    """Every replicate's ``<artifact_root>/<experiment id>`` (created, or checked to hold this very
    experiment) and, for several replicates, the set directory of their report."""
    return tasks.prepare_workdir(plan, data_dir, artifact_root)


@task
def plan_replicates(workdirs: list[str], experiment_ids: list[str]) -> list[dict[str, Any]]:
    """One kwargs per replicate (its work dir and its name): the input of the mapped train_dense and make_masks."""
    return tasks.plan_replicates(workdirs, experiment_ids)


@task(**TRAINING, map_index_template=REPLICATE_LABEL)
def train_dense(plan: dict, data_dir: str, workdir: str, replicate: str) -> dict[str, Any]:
    """Train one replicate's dense network once, with a checkpoint at every rewind point (resumes)."""
    return tasks.train_dense(plan, data_dir, workdir, replicate)


@task(map_index_template=REPLICATE_LABEL, multiple_outputs=False)
def make_masks(workdir: str, replicate: str) -> dict[str, Any]:
    """One magnitude mask per sparsity level of one replicate; returns one small descriptor per mask."""
    return tasks.make_masks(workdir, replicate)


@task
def plan_tickets(replicates: list[dict], plan: dict, per_task: int) -> list[dict[str, Any]]:
    """Every (replicate, mask, rewind point), one per instance or in groups: the kwargs of the mapped late_reset
    (none for iterative pruning)."""
    return tasks.plan_tickets(replicates, plan, per_task)


# Tickets before controls: the experiment's result comes first, and the controls' shorter
# instances then fill the last free slots, so the run does not end with one long group alone.
@task(**TRAINING, map_index_template=GROUP_LABEL, priority_weight=2)
def late_reset(workdir: str, masks: list[dict], rewind: str, group: str) -> dict[str, Any]:
    """Rewind to ``rewind``, apply each of the group's ``masks``, retrain to the end with the mask fixed."""
    return tasks.retrain(workdir, masks, rewind, group)


@task
def plan_chains(replicates: list[dict], plan: dict) -> list[dict[str, Any]]:
    """Iterative pruning: one chain per (replicate, rewind point), the kwargs of the mapped imp_chain (none for one-shot)."""
    return tasks.plan_chains(replicates, plan)


@task(**TRAINING, map_index_template=GROUP_LABEL, priority_weight=2)
def imp_chain(workdir: str, rewind: str, group: str) -> dict[str, Any]:
    """Iterative magnitude pruning at rewind point ``rewind``: levels 1..K, each pruned from the one before (resumes)."""
    return tasks.chain(workdir, rewind, group)


@task
def plan_controls(replicates: list[dict], plan: dict, per_task: int) -> list[dict[str, Any]]:
    """(replicate, control kind, mask, rewind point), one per instance or in groups; empty when the controls are off."""
    return tasks.plan_controls(replicates, plan, per_task)


@task(**TRAINING, map_index_template=GROUP_LABEL)
def controls(workdir: str, masks: list[dict], rewind: str, group: str, control: str) -> dict[str, Any]:
    """A control (random_reinit / random_prune) for each of the group's ``masks`` at rewind point ``rewind``."""
    return tasks.retrain(workdir, masks, rewind, group, control)


@task
def plan_stability(replicates: list[dict], plan: dict) -> list[dict[str, Any]]:
    """(replicate, network, rewind point): the kwargs of the mapped stability; empty when stability is off."""
    return tasks.plan_stability(replicates, plan)


@task(**TRAINING, map_index_template=GROUP_LABEL)
def stability(workdir: str, rewind: str, mask: str | None, points: int, group: str) -> dict[str, Any]:
    """The instability analysis of one network (``mask`` None: the dense one) at ``rewind``: two copies, then the line."""
    return tasks.stability(workdir, rewind, mask, points, group)


@task(trigger_rule=TriggerRule.ALL_DONE)
def report(report_dir: str | None, workdirs: list[str] | None, plan: dict) -> dict[str, Any]:
    """Collect every result of every replicate (failed and missing ones listed, never fatal): csv, plot, report.md."""
    return tasks.report(report_dir, workdirs, plan)


@task(trigger_rule=TriggerRule.ALL_DONE)
def check_results(report_dir: str | None, workdirs: list[str] | None, plan: dict) -> dict[str, Any]:
    """Rewrite the report from what is on disk, then fail the run when any combination failed or is missing."""
    return tasks.check_results(report_dir, workdirs, plan)


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
        execution_timeout=PREPROCESS_TIMEOUT,
        doc_md="Spark job: image folder -> TFRecord shards + manifest.json. Waits for another run writing the "
               "same data; when the data is up to date, says so and starts no Spark.",
    )
    fetched >> preprocess
    prepared = prepare_workdir(plan, checked["data_dir"], checked["artifact_root"])
    preprocess >> prepared
    replicates = plan_replicates(prepared["workdirs"], prepared["experiment_ids"])
    dense = train_dense.partial(plan=plan, data_dir=checked["data_dir"]).expand_kwargs(replicates)
    masks = make_masks.expand_kwargs(replicates)
    dense >> masks
    per_task = checked["tickets_per_task"]
    tickets = late_reset.expand_kwargs(plan_tickets(masks, plan, per_task))
    chains = imp_chain.expand_kwargs(plan_chains(masks, plan))
    # The controls of an iterative experiment need their chain's level masks: they are planned once
    # every chain has ended, whatever its state (all_done), so that a failed chain stops only its own
    # controls (they fail at once, naming the chain) and a one-shot run, whose imp_chain has nothing to
    # map and is skipped, plans its controls as before; a failure before the chains still stops them.
    chains_done = EmptyOperator(task_id="chains_done", trigger_rule=TriggerRule.ALL_DONE,
                                doc_md="Every imp_chain instance has ended (success, failed or skipped).")
    planned_controls = plan_controls(masks, plan, per_task)
    chains >> chains_done >> planned_controls
    control_runs = controls.expand_kwargs(planned_controls)
    # A ticket's instability analysis of an iterative run needs its chain's level mask, as a control does.
    planned_stability = plan_stability(masks, plan)
    chains_done >> planned_stability
    analyses = stability.expand_kwargs(planned_stability)
    summary = report(prepared["report_dir"], prepared["workdirs"], plan)
    [tickets, chains, control_runs, analyses] >> summary
    # The check waits for the tickets themselves, not only for the report: "Clear only failed tasks"
    # leaves a successful report alone, and the check must judge the tickets it re-ran.
    [tickets, chains, control_runs, analyses, summary] >> check_results(prepared["report_dir"], prepared["workdirs"], plan)


lottery_ticket()

"""One lottery-ticket experiment (Frankle & Carbin; late resetting) per DAG run.

validate_config -> fetch_dataset -> preprocess (Spark) -> prepare_workdir -> train_dense -> make_masks
    -> late_reset[mask x rewind point]  (+ plan_controls -> controls[control x mask x rewind point])
    -> report (all_done) -> check_results

This file only wires the engine (``lottery/``): it imports nothing heavier than ``lottery.config``
at parse time; TensorFlow, Keras, NumPy and PySpark are imported inside the tasks (or in the Spark
job's own process). See docs/dag.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Param, TriggerRule, dag, get_current_context, task

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tasks re-parse this file: the engine must be importable there too
    sys.path.insert(0, str(REPO))

from lottery.config import (  # noqa: E402  (light: no TensorFlow, Keras or NumPy)
    AUGMENTATIONS,
    CONTROLS,
    MODEL_NAMES,
    OPTIMIZERS,
    PRUNING_SCOPES,
    ConfigError,
    ExperimentConfig,
)

log = logging.getLogger("lottery.dag")

DAG_ID = "lottery_ticket"
POOL = "lottery_workers"
POOL_SLOTS = 20
# The queue the training tasks are declared on. A run's `queue` param moves them to another queue
# (plugins/airflow_local_settings.py); the deployment-wide default comes from the environment of
# the scheduler and dag-processor.
GPU_QUEUE = os.environ.get("LOTTERY_GPU_QUEUE", "gpu")
ARTIFACT_ROOT = os.environ.get("LOTTERY_ARTIFACT_ROOT", str(REPO / "artifacts"))
# Training tasks are retried (a lost worker, an OOM); invalid configs and corrupt artifacts are not.
RETRIES = int(os.environ.get("LOTTERY_RETRIES", "2"))
RETRY_DELAY = timedelta(seconds=int(os.environ.get("LOTTERY_RETRY_DELAY_S", "60")))
SPARK_PYTHON = os.environ.get("LOTTERY_SPARK_PYTHON", sys.executable)
FASHION_MNIST = "fashion_mnist"
# Level k of the default schedule removes 1 - (1 - prune_rate)**k of the prunable weights.
DEFAULT_NUM_LEVELS = 20
DEFAULT_PRUNE_RATE = 0.2
CONTROL_MATCH_TOLERANCE = 0.005  # a control sparsity picks the nearest level within 0.5 points

# Mapped instances are named from their kwargs (rendered before the task runs): "5.0% left, rewind 2ep".
TICKET_LABEL = "{{ task.op_kwargs['mask']['label'] }}, rewind {{ task.op_kwargs['rewind'] }}"
CONTROL_LABEL = "{{ task.op_kwargs['control'] }}: " + TICKET_LABEL
STEP_PATTERN = r"^\s*(\d+\s*ep\s*(\d+\s*it)?|\d+\s*it)\s*$"
QUEUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}$"
_DEFAULTS = ExperimentConfig()
ENGINE_FIELDS = tuple(_DEFAULTS.to_dict())


def derived_sparsities(num_levels: int, prune_rate: float) -> list[float]:
    """``sparsity_k = 1 - (1 - prune_rate)**k`` for k = 1..num_levels (rounded like the config's default)."""
    return [round(1 - (1 - prune_rate) ** k, 6) for k in range(1, num_levels + 1)]


# Three levels across the range (51.2%, 10.7% and 2.3% of the weights left), as in the LTH papers' control plots.
DEFAULT_CONTROL_SPARSITIES = [derived_sparsities(DEFAULT_NUM_LEVELS, DEFAULT_PRUNE_RATE)[k - 1] for k in (3, 10, 17)]


def _step_list(description: str, default: list[str], *, min_items: int, title: str, section: str) -> Param:
    return Param(
        default,
        type="array",
        items={"type": "string", "pattern": STEP_PATTERN},
        minItems=min_items,
        uniqueItems=True,
        title=title,
        description=description,
        section=section,
    )


PARAMS: dict[str, Param] = {
    # ---- data ----
    "dataset": Param(
        FASHION_MNIST,
        type="string",
        pattern=r"^(fashion_mnist|/.*[^/].*)$",
        title="Data set",
        description="`fashion_mnist` (the bundled Debian package, exported to PNGs) or the absolute path "
        "of an ImageNet-layout folder: train/<class>/*.png|jpg and val/<class>/*.",
        section="Data",
    ),
    "dataset_limit": Param(
        None,
        type=["null", "integer"],
        minimum=20,
        title="Fashion-MNIST: images per split",
        description="Use only the first N images of each Fashion-MNIST split (smoke tests). Empty: all 70,000.",
        section="Data",
    ),
    "image_size": Param(
        28, type="integer", minimum=8, maximum=512, title="Image size (pixels)",
        description="Images are resized to image_size x image_size by the Spark job.", section="Data",
    ),
    "channels": Param(
        1, type="integer", enum=[1, 3], title="Channels", description="1 = grayscale, 3 = RGB.", section="Data",
    ),
    "encoding": Param(
        "png", type="string", enum=["png", "jpeg", "raw"], title="Record encoding",
        description="How the images are stored in the TFRecord shards.", section="Data",
    ),
    # ---- model and training ----
    "model": Param(_DEFAULTS.model, type="string", enum=list(MODEL_NAMES), title="Model", section="Model and training"),
    "training_steps": Param(
        _DEFAULTS.training_steps, type="string", pattern=STEP_PATTERN, title="Training length",
        description="A step string: `8ep`, `4000it` or `2ep100it` (epochs and/or iterations).", section="Model and training",
    ),
    "batch_size": Param(_DEFAULTS.batch_size, type="integer", minimum=1, maximum=65536, title="Batch size", section="Model and training"),
    "optimizer": Param(_DEFAULTS.optimizer, type="string", enum=list(OPTIMIZERS), title="Optimizer", section="Model and training"),
    "lr": Param(_DEFAULTS.lr, type="number", exclusiveMinimum=0, maximum=100, title="Learning rate", section="Model and training"),
    "momentum": Param(
        _DEFAULTS.momentum, type="number", minimum=0, exclusiveMaximum=1, title="Momentum (SGD)", section="Model and training",
    ),
    "nesterov": Param(_DEFAULTS.nesterov, type="boolean", title="Nesterov momentum (SGD)", section="Model and training"),
    "weight_decay": Param(_DEFAULTS.weight_decay, type="number", minimum=0, title="Weight decay", section="Model and training"),
    "warmup_steps": Param(
        _DEFAULTS.warmup_steps, type="string", pattern=STEP_PATTERN, title="Linear warm-up",
        description="A step string; `0it` = no warm-up.", section="Model and training",
    ),
    "lr_milestones": _step_list(
        "Steps at which the learning rate is multiplied by lr_gamma (one per line).",
        list(_DEFAULTS.lr_milestones), min_items=0, title="LR milestones", section="Model and training",
    ),
    "lr_gamma": Param(_DEFAULTS.lr_gamma, type="number", exclusiveMinimum=0, maximum=1, title="LR decay factor", section="Model and training"),
    "augmentation": Param(
        _DEFAULTS.augmentation, type="string", enum=list(AUGMENTATIONS), title="Augmentation", section="Model and training",
    ),
    "mixed_precision": Param(_DEFAULTS.mixed_precision, type="boolean", title="Mixed precision (float16)", section="Model and training"),
    "jit_compile": Param(_DEFAULTS.jit_compile, type="boolean", title="XLA jit_compile", section="Model and training"),
    "seed": Param(_DEFAULTS.seed, type="integer", minimum=0, maximum=2**31 - 1, title="Seed", section="Model and training"),
    # ---- pruning and late resetting ----
    "rewind_points": _step_list(
        "Where the pruned network is reset to (late resetting), one step string per line; `0it` is the original "
        "lottery ticket. Must be before the end of training.",
        list(_DEFAULTS.rewind_points), min_items=1, title="Rewind points", section="Pruning",
    ),
    "sparsities": Param(
        [],
        type="array",
        items={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        uniqueItems=True,
        title="Sparsities (explicit)",
        description="Fractions of prunable weights removed, e.g. [0.5, 0.9, 0.99]. Empty (the default): "
        "num_levels levels from prune_rate. When given, num_levels and prune_rate are ignored.",
        section="Pruning",
    ),
    "num_levels": Param(
        DEFAULT_NUM_LEVELS, type="integer", minimum=1, maximum=100, title="Number of sparsity levels",
        description="Used when `sparsities` is empty: level k removes 1 - (1 - prune_rate)^k of the weights.",
        section="Pruning",
    ),
    "prune_rate": Param(
        DEFAULT_PRUNE_RATE, type="number", exclusiveMinimum=0, exclusiveMaximum=1, title="Pruning rate per level",
        description="Used when `sparsities` is empty (0.2: 20% of the remaining weights per level).", section="Pruning",
    ),
    "pruning_scope": Param(_DEFAULTS.pruning_scope, type="string", enum=list(PRUNING_SCOPES), title="Pruning scope", section="Pruning"),
    "output_layer_prune_factor": Param(
        _DEFAULTS.output_layer_prune_factor, type="number", exclusiveMinimum=0, maximum=1,
        title="Output layer prune factor", description="The output layer is pruned at this fraction of the rate.",
        section="Pruning",
    ),
    # ---- controls ----
    "controls": Param(True, type="boolean", title="Run the random baselines", section="Controls"),
    "control_kinds": Param(
        list(CONTROLS), type="array", items={"type": "string", "enum": list(CONTROLS)}, minItems=1, uniqueItems=True,
        title="Control kinds", description="random_reinit: the ticket's mask, fresh random weights; "
        "random_prune: the rewound weights, a random mask with the same layer-wise sparsity.", section="Controls",
    ),
    "control_sparsities": Param(
        DEFAULT_CONTROL_SPARSITIES,
        type="array",
        items={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        uniqueItems=True,
        title="Control sparsities",
        description="The levels the controls run at (each matched to the nearest sparsity level within 0.005); "
        "empty: every level. Every rewind point is run.",
        section="Controls",
    ),
    # ---- execution ----
    "artifact_root": Param(
        ARTIFACT_ROOT, type="string", pattern=r"^/", title="Artifact root",
        description="Absolute path shared by all workers: data sets under data/, one work directory per experiment id.",
        section="Execution",
    ),
    "queue": Param(
        GPU_QUEUE, type="string", pattern=QUEUE_PATTERN, title="Training queue",
        description="Celery queue of the training tasks (train_dense, late_reset, controls). The LocalExecutor ignores it.",
        section="Execution",
    ),
}


# ---- plain helpers (unit-tested; no Airflow context needed) -----------------------------------
def engine_conf(params: dict[str, Any]) -> dict[str, Any]:
    """The engine's config fields from the run's params (``sparsities`` resolved)."""
    conf = {k: params[k] for k in ENGINE_FIELDS if k in params and k != "sparsities"}
    explicit = list(params.get("sparsities") or [])
    conf["sparsities"] = explicit or derived_sparsities(
        int(params.get("num_levels", DEFAULT_NUM_LEVELS)), float(params.get("prune_rate", DEFAULT_PRUNE_RATE))
    )
    return conf


def data_key(params: dict[str, Any]) -> str:
    """The preprocessed data set's directory name: data set + image size + channels + encoding."""
    dataset = params["dataset"]
    if dataset == FASHION_MNIST:
        name = FASHION_MNIST
    else:
        path = str(Path(dataset).resolve())
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).name)[:40] or "images"
        name = f"{stem}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    key = f"{name}-{params['image_size']}px-c{params['channels']}-{params['encoding']}"
    if params.get("dataset_limit"):
        key += f"-n{params['dataset_limit']}"
    return key


def source_dir(params: dict[str, Any]) -> str:
    """The image folder the Spark job reads."""
    if params["dataset"] == FASHION_MNIST:
        limit = params.get("dataset_limit")
        return str(Path(params["artifact_root"]) / "sources" / (FASHION_MNIST + (f"-n{limit}" if limit else "")))
    return str(Path(params["dataset"]).resolve())


def match_control_sparsities(wanted: list[float], levels: list[float], *, strict: bool = True) -> list[float]:
    """Each wanted control sparsity mapped to the nearest experiment level (empty list: all levels).
    ``strict``: a wanted value further than the tolerance from every level is an error (the
    default control levels are not strict, so they follow a run's own ``sparsities``)."""
    if not wanted:
        return list(levels)
    out = []
    for w in wanted:
        nearest = min(levels, key=lambda s: abs(s - w))
        if strict and abs(nearest - w) > CONTROL_MATCH_TOLERANCE:
            raise ConfigError(
                "control_sparsities", w,
                f"is not one of this experiment's sparsity levels ({', '.join(f'{s:g}' for s in levels)})",
            )
        if nearest not in out:
            out.append(nearest)
    return out


def check_params(params: dict[str, Any], conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checks the params' JSON schema cannot express (raises ``ConfigError`` naming the field),
    and everything the run derives from its params: engine config, rewind labels, paths, Spark args."""
    conf = conf or {}
    unknown = sorted(set(conf) - set(PARAMS))
    if unknown:
        raise ConfigError(unknown[0], conf[unknown[0]], f"unknown parameter; known: {', '.join(sorted(PARAMS))}")
    if params["dataset"] != FASHION_MNIST:
        if params.get("dataset_limit"):
            raise ConfigError("dataset_limit", params["dataset_limit"], "only applies to dataset fashion_mnist")
        if not Path(params["dataset"]).is_dir():
            raise ConfigError("dataset", params["dataset"], "is not a directory (expected train/<class>/..., val/<class>/...)")
    from lottery.experiment import mask_id, resolve_config

    cfg = resolve_config(engine_conf(params))
    if params.get("sparsities"):
        log.info("explicit sparsities given: num_levels and prune_rate are ignored")
    controls = None
    if params["controls"]:
        wanted = list(params["control_sparsities"])
        levels = match_control_sparsities(wanted, list(cfg.sparsities), strict=wanted != DEFAULT_CONTROL_SPARSITIES)
        controls = {"kinds": list(params["control_kinds"]), "mask_ids": [mask_id(s) for s in levels]}

    root = Path(params["artifact_root"])
    data_dir = root / "data" / data_key(params)
    src = source_dir(params)
    spark_args = [
        "--input", src, "--output", str(data_dir), "--image-size", str(params["image_size"]),
        "--channels", str(params["channels"]), "--encoding", params["encoding"],
    ]
    rewinds = cfg.rewind_labels()
    log.info(
        "experiment: model %s, %s, %d sparsity levels (%s) x %d rewind points (%s) = %d tickets; controls %s; "
        "data %s -> %s; artifact root %s",
        cfg.model, cfg.training_steps, len(cfg.sparsities), ", ".join(f"{s:g}" for s in cfg.sparsities),
        len(rewinds), ", ".join(rewinds), len(cfg.sparsities) * len(rewinds),
        f"{controls['kinds']} at {controls['mask_ids']}" if controls else "off", src, data_dir, root,
    )
    return {
        "config": cfg.to_dict(),
        "rewinds": rewinds,
        "dataset": params["dataset"],
        "dataset_limit": params.get("dataset_limit"),
        "source_dir": src,
        "data_dir": str(data_dir),
        "artifact_root": str(root),
        "spark_args": spark_args,
        "controls": controls,
    }


def remaining_label(remaining: float) -> str:
    pct = 100 * remaining
    return f"{pct:.1f}% left" if pct >= 0.95 else f"{pct:.2g}% left"


def training_threads(kind: str) -> int:
    """TF threads for one training task: the cores divided among the training tasks that run at once.

    ``LOTTERY_THREADS`` wins. The dense network trains alone and gets every core. A ticket shares the
    machine with the other tasks of its worker: ``[core] parallelism`` for the LocalExecutor,
    ``[celery] worker_concurrency`` for Celery workers (and never more than the pool's slots).
    """
    if os.environ.get("LOTTERY_THREADS"):
        return max(1, int(os.environ["LOTTERY_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    if kind == "dense":
        return cores
    from airflow.sdk import conf

    executor = conf.get("core", "executor", fallback="LocalExecutor")
    if "Celery" in executor:
        slots = conf.getint("celery", "worker_concurrency", fallback=16)
    else:
        slots = conf.getint("core", "parallelism", fallback=32)
    return max(1, cores // max(1, min(slots, POOL_SLOTS)))


def _engine_call(fn, *args, **kwargs):
    """Run an engine step; errors a retry cannot fix fail the task at once (no retries)."""
    from airflow.sdk.exceptions import AirflowFailException

    from lottery.errors import LotteryError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, LotteryError) as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def _queue_note(context) -> str:
    ti = context.get("ti")
    return f"queue {getattr(ti, 'queue', None) or '?'}"


DOC_MD = """
### Lottery tickets with late resetting

One run = one experiment: Spark preprocesses the images once (cached per data set + image size +
channels + encoding under `<artifact_root>/data/`), the dense network is trained once and saves a
checkpoint at every rewind point, it is magnitude-pruned at every sparsity level, and every
(mask, rewind point) pair is retrained from its rewind point with the mask fixed (`late_reset`, one
mapped task instance each: 20 levels x 5 rewind points = 100 by default). `report` collects every
result (also when some failed) into `results.csv`, `accuracy_vs_sparsity.png` and `report.md`;
`check_results` fails the run if any combination failed or is missing.

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
* *Execution*: `artifact_root`, `queue` (the Celery queue of the training tasks).

Cross-field errors the form cannot express (a rewind point after the end of training, an unknown
conf key, a control sparsity that is not a level) fail `validate_config` (or, when they depend on the
data set size, `train_dense`) at once, without retries, with a message naming the field.
"""


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
    @task(multiple_outputs=True)
    def validate_config() -> dict[str, Any]:
        """Check the run's params (fail fast, no retries) and derive every path of the run."""
        from airflow.sdk.exceptions import AirflowFailException

        context = get_current_context()
        try:
            return check_params(dict(context["params"]), dict(context["dag_run"].conf or {}))
        except ConfigError as exc:
            raise AirflowFailException(str(exc)) from exc

    @task
    def fetch_dataset(dataset: str, source: str, limit: int | None) -> dict[str, Any]:
        """Export the bundled Fashion-MNIST to an image folder (cached); skipped for an image folder."""
        from airflow.sdk.exceptions import AirflowSkipException

        if dataset != FASHION_MNIST:
            raise AirflowSkipException(f"dataset is the image folder {dataset}: nothing to fetch")
        from lottery.data.fetch import export_fashion_mnist

        started = time.perf_counter()
        log.info("fetch_dataset: start  Fashion-MNIST -> %s (limit %s)", source, limit)
        summary = _engine_call(export_fashion_mnist, source, limit=limit)
        log.info("fetch_dataset: done in %.1fs  %s", time.perf_counter() - started, summary)
        return {k: v for k, v in (summary or {}).items() if isinstance(v, (str, int, float, bool, type(None)))}

    @task
    def prepare_workdir(config: dict, data_dir: str, artifact_root: str) -> dict[str, Any]:
        """``<artifact_root>/<experiment id>``: created, or checked to hold this very experiment."""
        from lottery import experiment

        cfg = experiment.resolve_config(config)
        workdir = _engine_call(experiment.workdir_for, cfg, data_dir, artifact_root)
        fresh = not (workdir / "config.json").exists()
        _engine_call(experiment.prepare_workdir, cfg, data_dir, workdir)
        done = len(list((workdir / "tickets").glob("*/result.json")))
        dense_done = (workdir / "dense" / "result.json").exists()
        log.info(
            "work dir %s (experiment %s): %s", workdir, workdir.name,
            "new" if fresh else f"reused: dense {'done' if dense_done else 'not done'}, {done} tickets done",
        )
        return {"workdir": str(workdir), "experiment_id": workdir.name, "reused": not fresh}

    @task(pool=POOL, queue=GPU_QUEUE, retries=RETRIES, retry_delay=RETRY_DELAY)
    def train_dense(config: dict, data_dir: str, workdir: str) -> dict[str, Any]:
        """Train the dense network once, with a checkpoint at every rewind point (resumes)."""
        from lottery import experiment

        threads = training_threads("dense")
        log.info("train_dense: start  workdir %s  threads %d  %s", workdir, threads, _queue_note(get_current_context()))
        started = time.perf_counter()
        cfg = experiment.resolve_config(config)
        result = _engine_call(experiment.run_dense, cfg, data_dir, workdir, threads=threads)
        log.info(
            "train_dense: %s in %.1fs  val_accuracy %.4f",
            "already done" if result.get("skipped") else "done", time.perf_counter() - started, result["val_accuracy"],
        )
        return {k: result.get(k) for k in ("val_accuracy", "best_val_accuracy", "epochs", "steps", "skipped")}

    @task
    def make_masks(workdir: str) -> list[dict[str, Any]]:
        """One magnitude mask per sparsity level; returns one small descriptor per mask."""
        from lottery import experiment

        started = time.perf_counter()
        masks = _engine_call(experiment.make_masks, workdir)
        out = [
            {"index": m["index"], "mask_id": m["mask_id"], "sparsity": m["sparsity"], "remaining": m["remaining"],
             "label": remaining_label(m["remaining"])}
            for m in masks
        ]
        log.info("make_masks: %d masks in %.1fs: %s", len(out), time.perf_counter() - started, ", ".join(m["label"] for m in out))
        return out

    @task(
        pool=POOL,
        queue=GPU_QUEUE,
        retries=RETRIES,
        retry_delay=RETRY_DELAY,
        map_index_template=TICKET_LABEL,
    )
    def late_reset(workdir: str, mask: dict, rewind: str) -> dict[str, Any]:
        """Rewind to ``rewind``, apply ``mask``, retrain to the end with the mask fixed."""
        return _retrain_task(workdir, mask, rewind, None)

    @task
    def plan_tickets(masks: list[dict], rewinds: list[str]) -> list[dict[str, Any]]:
        """Every (mask, rewind point) pair: the kwargs of the mapped late_reset instances."""
        plan = [{"mask": m, "rewind": r} for m in masks for r in rewinds]
        log.info("late_reset: %d masks x %d rewind points = %d tickets", len(masks), len(rewinds), len(plan))
        return plan

    @task
    def plan_controls(masks: list[dict], rewinds: list[str], controls: dict | None) -> list[dict[str, Any]]:
        """(control kind, mask, rewind point) triples; empty when the controls are off."""
        if not controls:
            log.info("controls are off")
            return []
        wanted = set(controls["mask_ids"])
        plan = [
            {"mask": m, "rewind": r, "control": kind}
            for kind in controls["kinds"] for m in masks if m["mask_id"] in wanted for r in rewinds
        ]
        log.info(
            "controls: %s at %s x %d rewind points = %d runs", ", ".join(controls["kinds"]),
            ", ".join(m["label"] for m in masks if m["mask_id"] in wanted), len(rewinds), len(plan),
        )
        return plan

    @task(
        task_id="controls",
        pool=POOL,
        queue=GPU_QUEUE,
        retries=RETRIES,
        retry_delay=RETRY_DELAY,
        map_index_template=CONTROL_LABEL,
    )
    def run_control(workdir: str, mask: dict, rewind: str, control: str) -> dict[str, Any]:
        """A random baseline (random_reinit / random_prune) for one mask and rewind point."""
        return _retrain_task(workdir, mask, rewind, control)

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def report(workdir: str | None, rewinds: list[str], controls: dict | None) -> dict[str, Any]:
        """Collect every result (failed and missing ones listed, never fatal): csv, plot, report.md."""
        from airflow.sdk.exceptions import AirflowFailException

        if not workdir:
            raise AirflowFailException("no work directory: the run failed before prepare_workdir (see the failed task above)")
        from lottery import experiment
        from lottery.report import write_report

        expected = None
        if controls:
            expected = [
                {"mask_id": mid, "rewind": r, "control": kind}
                for kind in controls["kinds"] for mid in controls["mask_ids"] for r in rewinds
            ]
        paths = _engine_call(write_report, workdir, expected_controls=expected)
        rows = experiment.summarize(workdir)
        log.info("results:\n%s", experiment.format_table(workdir, rows))
        problems = paths.get("problems", [])
        for p in problems:
            log.warning("not done: %s", p)
        log.info("report: %s", paths["report"])
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in paths.items()}

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def check_results(summary: dict | None) -> dict[str, Any]:
        """Fail the run (after the report is written) when any combination failed or is missing."""
        from airflow.sdk.exceptions import AirflowFailException

        if not summary:
            raise AirflowFailException("no report was written: an earlier task failed (see validate_config, preprocess, report)")
        problems = summary.get("problems", [])
        if problems:
            raise AirflowFailException(
                f"{len(problems)} of {summary.get('expected', '?')} combinations failed or are missing "
                f"(see {summary.get('report')}): " + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
            )
        log.info("all %s combinations done; report %s", summary.get("expected"), summary.get("report"))
        return {"ok": True, "report": summary.get("report")}

    checked = validate_config()
    fetched = fetch_dataset(checked["dataset"], checked["source_dir"], checked["dataset_limit"])
    preprocess = SparkSubmitOperator(
        task_id="preprocess",
        conn_id="spark_default",
        application=str(REPO / "spark_jobs" / "preprocess_images.py"),
        application_args=checked["spark_args"],
        name="lottery-preprocess",
        env_vars={"PYSPARK_PYTHON": SPARK_PYTHON},  # the job ships lottery/ to the executors itself
        conf={"spark.pyspark.python": SPARK_PYTHON, "spark.ui.showConsoleProgress": "false"},
        trigger_rule=TriggerRule.NONE_FAILED,  # fetch_dataset is skipped for an image folder
        retries=1,
        retry_delay=timedelta(seconds=30),
        doc_md="Spark job: image folder -> TFRecord shards + manifest.json (a no-op when the output exists).",
    )
    fetched >> preprocess
    prepared = prepare_workdir(checked["config"], checked["data_dir"], checked["artifact_root"])
    preprocess >> prepared
    workdir = prepared["workdir"]
    dense = train_dense(checked["config"], checked["data_dir"], workdir)
    masks = make_masks(workdir)
    dense >> masks
    tickets = late_reset.partial(workdir=workdir).expand_kwargs(plan_tickets(masks, checked["rewinds"]))
    baselines = run_control.partial(workdir=workdir).expand_kwargs(plan_controls(masks, checked["rewinds"], checked["controls"]))
    summary = report(workdir, checked["rewinds"], checked["controls"])
    [tickets, baselines] >> summary
    check_results(summary)


def _retrain_task(workdir: str, mask: dict, rewind: str, control: str | None) -> dict[str, Any]:
    from lottery import experiment

    context = get_current_context()
    label = f"{mask.get('label') or remaining_label(mask['remaining'])}, rewind {rewind}"
    if control:
        label = f"{control}: {label}"
    threads = training_threads("ticket")
    log.info("%s: start  mask %s  rewind %s  threads %d  %s  workdir %s", label, mask["mask_id"], rewind, threads, _queue_note(context), workdir)
    started = time.perf_counter()
    result = _engine_call(experiment.retrain, workdir, mask["mask_id"], rewind, control=control, threads=threads)
    if result.get("skipped"):
        log.info("%s: already done (val_accuracy %.4f), nothing to do: %s", label, result["val_accuracy"], result.get("ticket"))
    else:
        log.info(
            "%s: done in %.1fs  val_accuracy %.4f (best %.4f)", label, time.perf_counter() - started,
            result["val_accuracy"], result["best_val_accuracy"],
        )
    keep = ("mask_id", "sparsity", "remaining", "rewind", "control", "val_accuracy", "best_val_accuracy", "skipped", "ticket")
    return {k: result.get(k) for k in keep}


lottery_ticket()

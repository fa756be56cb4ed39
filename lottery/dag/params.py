"""The trigger form of the ``lottery_ticket`` DAG and what a run derives from its params.

``PARAMS`` is built from ``ExperimentConfig``'s defaults, so the default run is the default
experiment. ``check_params`` does the checks the form's JSON schema cannot express (raising
``ConfigError`` naming the field) and returns what the run derives from them: the run plan
(``RunPlan.to_dict()``: the config is parsed here once), the data paths and the Spark job's
arguments (all small: they travel through XCom).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from airflow.sdk import Param

from lottery.config import (AUGMENTATIONS, CONTROLS, LEGACY_LR_MILESTONE, MODEL_NAMES, OPTIMIZERS, PRUNING_SCOPES, ConfigChecks,
                            ConfigError, ExperimentConfig)
from lottery.deploy.constants import ALLOWED_ARTIFACT_ROOTS_ENV, ALLOWED_DATA_ROOTS_ENV, GPU_QUEUE, QUEUE_PATTERN
from lottery.deploy.roots import allowed_artifact_roots, allowed_data_roots, path_problem, root_pattern
from lottery.plan import RunPlan

log = logging.getLogger("lottery.dag")

FASHION_MNIST = "fashion_mnist"
STEP_PATTERN = r"^\s*(\d+\s*ep\s*(\d+\s*it)?|\d+\s*it)\s*$"
STEP_ITEM = {"type": "string", "pattern": STEP_PATTERN}
FRACTION_ITEM = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}
_DEFAULTS = ExperimentConfig()
# The params that are ExperimentConfig fields; the others say where the data comes from and where it goes.
CONFIG_FIELDS = tuple(_DEFAULTS.to_dict())
# Where a run may write and read, as this deployment allows (read when the DAG file is parsed, so
# that the form refuses a path outside them before the run exists; validate_config checks again).
ARTIFACT_ROOTS = allowed_artifact_roots()
DATA_ROOTS = allowed_data_roots()
_ARTIFACT_PATTERN = root_pattern(ARTIFACT_ROOTS)
_DATA_PATTERN = root_pattern(DATA_ROOTS)


def _list_param(default: list, items: dict, *, title: str, description: str, section: str, min_items: int | None = None) -> Param:
    """An array param of distinct items (the form shows one per line)."""
    bounds = {} if min_items is None else {"minItems": min_items}
    return Param(default, type="array", items=items, **bounds, uniqueItems=True, title=title, description=description, section=section)


PARAMS: dict[str, Param] = {
    # ---- data ----
    "dataset": Param(
        FASHION_MNIST,
        type="string",
        pattern=f"^(?:{FASHION_MNIST}|{_DATA_PATTERN})$" if _DATA_PATTERN else f"^{FASHION_MNIST}$",
        title="Data set",
        description="`fashion_mnist` (the bundled Debian package, exported to PNGs) or the absolute path "
        "of an ImageNet-layout folder (train/<class>/*.png|jpg and val/<class>/*) in a data root this deployment "
        f"allows: {', '.join(DATA_ROOTS) or f'none ({ALLOWED_DATA_ROOTS_ENV} is not set)'}.",
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
    "lr_milestones": Param(
        None, type=["null", "array"], items=STEP_ITEM, uniqueItems=True, title="LR milestones",
        description="Steps at which the learning rate is multiplied by lr_gamma (one per line). Unset (the default): "
        f"at {LEGACY_LR_MILESTONE}, or at two thirds of training when training is shorter. No decay: lr_gamma 1 (or [] in the JSON conf).",
        section="Model and training",
    ),
    "lr_gamma": Param(_DEFAULTS.lr_gamma, type="number", exclusiveMinimum=0, maximum=1, title="LR decay factor", section="Model and training"),
    "augmentation": Param(
        _DEFAULTS.augmentation, type="string", enum=list(AUGMENTATIONS), title="Augmentation", section="Model and training",
    ),
    "mixed_precision": Param(
        _DEFAULTS.mixed_precision, type=["boolean", "string"], enum=[False, True, "bfloat16", "float16"], title="Mixed precision",
        description='false (float32), "bfloat16" (recommended on Ampere/Hopper GPUs and TPUs) or "float16" (with loss scaling); '
        'true means "float16"', section="Model and training",
    ),
    "jit_compile": Param(_DEFAULTS.jit_compile, type="boolean", title="XLA jit_compile", section="Model and training"),
    "seed": Param(_DEFAULTS.seed, type="integer", minimum=0, maximum=2**31 - 1, title="Seed", section="Model and training"),
    # ---- pruning and late resetting ----
    "rewind_points": _list_param(
        list(_DEFAULTS.rewind_points), STEP_ITEM, min_items=1, title="Rewind points", section="Pruning",
        description="Where the pruned network is reset to (late resetting), one step string per line; `0it` is the original "
        "lottery ticket. Must be before the end of training.",
    ),
    "sparsities": _list_param(
        list(_DEFAULTS.sparsities), FRACTION_ITEM, title="Sparsities (explicit)", section="Pruning",
        description="Fractions of prunable weights removed, e.g. [0.5, 0.9, 0.99]. Empty (the default): "
        "num_levels levels from prune_rate. When given, num_levels and prune_rate are ignored.",
    ),
    "num_levels": Param(
        _DEFAULTS.num_levels, type="integer", minimum=1, maximum=100, title="Number of sparsity levels",
        description="Used when `sparsities` is empty: level k removes 1 - (1 - prune_rate)^k of the weights.",
        section="Pruning",
    ),
    "prune_rate": Param(
        _DEFAULTS.prune_rate, type="number", exclusiveMinimum=0, exclusiveMaximum=1, title="Pruning rate per level",
        description="Used when `sparsities` is empty (0.2: 20% of the remaining weights per level).", section="Pruning",
    ),
    "pruning_scope": Param(_DEFAULTS.pruning_scope, type="string", enum=list(PRUNING_SCOPES), title="Pruning scope", section="Pruning"),
    "output_layer_prune_factor": Param(
        _DEFAULTS.output_layer_prune_factor, type="number", exclusiveMinimum=0, maximum=1,
        title="Output layer prune factor", description="The output layer is pruned at this fraction of the rate.",
        section="Pruning",
    ),
    # ---- controls ----
    "controls": Param(_DEFAULTS.controls, type="boolean", title="Run the random baselines", section="Controls"),
    "control_kinds": _list_param(
        list(_DEFAULTS.control_kinds), {"type": "string", "enum": list(CONTROLS)}, min_items=1,
        title="Control kinds", description="random_reinit: the ticket's mask, fresh random weights; "
        "random_prune: the rewound weights, a random mask with the same layer-wise sparsity.", section="Controls",
    ),
    "control_sparsities": _list_param(
        list(_DEFAULTS.control_sparsities), FRACTION_ITEM, title="Control sparsities", section="Controls",
        description="The levels the controls run at (each matched to the nearest sparsity level within 0.005); "
        "empty: every level. Every rewind point is run.",
    ),
    # ---- execution ----
    "artifact_root": Param(
        ARTIFACT_ROOTS[0], type="string", pattern=f"^(?:{_ARTIFACT_PATTERN})$", title="Artifact root",
        description="Absolute path shared by all workers: data sets under data/, one work directory per experiment id. "
        f"In or under a root this deployment allows: {', '.join(ARTIFACT_ROOTS)}.",
        section="Execution",
    ),
    "queue": Param(
        GPU_QUEUE, type="string", pattern=QUEUE_PATTERN, title="Training queue",
        description="Celery queue of the training tasks (train_dense, late_reset, controls). The LocalExecutor ignores it.",
        section="Execution",
    ),
    "tickets_per_task": Param(
        1, type="integer", minimum=1, title="Tickets per training task",
        description="How many tickets one late_reset / controls task instance trains, in one process that opens the data "
        "and compiles the model once. 1: one task instance per ticket. K > 1: consecutive masks of one rewind point (and "
        "one control kind) in groups of K, named like `rewind 1ep: masks 1-10 (80.0%…10.7% left)`. Changes no result "
        "and not the experiment id; only how the work is split into tasks.",
        section="Execution",
    ),
}


def experiment_config(params: dict[str, Any]) -> ExperimentConfig:
    """The engine's config from the run's params (validated: ``ConfigError`` names the field)."""
    return ExperimentConfig.from_dict({k: params[k] for k in CONFIG_FIELDS if k in params})


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


def check_params(params: dict[str, Any], conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checks the params' JSON schema cannot express, and everything the run derives from its
    params: the run plan, the data paths, the Spark args. Raises one ``ConfigError`` that names
    every invalid field (unknown conf keys, paths outside the allowed roots, config errors)."""
    checks = ConfigChecks()
    _check_conf_keys(checks, conf or {})
    checks.run(("artifact_root",), lambda: _check_artifact_root(params["artifact_root"]))
    _check_dataset(checks, params)
    config: list[ExperimentConfig] = []
    checks.run((), lambda: config.append(experiment_config(params)))
    checks.raise_if_any()
    plan = RunPlan.from_config(config[0])
    if params.get("sparsities"):
        log.info("explicit sparsities given: num_levels and prune_rate are ignored")
    data = data_paths(params)
    _log_experiment(plan, data)
    return {"plan": plan.to_dict(), **data, "tickets_per_task": int(params.get("tickets_per_task") or 1)}


def data_paths(params: dict[str, Any]) -> dict[str, Any]:
    """Where the images come from and where the Spark job writes the preprocessed data set."""
    root = Path(params["artifact_root"])
    data_dir = str(root / "data" / data_key(params))
    src = source_dir(params)
    spark_args = [
        "--input", src, "--output", data_dir, "--image-size", str(params["image_size"]),
        "--channels", str(params["channels"]), "--encoding", params["encoding"],
    ]
    return {"dataset": params["dataset"], "dataset_limit": params.get("dataset_limit"), "source_dir": src,
            "data_dir": data_dir, "artifact_root": str(root), "spark_args": spark_args}


def _check_conf_keys(checks: ConfigChecks, conf: dict[str, Any]) -> None:
    for key in sorted(set(conf) - set(PARAMS)):
        checks.add(ConfigError(key, conf[key], f"unknown parameter; known: {', '.join(sorted(PARAMS))}"))


def _check_artifact_root(path: str) -> None:
    """Where the run writes: in an allowed root once ``..`` and symlinks are resolved (the form saw only the spelling)."""
    problem = path_problem(path, allowed_artifact_roots(os.environ), ALLOWED_ARTIFACT_ROOTS_ENV)
    if problem:
        raise ConfigError("artifact_root", path, problem)


def _check_dataset(checks: ConfigChecks, params: dict[str, Any]) -> None:
    dataset = params["dataset"]
    if dataset == FASHION_MNIST:
        return
    if params.get("dataset_limit"):
        checks.add(ConfigError("dataset_limit", params["dataset_limit"], "only applies to dataset fashion_mnist"))
    problem = path_problem(dataset, allowed_data_roots(os.environ), ALLOWED_DATA_ROOTS_ENV)
    if problem:
        checks.add(ConfigError("dataset", dataset, problem))
    elif not Path(dataset).is_dir():
        checks.add(ConfigError("dataset", dataset, "is not a directory (expected train/<class>/..., val/<class>/...)"))


def _log_experiment(plan: RunPlan, data: dict[str, Any]) -> None:
    cfg, levels = plan.config, [m.sparsity for m in plan.masks]
    kinds = list(dict.fromkeys(c.control for c in plan.controls))
    control_ids = list(dict.fromkeys(c.mask_id for c in plan.controls))
    log.info(
        "experiment: model %s, %s, %d sparsity levels (%s) x %d rewind points (%s) = %d tickets; controls %s; "
        "data %s -> %s; artifact root %s",
        cfg.model, cfg.training_steps, len(levels), ", ".join(f"{s:g}" for s in levels),
        len(plan.rewinds), ", ".join(plan.rewinds), len(plan.tickets),
        f"{kinds} at {control_ids}" if plan.controls else "off", data["source_dir"], data["data_dir"], data["artifact_root"],
    )


def remaining_label(remaining: float) -> str:
    """How a mask is named in the UI and the logs: the share of prunable weights left ("10.7% left")."""
    pct = 100 * remaining
    return f"{pct:.1f}% left" if pct >= 0.95 else f"{pct:.2g}% left"


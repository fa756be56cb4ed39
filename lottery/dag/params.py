"""The trigger form of the ``lottery_ticket`` DAG and what a run derives from its params.

``PARAMS`` is built from ``ExperimentConfig``'s field declarations (default, title, help, type and
choices), so the default run is the default experiment. ``check_params`` does every other check, at
once, raising one ``ConfigError`` that names every bad field in words, and returns what the run
derives from the params: the run plan (``RunPlan.to_dict()``: the config is parsed here once), the
data paths and the Spark job's arguments (all small: they travel through XCom).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from airflow.sdk import Param

from lottery.config import ConfigError, ExperimentConfig
from lottery.deploy.constants import ALLOWED_ARTIFACT_ROOTS_ENV, ALLOWED_DATA_ROOTS_ENV, GPU_QUEUE, QUEUE_PATTERN
from lottery.deploy.roots import allowed_artifact_roots, allowed_data_roots, path_problem
from lottery.plan import RunPlan, check_data_size

log = logging.getLogger("lottery.dag")

FASHION_MNIST = "fashion_mnist"
# The params that are ExperimentConfig fields; the others say where the data comes from and where it goes.
CONFIG_FIELDS = tuple(ExperimentConfig.model_fields)
# Where a run may write and read, as this deployment allows (read when the DAG file is parsed for the
# form's help; validate_config checks a run's paths against the roots of its own environment).
ARTIFACT_ROOTS = allowed_artifact_roots()
DATA_ROOTS = allowed_data_roots()


def _form_type(schema: dict[str, Any]) -> dict[str, Any]:
    """A config field's JSON type and choices, as the form shows them. Ranges, step strings and repeats
    are left to validate_config, which names every bad field at once, in words (the form's JSON-schema
    validation stops at the first)."""
    branches = sorted(schema.get("anyOf", [schema]), key=lambda b: b["type"] != "null")
    out = {"type": branches[0]["type"] if len(branches) == 1 else [b["type"] for b in branches]}
    out.update({k: v for k, v in schema.items() if k == "pattern"})  # a step string's shape
    if any("enum" in b for b in branches):  # a boolean beside a list of choices: its values are choices too
        out["enum"] = [v for b in branches for v in b.get("enum", [False, True] if b["type"] == "boolean" else [])]
    if "items" in schema:
        out["items"] = {k: v for k, v in schema["items"].items() if k in ("type", "enum", "pattern")}
    return out


def _config_params() -> dict[str, Param]:
    """One param per config field, from the field's declaration (the default run is the default experiment)."""
    defaults, schema = ExperimentConfig().to_dict(), ExperimentConfig.model_json_schema()["properties"]
    return {name: Param(defaults[name], **_form_type(schema[name]), title=field.title, section=field.json_schema_extra["section"],
                        **({"description": field.description} if field.description else {}))
            for name, field in ExperimentConfig.model_fields.items()}


PARAMS: dict[str, Param] = {
    # ---- data ----
    "dataset": Param(
        FASHION_MNIST,
        type="string",
        minLength=1,
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
    "val_labels": Param(
        None,
        type=["null", "string"],
        title="Validation labels (flat val/)",
        description="For an image folder whose val/ holds the images directly (the ILSVRC-2012 validation set as "
        "distributed: val/ILSVRC2012_val_00000001.JPEG, ...): the absolute path of their label file, "
        "LOC_val_solution.csv (ImageId,PredictionString) or filename,class rows, in an allowed data root. "
        "Empty: val/ has class folders, or there is no val/.",
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
    # ---- model and training, pruning, controls: ExperimentConfig's fields ----
    **_config_params(),
    # ---- execution ----
    "artifact_root": Param(
        ARTIFACT_ROOTS[0], type="string", minLength=1, title="Artifact root",
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
    if params.get("val_labels"):  # only then: the keys (and data directories) of other runs stay as they were
        key += f"-vl{hashlib.sha256(str(Path(params['val_labels']).resolve()).encode()).hexdigest()[:8]}"
    return key


def source_dir(params: dict[str, Any]) -> str:
    """The image folder the Spark job reads."""
    if params["dataset"] == FASHION_MNIST:
        limit = params.get("dataset_limit")
        return str(Path(params["artifact_root"]) / "sources" / (FASHION_MNIST + (f"-n{limit}" if limit else "")))
    return str(Path(params["dataset"]).resolve())


def check_params(params: dict[str, Any], conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every check of the run's params, and everything the run derives from them: the run plan, the data
    paths, the Spark args. Raises one ``ConfigError`` that names every invalid field in words (unknown
    conf keys, paths outside the allowed roots, config values; and, when the data set is already
    written, the steps that need its size)."""
    conf = conf or {}
    errors = [ConfigError(key, conf[key], f"unknown parameter; known: {', '.join(sorted(PARAMS))}") for key in sorted(set(conf) - set(PARAMS))]
    errors += _path_errors(params)
    try:
        config = experiment_config(params)
    except ConfigError as exc:
        errors.append(exc)
    if errors:
        raise ConfigError.combine(errors)
    plan = RunPlan.from_config(config)
    if params.get("sparsities"):
        log.info("explicit sparsities given: num_levels and prune_rate are ignored")
    data = data_paths(params)
    check_data_size(config, data["data_dir"])
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
    if params.get("val_labels"):
        spark_args += ["--val-labels", str(Path(params["val_labels"]).resolve())]
    return {"dataset": params["dataset"], "dataset_limit": params.get("dataset_limit"), "source_dir": src,
            "data_dir": data_dir, "artifact_root": str(root), "spark_args": spark_args}


def _path_errors(params: dict[str, Any]) -> list[ConfigError]:
    """Where the run writes and reads: in an allowed root once ``..`` and symlinks are resolved; the roots named."""
    errors = []
    problem = path_problem(params["artifact_root"], allowed_artifact_roots(os.environ), ALLOWED_ARTIFACT_ROOTS_ENV)
    if problem:
        errors.append(ConfigError("artifact_root", params["artifact_root"], problem))
    dataset, labels = params["dataset"], params.get("val_labels")
    if dataset == FASHION_MNIST:
        if labels:
            errors.append(ConfigError("val_labels", labels, "only applies to an image folder dataset"))
        return errors
    if labels:
        problem = path_problem(labels, allowed_data_roots(os.environ), ALLOWED_DATA_ROOTS_ENV)
        if problem or not Path(labels).is_file():
            errors.append(ConfigError("val_labels", labels, problem or (
                "is a directory, not a label file" if Path(labels).is_dir() else "does not exist")))
    if params.get("dataset_limit"):
        errors.append(ConfigError("dataset_limit", params["dataset_limit"], "only applies to dataset fashion_mnist"))
    problem = path_problem(dataset, allowed_data_roots(os.environ), ALLOWED_DATA_ROOTS_ENV)
    if problem or not Path(dataset).is_dir():
        errors.append(ConfigError("dataset", dataset, problem or "is not a directory (expected train/<class>/..., val/<class>/...)"))
    return errors


def _log_experiment(plan: RunPlan, data: dict[str, Any]) -> None:
    cfg, levels = plan.config, [m.sparsity for m in plan.masks]
    kinds = list(dict.fromkeys(c.control for c in plan.controls))
    control_ids = list(dict.fromkeys(c.mask_id for c in plan.controls))
    networks = list(dict.fromkeys(s.network for s in plan.stability))
    log.info(
        "experiment: model %s, %s, %d sparsity levels (%s) x %d rewind points (%s) = %d tickets; controls %s; "
        "stability %s; data %s -> %s; artifact root %s",
        cfg.model, cfg.training_steps, len(levels), ", ".join(f"{s:g}" for s in levels),
        len(plan.rewinds), ", ".join(plan.rewinds), len(plan.tickets),
        f"{kinds} at {control_ids}" if plan.controls else "off",
        f"{networks} x {len(plan.rewinds)} rewind points" if plan.stability else "off",
        data["source_dir"], data["data_dir"], data["artifact_root"],
    )


def remaining_label(remaining: float) -> str:
    """How a mask is named in the UI and the logs: the share of prunable weights left ("10.7% left")."""
    pct = 100 * remaining
    return f"{pct:.1f}% left" if pct >= 0.95 else f"{pct:.2g}% left"


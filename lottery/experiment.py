"""Idempotent runners for the steps of one experiment: what the CLI and the DAG call.

Each runner writes into the work directory ``W`` (layout in docs/artifacts.md), returns a small
dict (ids, paths, a few metrics: what XCom may carry), says in the log when it has nothing to do,
and resumes from its last checkpoint when it was interrupted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lottery.config import CONTROLS, ConfigError, ExperimentConfig, Step, experiment_id
from lottery.errors import CorruptArtifactError, MissingArtifactError, WorkdirMismatchError
from lottery.files import atomic_path, read_json, write_json, write_text

log = logging.getLogger("lottery")

# Decoded training sets smaller than this are cached in memory (Fashion-MNIST: 47 MB).
CACHE_LIMIT_BYTES = int(os.environ.get("LOTTERY_CACHE_LIMIT_BYTES", 4 << 30))


# ---- configuration and work directories -------------------------------------------------------
def resolve_config(conf: dict[str, Any] | None) -> ExperimentConfig:
    return ExperimentConfig.from_dict(conf)


def dataset_id(data_dir: str | os.PathLike) -> str:
    from lottery.data import read_manifest

    return read_manifest(data_dir)["dataset_id"]


def workdir_for(cfg: ExperimentConfig, data_dir: str | os.PathLike, artifact_root: str | os.PathLike) -> Path:
    """``<artifact root>/<experiment id>``: same config and data, same directory; else a new one."""
    return Path(artifact_root) / experiment_id(cfg, dataset_id(data_dir))


def prepare_workdir(cfg: ExperimentConfig, data_dir: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``run.json``, or check that the directory holds this experiment."""
    workdir = Path(workdir)
    data_dir = Path(data_dir).resolve()
    data_id = dataset_id(data_dir)
    wanted_id = experiment_id(cfg, data_id)
    config_path = workdir / "config.json"
    if config_path.exists():
        existing = ExperimentConfig.from_dict(read_json(config_path))
        run = read_json(workdir / "run.json") if (workdir / "run.json").exists() else {}
        if existing != cfg or run.get("experiment_id", wanted_id) != wanted_id:
            raise WorkdirMismatchError(
                f"{workdir} holds experiment {run.get('experiment_id', '?')} with a different config or data set "
                f"(this one is {wanted_id}); use another --workdir"
            )
    else:
        write_json(config_path, cfg.to_dict())
    write_json(workdir / "run.json", {"experiment_id": wanted_id, "data_dir": str(data_dir), "dataset_id": data_id})
    return workdir


def load_workdir(workdir: str | os.PathLike) -> tuple[ExperimentConfig, dict[str, Any]]:
    workdir = Path(workdir)
    if not (workdir / "config.json").exists():
        raise MissingArtifactError(f"{workdir} has no config.json: run `python -m lottery dense` for it first")
    return ExperimentConfig.from_dict(read_json(workdir / "config.json")), read_json(workdir / "run.json")


# ---- runtime ----------------------------------------------------------------------------------
@contextmanager
def _session(cfg: ExperimentConfig, threads: int | None):
    """Thread pools, determinism, seeds, precision policy and the distribution scope for one run."""
    import keras

    from lottery.data import runtime

    if os.environ.get("LOTTERY_LOGICAL_CPUS"):  # test MirroredStrategy on a CPU machine
        runtime.split_cpu(int(os.environ["LOTTERY_LOGICAL_CPUS"]))
    runtime.configure_threads(threads)
    runtime.enable_determinism()
    keras.mixed_precision.set_global_policy("mixed_float16" if cfg.mixed_precision else "float32")
    keras.utils.set_random_seed(cfg.seed)
    with runtime.distribution_scope():
        yield runtime.num_replicas()


def _open_data(cfg: ExperimentConfig, data_dir: str | os.PathLike):
    import keras

    if keras.backend.backend() == "tensorflow":
        from lottery.data.pipeline import ShardedDataset
    else:  # the numpy pipeline: same batches, no TensorFlow needed (docs/data-format.md)
        from lottery.data.arrays import ArrayDataset as ShardedDataset

    train = ShardedDataset(data_dir, "train", cache=False)
    decoded = train.num_examples * int(_prod(train.image_shape))
    cache = decoded <= CACHE_LIMIT_BYTES
    if cache:
        train = ShardedDataset(data_dir, "train", cache=True)
    val = ShardedDataset(data_dir, "val", cache=cache)
    steps_per_epoch = train.steps_per_epoch(cfg.batch_size)
    if steps_per_epoch < 1:
        raise ConfigError("batch_size", cfg.batch_size, f"is larger than the training set ({train.num_examples} images in {data_dir})")
    cfg.check_against_data(steps_per_epoch)
    return train, val, steps_per_epoch


def _build(cfg: ExperimentConfig, train, *, seed: int | None = None):
    from lottery.models import build_model

    return build_model(cfg.model, tuple(train.image_shape), train.num_classes, seed=cfg.seed if seed is None else seed)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


# ---- dense training ---------------------------------------------------------------------------
def run_dense(
    cfg: ExperimentConfig, data_dir: str | os.PathLike, workdir: str | os.PathLike, *, threads: int | None = None, progress: bool = False
) -> dict[str, Any]:
    """Train the dense network once; save a checkpoint at every rewind point and the final weights."""
    workdir = prepare_workdir(cfg, data_dir, workdir)
    dense = workdir / "dense"
    result_path = dense / "result.json"
    if result_path.exists():
        result = read_json(result_path)
        log.info("dense: already done (val_acc %.2f%%), nothing to do: %s", 100 * result["val_accuracy"], dense)
        return {**_small(result), "skipped": True}

    from lottery.training import TrainingRun, compile_model, count_params, load_checkpoint, save_checkpoint

    started = time.perf_counter()
    with _session(cfg, threads) as replicas:
        train, val, spe = _open_data(cfg, data_dir)
        total = cfg.total_iterations(spe)
        rewinds = {Step.parse(r).iterations(spe): str(Step.parse(r)) for r in cfg.rewind_points}
        model = _build(cfg, train)
        compile_model(model, cfg, spe)
        from lottery.models import prunable_weights

        checkpoint = dense / "checkpoint.npz"
        start, history = 0, []
        if checkpoint.exists():
            meta = load_checkpoint(checkpoint, model)
            start, history = meta["step"], meta["history"]
            log.info("dense: resuming from the checkpoint at step %d (epoch %d)", start, meta["epoch"])
        log.info(
            "dense: start  model %s (%s params, %s prunable)  data %s (%d train / %d val, %s, %d classes)  "
            "%d it/epoch, %s = %d it, batch %d, %s lr %g  rewind points %s  threads %s  replicas %d  workdir %s",
            cfg.model, f"{count_params(model.weights):,}", f"{count_params(prunable_weights(model).values()):,}", data_dir,
            train.num_examples, val.num_examples, "x".join(map(str, train.image_shape)), train.num_classes, spe,
            cfg.training_steps, total, cfg.batch_size, cfg.optimizer, cfg.lr, ", ".join(rewinds.values()),
            threads or "default", replicas, workdir,
        )

        def save_rewind(step: int) -> None:
            path = dense / "rewind" / f"{rewinds[step]}.npz"
            if not path.exists():
                save_checkpoint(path, model, step=step, steps_per_epoch=spe, extra={"rewind": rewinds[step]})
                log.info("dense: saved rewind checkpoint %s (step %d)", rewinds[step], step)

        def save_epoch(step: int, rows: list[dict]) -> None:
            _write_metrics(dense / "metrics.csv", rows)
            save_checkpoint(checkpoint, model, step=step, steps_per_epoch=spe, extra={"history": rows})

        run = TrainingRun(
            model, cfg, train, val, spe, total, label="dense", stop_points=tuple(sorted(rewinds)),
            on_stop=save_rewind, on_epoch_end=save_epoch, progress=progress, history=list(history),
        )
        history = run.run(start)
        with atomic_path(dense / "final.keras") as tmp:
            model.save(tmp)
    best = max(history, key=lambda r: r["val_accuracy"])
    result = {
        "experiment_id": read_json(workdir / "run.json")["experiment_id"],
        "val_accuracy": history[-1]["val_accuracy"],
        "best_val_accuracy": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "steps": total,
        "steps_per_epoch": spe,
        "rewind_steps": {label: step for step, label in rewinds.items()},
        "images_per_s": _mean(r["images_per_s"] for r in history),
        "wall_s": time.perf_counter() - started,
        "replicas": replicas,
        "curve": history,
        "workdir": str(workdir),
    }
    write_json(result_path, result)
    checkpoint.unlink(missing_ok=True)  # the final weights and rewind checkpoints supersede it
    log.info(
        "dense: done in %.1fs  val_acc %.2f%% (best %.2f%% at epoch %d)  %.0f img/s  -> %s",
        result["wall_s"], 100 * result["val_accuracy"], 100 * result["best_val_accuracy"], result["best_epoch"],
        result["images_per_s"], dense / "final.keras",
    )
    return {**_small(result), "skipped": False}


def dense_result(workdir: str | os.PathLike) -> dict[str, Any]:
    path = Path(workdir) / "dense" / "result.json"
    if not path.exists():
        raise MissingArtifactError(f"{path} does not exist: the dense network has not been trained")
    return read_json(path)


# ---- masks ------------------------------------------------------------------------------------
def mask_id(sparsity: float) -> str:
    return f"sp{100 * sparsity:06.3f}"


def make_masks(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """One magnitude mask per sparsity level, from the final dense weights."""
    import keras

    from lottery.models import output_kernel_path, prunable_weights
    from lottery.pruning import load_mask, magnitude_masks, mask_report, save_mask
    from lottery.files import sha256_file

    workdir = Path(workdir)
    cfg, _ = load_workdir(workdir)
    final = workdir / "dense" / "final.keras"
    if not (workdir / "dense" / "result.json").exists():
        raise MissingArtifactError(f"{final} does not exist yet: train the dense network first (lottery dense)")
    ids = [mask_id(s) for s in cfg.levels()]
    if len(set(ids)) != len(ids):
        raise ConfigError("sparsities", list(cfg.levels()), "two levels round to the same mask id (0.001% apart)")
    masks_dir = workdir / "masks"
    descriptors, todo = [], []
    for index, (sparsity, mid) in enumerate(zip(cfg.levels(), ids)):
        path = masks_dir / f"{mid}.npz"
        if path.exists():
            try:
                _, meta = load_mask(path)  # verifies the checksum
            except CorruptArtifactError as exc:  # a mask is cheap to recompute: never use a damaged one
                log.warning("masks: %s; recomputing it", exc)
            else:
                descriptors.append(_mask_descriptor(index, mid, sparsity, meta))
                continue
        todo.append((index, sparsity, mid))
    if todo:
        model = keras.models.load_model(final, compile=False)
        weights = {path: keras.ops.convert_to_numpy(v) for path, v in prunable_weights(model).items()}
        final_sha = sha256_file(final)
        for index, sparsity, mid in todo:
            mask = magnitude_masks(
                weights, sparsity, scope=cfg.pruning_scope, output_path=output_kernel_path(model), output_factor=cfg.output_layer_prune_factor
            )
            report = mask_report(mask)
            meta = {"mask_id": mid, "index": index, "sparsity": sparsity, "scope": cfg.pruning_scope,
                    "output_layer_prune_factor": cfg.output_layer_prune_factor, "source": "dense/final.keras",
                    "source_sha256": final_sha, "report": report}
            save_mask(masks_dir / f"{mid}.npz", mask, meta)
            descriptors.append(_mask_descriptor(index, mid, sparsity, meta))
        log.info("masks: wrote %d of %d masks from %s", len(todo), len(ids), final)
    else:
        log.info("masks: all %d masks already exist, nothing to do", len(ids))
    descriptors.sort(key=lambda d: d["index"])
    write_json(masks_dir / "index.json", descriptors)
    for d in descriptors:
        log.info("masks: %s  %.2f%% of prunable weights left", d["mask_id"], 100 * d["remaining"])
    return descriptors


def _mask_descriptor(index: int, mid: str, sparsity: float, meta: dict) -> dict[str, Any]:
    report = meta["report"]
    return {"index": index, "mask_id": mid, "sparsity": sparsity, "remaining": report["kept"] / report["total"]}


# ---- late resetting ---------------------------------------------------------------------------
def ticket_name(mid: str, rewind: str, control: str | None = None) -> str:
    return f"{mid}__{rewind}" + (f"__{control}" if control else "")


def _resolve_mask(cfg: ExperimentConfig, mask: int | str) -> tuple[int, str, float]:
    ids = [mask_id(s) for s in cfg.levels()]
    if isinstance(mask, str) and mask.isdigit():
        mask = int(mask)
    if isinstance(mask, int):
        if not 0 <= mask < len(ids):
            raise ValueError(f"mask index {mask} is out of range: this experiment has {len(ids)} masks (0..{len(ids) - 1})")
        return mask, ids[mask], cfg.levels()[mask]
    if mask not in ids:
        raise ValueError(f"unknown mask {mask!r}: this experiment's masks are {', '.join(ids)}")
    return ids.index(mask), mask, cfg.levels()[ids.index(mask)]


def _resolve_rewind(cfg: ExperimentConfig, rewind: int | str) -> str:
    labels = cfg.rewind_labels()
    if isinstance(rewind, str) and rewind.isdigit():
        rewind = int(rewind)
    if isinstance(rewind, int):
        if not 0 <= rewind < len(labels):
            raise ValueError(f"rewind index {rewind} is out of range: this experiment has {len(labels)} rewind points ({', '.join(labels)})")
        return labels[rewind]
    try:
        label = str(Step.parse(rewind))
    except ValueError:
        label = rewind
    if label not in labels:
        raise ValueError(f"unknown rewind point {rewind!r}: this experiment's rewind points are {', '.join(labels)}")
    return label


def _stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


def retrain(
    workdir: str | os.PathLike,
    mask: int | str,
    rewind: int | str,
    *,
    control: str | None = None,
    threads: int | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Reset to rewind point ``rewind``, apply mask ``mask``, train to the end with the mask fixed.

    Controls: ``random_reinit`` keeps the mask but starts from freshly drawn weights (and a fresh
    optimizer state) at the rewind step; ``random_prune`` keeps the rewound weights and optimizer
    state but a random mask with the same number of surviving weights in every layer.
    """
    workdir = Path(workdir)
    cfg, run_info = load_workdir(workdir)
    if control is not None and control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}: choose one of {', '.join(CONTROLS)}")
    index, mid, sparsity = _resolve_mask(cfg, mask)
    label = _resolve_rewind(cfg, rewind)
    ticket = workdir / "tickets" / ticket_name(mid, label, control)
    if (ticket / "result.json").exists():
        result = read_json(ticket / "result.json")
        log.info("retrain %s: already done (val_acc %.2f%%), nothing to do: %s", ticket.name, 100 * result["val_accuracy"], ticket)
        return {**_small(result), "skipped": True}
    mask_path = workdir / "masks" / f"{mid}.npz"
    rewind_path = workdir / "dense" / "rewind" / f"{label}.npz"
    for needed, step_name in ((mask_path, "masks"), (rewind_path, "dense")):
        if not needed.exists():
            raise MissingArtifactError(f"{needed} does not exist: run `python -m lottery {step_name} --workdir {workdir}` first")
    try:
        return _retrain(cfg, run_info, workdir, ticket, mid, sparsity, label, control, mask_path, rewind_path,
                        threads, Path(data_dir or run_info["data_dir"]), progress)
    except BaseException as exc:
        # Leave a note for the report; keep the checkpoint so that a rerun resumes.
        write_json(ticket / "error.json", {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        raise


def _retrain(cfg, run_info, workdir, ticket, mid, sparsity, label, control, mask_path, rewind_path, threads, data_dir, progress):
    import keras
    import numpy as np

    from lottery.models import prunable_weights
    from lottery.pruning import apply_mask, load_mask, mask_report, random_prune_like, save_mask
    from lottery.training import TrainingRun, compile_model, load_checkpoint, save_checkpoint

    started = time.perf_counter()
    name = ticket.name
    with _session(cfg, threads):
        train, val, spe = _open_data(cfg, data_dir)
        total = cfg.total_iterations(spe)
        model = _build(cfg, train)
        compile_model(model, cfg, spe)
        mask, mask_meta = load_mask(mask_path)
        if control == "random_prune":
            mask = random_prune_like(mask, seed=_stable_seed(cfg.seed, mid, "random_prune"))
        checkpoint = ticket / "checkpoint.npz"
        if checkpoint.exists():
            meta = load_checkpoint(checkpoint, model)
            start, history = meta["step"], meta["history"]
            log.info("retrain %s: resuming from the checkpoint at step %d", name, start)
        else:
            meta = load_checkpoint(rewind_path, model)
            start, history = meta["step"], []
            if control == "random_reinit":
                fresh = _build(cfg, train, seed=_stable_seed(cfg.seed, mid, label, "random_reinit"))
                for target, source in zip(model.weights, fresh.weights):
                    target.assign(keras.ops.convert_to_numpy(source))
                for variable in model.optimizer.variables:  # fresh slots, same schedule position
                    if variable.path.endswith(("_momentum", "_velocity")):
                        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
        report = mask_report(mask)
        apply_mask(model, mask)
        weights = prunable_weights(model)
        for path, keep in mask.items():  # the invariant the whole experiment rests on
            if np.any(keras.ops.convert_to_numpy(weights[path])[~keep] != 0):
                raise AssertionError(f"pruned weights of {path} are not zero after applying mask {mid}")
        if control == "random_prune" and not (ticket / "mask.npz").exists():
            save_mask(ticket / "mask.npz", mask, {"control": control, "like": mid, "report": report})
        log.info(
            "retrain %s: start  mask %s (%.2f%% of prunable weights left)  rewind %s = step %d  %s  %d -> %d it (%d epochs)",
            name, mid, 100 * report["kept"] / report["total"], label, Step.parse(label).iterations(spe),
            f"control {control}" if control else "ticket", start, total, -(-(total - start) // spe),
        )

        def save_epoch(step: int, rows: list[dict]) -> None:
            _write_metrics(ticket / "metrics.csv", rows)
            save_checkpoint(checkpoint, model, step=step, steps_per_epoch=spe, extra={"history": rows})

        run = TrainingRun(model, cfg, train, val, spe, total, label=f"retrain {name}", on_epoch_end=save_epoch,
                          progress=progress, history=list(history))
        history = run.run(start)
        apply_mask(model, mask)  # idempotent; keeps the saved model's zeros explicit
        from lottery.pruning import remove_mask

        remove_mask(model)
        with atomic_path(ticket / "model.keras") as tmp:
            model.save(tmp)
    best = max(history, key=lambda r: r["val_accuracy"]) if history else {"val_accuracy": float("nan"), "epoch": 0}
    result = {
        "experiment_id": run_info["experiment_id"],
        "ticket": str(ticket),
        "mask_id": mid,
        "sparsity": sparsity,
        "remaining": report["kept"] / report["total"],
        "rewind": label,
        "rewind_step": Step.parse(label).iterations(spe),
        "control": control,
        "val_accuracy": history[-1]["val_accuracy"],
        "best_val_accuracy": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "curve": history,
        "images_per_s": _mean(r["images_per_s"] for r in history),
        "wall_s": time.perf_counter() - started,
    }
    write_json(ticket / "result.json", result)
    checkpoint.unlink(missing_ok=True)
    (ticket / "error.json").unlink(missing_ok=True)
    log.info("retrain %s: done in %.1fs  val_acc %.2f%% (best %.2f%%)  %.0f img/s  -> %s",
             name, result["wall_s"], 100 * result["val_accuracy"], 100 * result["best_val_accuracy"], result["images_per_s"], ticket)
    return {**_small(result), "skipped": False}


# ---- summary ----------------------------------------------------------------------------------
RESULT_COLUMNS = ("mask_id", "sparsity", "remaining", "rewind", "rewind_step", "control", "status",
                  "val_accuracy", "best_val_accuracy", "error")


def summarize(workdir: str | os.PathLike, *, controls: bool = True) -> list[dict[str, Any]]:
    """One row per expected (mask, rewind[, control]) ticket with its status; writes results.csv."""
    workdir = Path(workdir)
    cfg, _ = load_workdir(workdir)
    rows = []
    tickets = workdir / "tickets"
    control_dirs = {p.name.split("__")[2] for p in tickets.glob("*__*__*")} if tickets.exists() else set()
    for control in [None] + ([c for c in CONTROLS if c in control_dirs] if controls else []):
        for sparsity in cfg.levels():
            mid = mask_id(sparsity)
            for label in cfg.rewind_labels():
                path = tickets / ticket_name(mid, label, control)
                if control and not path.exists():
                    continue  # controls run at a chosen subset of sparsities only
                row = {"mask_id": mid, "sparsity": sparsity, "remaining": None, "rewind": label, "rewind_step": None,
                       "control": control or "", "status": "missing", "val_accuracy": None, "best_val_accuracy": None, "error": ""}
                if (path / "result.json").exists():
                    result = read_json(path / "result.json")
                    row.update({k: result[k] for k in ("remaining", "rewind_step", "val_accuracy", "best_val_accuracy")}, status="ok")
                elif (path / "error.json").exists():
                    row.update(status="failed", error=read_json(path / "error.json")["error"].splitlines()[0][:300])
                rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(workdir / "results.csv", buffer.getvalue())
    return rows


def format_table(workdir: str | os.PathLike, rows: list[dict[str, Any]] | None = None) -> str:
    """Val accuracy (%) by sparsity (rows) and rewind point (columns), dense accuracy on top."""
    workdir = Path(workdir)
    cfg, _ = load_workdir(workdir)
    rows = summarize(workdir) if rows is None else rows
    labels = cfg.rewind_labels()
    lines = []
    dense_path = workdir / "dense" / "result.json"
    if dense_path.exists():
        lines.append(f"dense network: val accuracy {100 * read_json(dense_path)['val_accuracy']:.2f}%")
    for control in sorted({r["control"] for r in rows}, key=lambda c: (c != "", c)):
        subset = [r for r in rows if r["control"] == control]
        lines.append("")
        lines.append(f"{'tickets' if not control else 'control ' + control}: val accuracy (%) by weights remaining and rewind point")
        header = f"{'sparsity':>9} {'left':>7} " + " ".join(f"{label:>9}" for label in labels)
        lines.append(header)
        for mid in dict.fromkeys(r["mask_id"] for r in subset):
            cells = {r["rewind"]: r for r in subset if r["mask_id"] == mid}
            first = next(iter(cells.values()))
            left = next((r["remaining"] for r in cells.values() if r["remaining"] is not None), 1 - first["sparsity"])
            values = []
            for label in labels:
                r = cells.get(label)
                values.append(f"{'':>9}" if r is None else f"{100 * r['val_accuracy']:9.2f}" if r["status"] == "ok" else f"{r['status']:>9}")
            lines.append(f"{100 * first['sparsity']:8.2f}% {100 * left:6.2f}% " + " ".join(values))
    return "\n".join(lines)


# ---- helpers ----------------------------------------------------------------------------------
def _write_metrics(path: Path, rows: list[dict]) -> None:
    from lottery.training import METRIC_COLUMNS

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _small(result: dict[str, Any]) -> dict[str, Any]:
    """What may travel through XCom: no curves, no tracebacks."""
    return {k: v for k, v in result.items() if k not in ("curve", "rewind_steps")}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


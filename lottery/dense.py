"""Dense training: train the full network once, saving a checkpoint at every rewind point.

    run_dense(cfg, data_dir, workdir) -> small result dict (what XCom may carry)

Resumes from ``dense/checkpoint.npz`` after an interruption (starting over, saying so, when it or
a rewind checkpoint before it is damaged); does nothing when the result and the files it lists are
intact. It trains under a lock: another run of the same config waits for it, then finds it done
(a DAG task does not wait in its process: `lottery.locks`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from lottery.config import ExperimentConfig, Step
from lottery.errors import CorruptArtifactError, MissingArtifactError
from lottery.files import (arrays_damage, atomic_path, file_damage, intact_result, output_records, read_json,
                           remove_arrays, write_json)
from lottery.locks import wait_training_lock
from lottery.paths import Workdir
from lottery.session import build_model, final_accuracy, keras_backend, mean_images_per_s, open_data, session, small

log = logging.getLogger("lottery")


def run_dense(
    cfg: ExperimentConfig, data_dir: str | os.PathLike, workdir: str | os.PathLike, *, threads: int | None = None, progress: bool = False
) -> dict[str, Any]:
    """Train the dense network once; save a checkpoint at every rewind point and the final weights."""
    workdir = Workdir(workdir).prepare(cfg, data_dir)
    done = _done_result(workdir)
    if done is not None:
        return done
    with wait_training_lock(workdir.training_lock("dense"), f"dense training in {workdir}", log=log):
        done = _done_result(workdir)  # finished by another process since the first look
        return done if done is not None else _train_and_record(cfg, data_dir, workdir, threads, progress)


def _train_and_record(cfg: ExperimentConfig, data_dir, workdir: Workdir, threads: int | None, progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    with session(cfg, threads) as replicas:
        train, val, spe = open_data(cfg, data_dir)
        history, total, rewinds = _train(cfg, workdir, train, val, spe, threads, replicas, data_dir, progress)
    result = {
        "experiment_id": read_json(workdir.run_json)["experiment_id"],
        **final_accuracy(history),
        "epochs": len(history),
        "steps": total,
        "steps_per_epoch": spe,
        "rewind_steps": {label: step for step, label in rewinds.items()},
        "images_per_s": mean_images_per_s(history),
        "wall_s": time.perf_counter() - started,
        "replicas": replicas,
        "backend": keras_backend(),
        "curve": history,
        "workdir": str(workdir),
        **output_records(workdir.dense_dir, dense_files(workdir, cfg)),
    }
    write_json(workdir.dense_result, result, sealed=True)
    remove_arrays(workdir.dense_checkpoint)  # the final weights and rewind checkpoints supersede it
    log.info(
        "dense: done in %.1fs  val_acc %.2f%% (best %.2f%% at epoch %d)  %.0f img/s  -> %s",
        result["wall_s"], 100 * result["val_accuracy"], 100 * result["best_val_accuracy"], result["best_epoch"],
        result["images_per_s"], workdir.final_model,
    )
    return {**small(result), "skipped": False}


def dense_files(workdir: Workdir, cfg: ExperimentConfig) -> list[str]:
    """The files the dense run makes (names inside ``dense/``), which its result vouches for."""
    rewinds = [workdir.rewind_checkpoint(str(Step.parse(r))) for r in cfg.rewind_points]
    return [p.relative_to(workdir.dense_dir).as_posix() for p in (workdir.final_model, workdir.dense_metrics, *rewinds)]


def _done_result(workdir: Workdir) -> dict[str, Any] | None:
    """The dense run's small result when it is done and every file it made is intact, else None
    (a damaged run is named in the log and trained again: the same config and seed give the same
    weights, so the masks and tickets made from them stay valid)."""
    result = intact_result(workdir.dense_result, "dense")
    if result is None:
        return None
    log.info("dense: already done (val_acc %.2f%%), nothing to do: %s", 100 * result["val_accuracy"], workdir.dense_dir)
    return {**small(result), "skipped": True}


def verify_rewind_checkpoint(workdir: Workdir, label: str) -> None:
    """Refuse a rewind checkpoint that no longer matches its record."""
    path = workdir.rewind_checkpoint(label)
    _refuse_damaged(workdir, path, arrays_damage(path))


def verify_dense_file(workdir: Workdir, path) -> None:
    """Refuse a file of the dense run (``path``) that no longer matches the dense run's record of it."""
    record = read_json(workdir.dense_result, sealed=True)["files"][path.relative_to(workdir.dense_dir).as_posix()]
    _refuse_damaged(workdir, path, file_damage(path, record, workdir.dense_result.name))


def _refuse_damaged(workdir: Workdir, path, damage: str | None) -> None:
    """CorruptArtifactError naming a damaged file of the dense run and the command that recomputes it."""
    if damage:
        raise CorruptArtifactError(f"{path}: {damage}: "
                                   f"rerun `python -m lottery dense --workdir {workdir}` to recompute it")


def dense_result(workdir: str | os.PathLike) -> dict[str, Any]:
    path = Workdir(workdir).dense_result
    if not path.exists():
        raise MissingArtifactError(f"{path} does not exist: the dense network has not been trained")
    return read_json(path, sealed=True)


def _train(cfg, workdir: Workdir, train, val, spe: int, threads, replicas: int, data_dir, progress: bool):
    """Build (or resume) the model, train it to the end, save the final weights."""
    from lottery.training import TrainingRun, compile_model, epoch_saver

    total = cfg.total_iterations(spe)
    rewinds = {Step.parse(r).iterations(spe): str(Step.parse(r)) for r in cfg.rewind_points}
    model = build_model(cfg, train)
    compile_model(model, cfg, spe)
    start, history = _resume(workdir, model, rewinds)
    if start:
        log.info("dense: resuming from the checkpoint at step %d (epoch %d)", start, start // spe)
    _log_start(cfg, model, train, val, spe, total, rewinds, threads, replicas, data_dir, workdir)
    run = TrainingRun(
        model, cfg, train, val, spe, total, label="dense", stop_points=tuple(sorted(rewinds)),
        on_stop=_rewind_saver(model, workdir, rewinds, spe),
        on_epoch_end=epoch_saver(model, workdir.dense_checkpoint, workdir.dense_metrics, spe),
        progress=progress, history=list(history),
    )
    history = run.run(start)
    with atomic_path(workdir.final_model) as tmp:
        model.save(tmp)
    return history, total, rewinds


def _rewind_saver(model, workdir: Workdir, rewinds: dict[int, str], spe: int):
    """The ``on_stop`` of the dense run: weights and optimizer state at each rewind point."""
    from lottery.training import save_checkpoint

    def save_rewind(step: int) -> None:
        path = workdir.rewind_checkpoint(rewinds[step])
        damage = arrays_damage(path)  # an intact one (from an earlier attempt) is the same: kept
        if damage:
            if damage != "missing":
                log.warning("dense: rewind checkpoint %s is damaged, saving it again: %s", rewinds[step], damage)
            save_checkpoint(path, model, step=step, steps_per_epoch=spe, extra={"rewind": rewinds[step]})
            log.info("dense: saved rewind checkpoint %s (step %d)", rewinds[step], step)

    return save_rewind


def _resume(workdir: Workdir, model, rewinds: dict[int, str]) -> tuple[int, list[dict]]:
    """(step, history) of an interrupted dense run, restored into ``model``; (0, []) when there is
    none, when it is damaged, or when a rewind checkpoint before it is damaged or missing (it cannot
    be saved again from there): each named in the log."""
    from lottery.training import read_resume_checkpoint, restore_checkpoint, write_metrics

    found = read_resume_checkpoint(workdir.dense_checkpoint, "dense")
    if found is None:
        return 0, []
    arrays, meta = found
    lost = [f"{label}.npz: {damage}" for step, label in sorted(rewinds.items())
            if step < meta["step"] and (damage := arrays_damage(workdir.rewind_checkpoint(label)))]
    if lost:
        log.warning("dense: not resuming from step %d: rewind checkpoints before it are damaged (%s); starting over",
                    meta["step"], "; ".join(lost))
        remove_arrays(workdir.dense_checkpoint)
        return 0, []
    restore_checkpoint(model, arrays, workdir.dense_checkpoint)
    write_metrics(workdir.dense_metrics, meta["history"])
    return meta["step"], meta["history"]


def _log_start(cfg, model, train, val, spe, total, rewinds, threads, replicas, data_dir, workdir) -> None:
    from lottery.models import prunable_weights
    from lottery.training import count_params

    log.info(
        "dense: start  model %s (%s params, %s prunable)  data %s (%d train / %d val, %s, %d classes)  "
        "%d it/epoch, %s = %d it, batch %d, %s lr %g  rewind points %s  threads %s  replicas %d  workdir %s",
        cfg.model, f"{count_params(model.weights):,}", f"{count_params(prunable_weights(model).values()):,}", data_dir,
        train.num_examples, val.num_examples, "x".join(map(str, train.image_shape)), train.num_classes, spe,
        cfg.training_steps, total, cfg.batch_size, cfg.optimizer, cfg.lr, ", ".join(rewinds.values()),
        threads or "default", replicas, workdir,
    )

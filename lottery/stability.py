"""Instability analysis (linear mode connectivity; Frankle, Dziugaite, Roy & Carbin 2020): is a
network, at a rewind point, stable to the noise of SGD?

    run_stability(workdir, rewind, mask=None, points=11) -> small result dict
    train_copy(workdir, rewind, "a" | "b", mask=None)   -> the small result of one copy

Two copies of one network start from the same state at rewind point ``rewind`` and train to the
end of the schedule, differing only in the order of the data (shuffling and augmentation draws):
copy a with the config's seed (the data order of the dense run and of every ticket), copy b with
`copy_seed` (a seed derived from it). The network is the dense one (``mask=None``: the rewind
checkpoint's full state, the dense run continued) or a ticket's (a mask index or id: its mask,
started as the ticket is, ``rewind_mode`` included). Then the two are interpolated
(`lottery.interpolation`): ``points`` networks on the line between them, each evaluated on the
validation split and on the first `TRAIN_SUBSET_BATCHES` batches of the dense run's first epoch
(without augmentation), BatchNorm statistics recomputed on those batches for every point. The
instability is the highest validation error along the line less the mean of the two endpoints'.

``stability/<name>/`` (`lottery.paths.StabilityPaths`; name ``dense__1ep`` or ``sp89.263__1ep``):
``copy_a/`` and ``copy_b/`` are units of work of their own (a ticket's files and lock: resumable
from their epoch checkpoints, idempotent, trainable in two processes at once), ``result.json`` the
sealed path, holding the records of the copies' files it was computed from. docs/stability.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lottery.config import DEFAULT_STABILITY_POINTS, ExperimentConfig, Step
from lottery.errors import MissingArtifactError
from lottery.files import atomic_path, intact_result, output_records, remove_arrays, write_json
from lottery.interpolation import check_points
from lottery.locks import TrainingLockBusy, hold_training_locks
from lottery.paths import StabilityPaths, Workdir, stability_name
from lottery.plan import MaskSpec, RunPlan
from lottery.session import final_accuracy, keras_backend, mean_images_per_s
from lottery.ticket import Ticket, stable_seed

log = logging.getLogger("lottery")

COPIES = ("a", "b")
DEFAULT_POINTS = DEFAULT_STABILITY_POINTS  # the config's stability_points default (the DAG passes the run's)
# The training subset of the path (and the BatchNorm statistics): the first batches of the dense
# run's first epoch, in its order (seed, epoch 0), without augmentation; at batch 128, 2,048 images.
TRAIN_SUBSET_BATCHES = 16
COPY_FILES = ("result.json", "model.keras", "metrics.csv")


def copy_seed(seed: int, which: str) -> int:
    """The data-order seed of copy ``which``: a, the config's ``seed``; b, ``stable_seed(seed,
    "stability", "b")`` (the first 4 bytes of sha256 of ``"<seed>/stability/b"``, little-endian)."""
    if which not in COPIES:
        raise ValueError(f"unknown copy {which!r}: choose one of {', '.join(COPIES)}")
    return seed if which == "a" else stable_seed(seed, "stability", which)


@dataclass
class Study:
    """One instability analysis: a network (the dense one, or a ticket's mask) at a rewind point."""

    workdir: Workdir
    cfg: ExperimentConfig
    run_info: dict
    rewind: str
    mask: MaskSpec | None
    points: int = DEFAULT_POINTS
    started: float = field(default_factory=time.perf_counter)
    result: dict[str, Any] | None = None  # its small result, once done
    ticket: Ticket | None = field(init=False)  # the ticket whose mask and start a masked study shares
    copies: list[Copy] = field(init=False)

    def __post_init__(self) -> None:
        self.ticket = None if self.mask is None else Ticket(self.workdir, self.cfg, self.run_info, self.mask, self.rewind)
        self.copies = [Copy(self, which) for which in COPIES]

    @classmethod
    def open(cls, workdir: str | os.PathLike, rewind: int | str, mask: int | str | None, points: int) -> Study:
        """The study of ``workdir``'s network ``mask`` (None: dense) at ``rewind``; a bad value is
        refused, naming it, before anything is read but the config."""
        check_points(points)
        workdir = Workdir(workdir)
        cfg, run_info = workdir.load()
        plan = RunPlan.from_config(cfg)
        return cls(workdir, cfg, run_info, plan.rewind(rewind), None if mask is None else plan.mask(mask), points)

    @property
    def name(self) -> str:
        return stability_name(self.mask.mask_id if self.mask else None, self.rewind)

    @property
    def label(self) -> str:
        return f"stability {self.name}"

    @property
    def paths(self) -> StabilityPaths:
        return self.workdir.stability(self.name)

    @property
    def rewind_mode(self) -> str:
        """A ticket's copies start as the ticket does; the dense network's from the full state."""
        return "full" if self.mask is None else self.cfg.rewind_mode

    def check_inputs(self) -> None:
        """The rewind checkpoint (intact) and the mask exist, else an error naming them and the command."""
        from lottery.dense import verify_rewind_checkpoint

        if self.ticket is not None:
            self.ticket.check_inputs()
        elif not (needed := self.workdir.rewind_checkpoint(self.rewind)).exists():
            raise MissingArtifactError(f"{needed} does not exist: run `python -m lottery dense --workdir {self.workdir}` first")
        verify_rewind_checkpoint(self.workdir, self.rewind)

    def done_result(self) -> dict[str, Any] | None:
        """The small result when result.json and every file it lists are intact and it has ``points``
        points (logged "already done"); else None (a damaged result named in the log and removed)."""
        result = intact_result(self.paths.result, self.label, number="instability", redo="computing it again")
        if result is None:
            return None
        if result["points"] != self.points:
            log.info("%s: result.json has %d points, %d asked for: computing the path again (the copies are kept)",
                     self.label, result["points"], self.points)
            return None
        log.info("%s: already done (instability %.2f points, train %.2f; %d files checked), nothing to do: %s",
                 self.label, result["instability"], result["instability_train"], len(result["files"]), self.paths.dir)
        self.result = {**summary(result), "skipped": True}
        return self.result

    def load_mask(self) -> dict | None:
        return None if self.ticket is None else self.ticket.load_ticket_mask()

    def record_failure(self) -> None:
        """error.json beside the result (best effort: the failure itself is what must surface)."""
        exc = sys.exc_info()[1]
        try:
            write_json(self.paths.error, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        except OSError as note_error:
            log.error("%s: could not record the failure (%s): %s", self.label, note_error, exc)


@dataclass
class Copy:
    """One of the two copies: a unit of work with a ticket's files in ``stability/<name>/copy_<which>/``."""

    study: Study
    which: str
    started: float = field(default_factory=time.perf_counter)
    result: dict[str, Any] | None = None

    @property
    def paths(self):
        return self.study.paths.copy(self.which)

    @property
    def data_seed(self) -> int:
        return copy_seed(self.study.cfg.seed, self.which)

    @property
    def label(self) -> str:
        return f"{self.study.label} copy {self.which}"

    @property
    def lock(self) -> Path:
        return self.study.workdir.training_lock(f"stability__{self.study.name}__{self.which}")

    def done_result(self) -> dict[str, Any] | None:
        result = intact_result(self.paths.result, self.label)
        if result is None:
            return None
        log.info("%s: already done (val_acc %.2f%%), nothing to do: %s", self.label, 100 * result["val_accuracy"], self.paths.dir)
        self.result = {**summary(result), "skipped": True}
        return self.result

    def start(self, model, train, spe: int) -> tuple[dict | None, int, list[dict]]:
        """Resume from the copy's checkpoint, or start from the rewind point (a ticket's copy: as the
        ticket starts); then a ticket's mask. (mask, step, metric rows so far); logs the start line."""
        from lottery.models import set_random_seed
        from lottery.training import load_checkpoint, resume_point

        study, ticket = self.study, self.study.ticket
        set_random_seed(study.cfg.seed)  # training draws no other randomness
        mask = study.load_mask()
        resumed = resume_point(self.paths.checkpoint, model, self.label, self.paths.metrics)
        if resumed:
            log.info("%s: resuming from the checkpoint at step %d", self.label, resumed[0])
            step, history = resumed
        elif ticket is not None:
            step, history = ticket.rewind_to(model, train), []
        else:
            step, history = load_checkpoint(study.workdir.rewind_checkpoint(study.rewind), model)["step"], []
        network = "the dense network"
        if ticket is not None:
            report = ticket.apply_ticket_mask(model, mask)
            network = f"mask {study.mask.mask_id} ({100 * report['kept'] / report['total']:.2f}% of prunable weights left)"
        log.info("%s: start  %s  rewind %s (rewind_mode %s)  data seed %d  %d -> %d it", self.label, network, study.rewind,
                 study.rewind_mode, self.data_seed, step, study.cfg.total_iterations(spe))
        return mask, step, list(history)

    def finish(self, model, mask: dict | None, history: list[dict], spe: int) -> None:
        """model.keras (a ticket's zeros explicit), the sealed result.json, the checkpoint dropped."""
        from lottery.pruning import apply_mask, remove_mask

        if mask is not None:
            apply_mask(model, mask)
            remove_mask(model)
        with atomic_path(self.paths.model) as tmp:
            model.save(tmp)
        study = self.study
        result = {"experiment_id": study.run_info["experiment_id"], "stability": study.name, "copy": self.which,
                  "data_seed": self.data_seed, "mask_id": study.mask.mask_id if study.mask else None, "rewind": study.rewind,
                  "rewind_step": Step.parse(study.rewind).iterations(spe), "rewind_mode": study.rewind_mode,
                  "backend": keras_backend(), **final_accuracy(history), "curve": history,
                  "images_per_s": mean_images_per_s(history), "wall_s": time.perf_counter() - self.started,
                  **output_records(self.paths.dir, [self.paths.model.name, self.paths.metrics.name])}
        write_json(self.paths.result, result, sealed=True)
        remove_arrays(self.paths.checkpoint)
        log.info("%s: done in %.1fs  val_acc %.2f%%  -> %s", self.label, result["wall_s"], 100 * result["val_accuracy"],
                 self.paths.dir)
        self.result = {**summary(result), "skipped": False}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """What may travel through XCom: no path, curve or file records."""
    return {k: v for k, v in result.items() if k not in ("path", "curve", "files", "arrays")}


def run_stability(workdir: str | os.PathLike, rewind: int | str, mask: int | str | None = None, *,
                  points: int = DEFAULT_POINTS, threads: int | None = None, data_dir: str | os.PathLike | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """The instability analysis of the dense network (``mask`` None) or of a ticket's mask (an index
    or id) at ``rewind`` (an index or step): train the copies not done (each resumes from its
    checkpoint), then the path of ``points`` points, unless result.json is done already. Its small
    result (``"skipped": True`` when it was done before)."""
    study = Study.open(workdir, rewind, mask, points)
    if study.done_result() is not None:
        return study.result
    study.check_inputs()
    log.info("%s: start  %s at rewind %s  %d points  data seeds a %d, b %d  -> %s", study.label,
             f"mask {study.mask.mask_id}" if study.mask else "the dense network", study.rewind, points,
             study.copies[0].data_seed, study.copies[1].data_seed, study.paths.dir)
    with contextlib.ExitStack() as held:
        todo, busy = _claim(study.copies, held)
        if busy is None or todo:  # the path needs both copies: a busy one's run comes back for it
            _work(study, todo, threads, data_dir, progress, path=busy is None)
    if busy is not None:
        raise busy
    return study.result


def train_copy(workdir: str | os.PathLike, rewind: int | str, which: str, mask: int | str | None = None, *,
               threads: int | None = None, data_dir: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """Train copy ``which`` ("a" or "b") of the analysis only (the two can run in two processes at
    once; `run_stability` then finds them done and computes the path); its small result."""
    copy_seed(0, which)  # an unknown copy is refused, naming it
    copy = Study.open(workdir, rewind, mask, DEFAULT_POINTS).copies[COPIES.index(which)]
    if copy.done_result() is not None:
        return copy.result
    copy.study.check_inputs()
    with contextlib.ExitStack() as held:
        todo, busy = _claim([copy], held)
        if busy is not None:
            raise busy
        if todo:
            _work(copy.study, todo, threads, data_dir, progress, path=False)
    return copy.result


def _claim(copies: list[Copy], held: contextlib.ExitStack) -> tuple[list[Copy], TrainingLockBusy | None]:
    """Hold the training lock of each copy not done (until ``held`` closes), in order: the copies
    still to train (one another process finished meanwhile is taken as done), and inside
    `lottery.locks.busy_raises()` the `TrainingLockBusy` of those another process trains (or None)."""
    todo = [c for c in copies if c.done_result() is None]
    claimed, busy = hold_training_locks(held, [(c, c.lock, c.label) for c in todo], log=log)
    return [c for c in claimed if c.done_result() is None], busy  # finished by another process meanwhile


def _work(study: Study, todo: list[Copy], threads, data_dir, progress: bool, *, path: bool) -> None:
    """Open the data and compile once; train each copy of ``todo`` in turn; then (``path``) the path.
    A failure leaves error.json beside the result, and each copy's epoch checkpoint to resume from."""
    from lottery.late_reset import training_session

    try:
        with training_session(study.cfg, threads, Path(data_dir or study.run_info["data_dir"]), study.label) as (model, data):
            for copy in todo:
                copy.started = time.perf_counter()
                _train(copy, model, data, progress)
            if path:
                _write_path(study, model, data)
    except BaseException:
        study.record_failure()
        raise


def _train(copy: Copy, model, data: tuple, progress: bool) -> None:
    from lottery.training import TrainingRun, epoch_saver

    train, val, spe = data
    mask, step, history = copy.start(model, train, spe)
    run = TrainingRun(model, copy.study.cfg, train, val, spe, copy.study.cfg.total_iterations(spe), label=copy.label,
                      on_epoch_end=epoch_saver(model, copy.paths.checkpoint, copy.paths.metrics, spe),
                      progress=progress, history=history, data_seed=copy.data_seed)
    copy.finish(model, mask, run.run(step), spe)


def _write_path(study: Study, model, data: tuple) -> None:
    """Interpolate between the two copies' trained networks; write the sealed result.json (with the
    records of the copies' files) and log one line per point and the end line."""
    import keras

    from lottery.interpolation import error_barrier, interpolation_path, model_weights
    from lottery.models import batchnorm_layers
    from lottery.training import eval_batch_size

    train, val, spe = data
    cfg, copies = study.cfg, study.copies
    ends = [intact_result(c.paths.result, c.label) for c in copies]
    if any(end is None for end in ends):
        raise MissingArtifactError(f"{study.label}: a copy is not done, the path needs both: {study.paths.dir}")
    weights = [model_weights(keras.models.load_model(c.paths.model, compile=False)) for c in copies]
    batches = min(TRAIN_SUBSET_BATCHES, spe)
    subset = train.batches(cfg.batch_size, seed=cfg.seed, epoch=0, augmentation="none").take(batches)
    batchnorm = bool(batchnorm_layers(model))
    log.info("%s: path  %d points between copy a and copy b  val %d images, train subset %d images  BatchNorm %s",
             study.label, study.points, val.num_examples, batches * cfg.batch_size,
             "statistics recomputed at every point" if batchnorm else "none")
    path = interpolation_path(model, *weights, points=study.points,
                              val=val.eval_batches(eval_batch_size(cfg.batch_size, val.image_shape)), train=subset,
                              bn_batches=subset if batchnorm else None, mask=study.load_mask(),
                              on_point=lambda row: _log_point(study, row))
    result = {**_result_fields(study, ends, spe, batches, batchnorm), "path": path, "instability": error_barrier(path),
              "instability_train": error_barrier(path, "train_accuracy"), "wall_s": time.perf_counter() - study.started,
              **output_records(study.paths.dir, [f"{c.paths.dir.name}/{name}" for c in copies for name in COPY_FILES])}
    write_json(study.paths.result, result, sealed=True)
    study.paths.error.unlink(missing_ok=True)
    log.info("%s: done in %.1fs  instability %.2f points (train %.2f)  val_acc a %.2f%%, b %.2f%%, worst %.2f%%  -> %s",
             study.label, result["wall_s"], result["instability"], result["instability_train"], 100 * path[0]["accuracy"],
             100 * path[-1]["accuracy"], 100 * min(row["accuracy"] for row in path), study.paths.result)
    study.result = {**summary(result), "skipped": False}


def _log_point(study: Study, row: dict) -> None:
    log.info("%s: alpha %.2f  val_loss %.4f  val_acc %.2f%%  train_loss %.4f  train_acc %.2f%%", study.label, row["alpha"],
             row["loss"], 100 * row["accuracy"], row["train_loss"], 100 * row["train_accuracy"])


def _result_fields(study: Study, ends: list[dict], spe: int, batches: int, batchnorm: bool) -> dict[str, Any]:
    """result.json's fields other than the path and the instability."""
    cfg, mask = study.cfg, study.mask
    remaining = None
    if mask is not None:
        from lottery.pruning import mask_report

        report = mask_report(study.load_mask())
        remaining = report["kept"] / report["total"]
    return {
        "experiment_id": study.run_info["experiment_id"],
        "stability": study.name,
        "network": "dense" if mask is None else "ticket",
        "mask_id": mask.mask_id if mask else None,
        "sparsity": mask.sparsity if mask else None,
        "remaining": remaining,
        "schedule": cfg.pruning_schedule,
        **({"level": mask.index + 1} if mask and cfg.pruning_schedule == "iterative" else {}),
        "rewind": study.rewind,
        "rewind_step": Step.parse(study.rewind).iterations(spe),
        "rewind_mode": study.rewind_mode,
        "points": study.points,
        "data_seeds": {c.which: c.data_seed for c in study.copies},
        "train_subset": {"batches": batches, "images": batches * cfg.batch_size, "seed": cfg.seed, "epoch": 0,
                         "augmentation": "none"},
        "batchnorm": "recomputed" if batchnorm else "none",
        "endpoints": {c.which: {"val_accuracy": end["val_accuracy"], "val_loss": end["curve"][-1]["val_loss"]}
                      for c, end in zip(study.copies, ends)},
        "backend": keras_backend(),
    }

"""The training loop shared by dense training and late-reset retraining (Keras 3 API only).

Training is cut into *segments* that end at epoch boundaries and at the steps where a checkpoint
is wanted (rewind points). Each segment is one ``model.fit`` call over the deterministic batch
stream of its epoch, started ``skip_batches`` into it, so training can start (or resume) at any
step and still see exactly the batches an uninterrupted run would have seen. Keras caches the
compiled train step, so a segment costs one iterator, not a recompilation.

Everything that defines the training state is saved in a checkpoint: every model variable (BatchNorm
statistics included), every optimizer variable (the iteration counter, hence the position in the
learning-rate schedule, and the slots: momentum, Adam moments), and the step, from which the data
position (epoch, batch within the epoch) follows.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
from keras import ops

from lottery.config import ExperimentConfig, Step
from lottery.errors import CorruptArtifactError
from lottery.files import load_arrays, remove_arrays, save_arrays, write_csv
from lottery.phases import phase

log = logging.getLogger("lottery")

METRIC_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "images_per_s",
    "wall_s",
)


# ---- learning rate and optimizer --------------------------------------------------------------
@keras.saving.register_keras_serializable(package="lottery")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up over ``warmup_steps`` iterations, then ``lr * gamma**k`` after k milestones."""

    def __init__(self, base_lr: float, warmup_steps: int = 0, milestones: tuple[int, ...] = (), gamma: float = 0.1):
        self.base_lr = float(base_lr)
        self.warmup_steps = int(warmup_steps)
        self.milestones = tuple(int(m) for m in milestones)
        self.gamma = float(gamma)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        lr = ops.convert_to_tensor(self.base_lr, "float32")
        for milestone in self.milestones:
            lr = lr * ops.where(step >= milestone, self.gamma, 1.0)
        if self.warmup_steps > 0:
            lr = lr * ops.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        return lr

    def value_at(self, step: int) -> float:
        factor = self.gamma ** sum(step >= m for m in self.milestones)
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return self.base_lr * factor * warm

    def get_config(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, "warmup_steps": self.warmup_steps, "milestones": list(self.milestones), "gamma": self.gamma}


def make_schedule(cfg: ExperimentConfig, steps_per_epoch: int) -> WarmupStepDecay:
    return WarmupStepDecay(
        cfg.lr,
        Step.parse(cfg.warmup_steps).iterations(steps_per_epoch),
        cfg.milestone_iterations(steps_per_epoch),
        cfg.lr_gamma,
    )


def make_optimizer(cfg: ExperimentConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """SGD (momentum, Nesterov) or Adam. Keras applies ``weight_decay`` decoupled (AdamW-style)."""
    schedule = make_schedule(cfg, steps_per_epoch)
    weight_decay = cfg.weight_decay or None
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=schedule, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=weight_decay)
    return keras.optimizers.Adam(learning_rate=schedule, weight_decay=weight_decay)


def compile_model(model: keras.Model, cfg: ExperimentConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Compile with a fresh optimizer and build its variables, so that a checkpoint can be loaded."""
    model.compile(
        optimizer=make_optimizer(cfg, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        # JAX has no fast op-by-op mode (LeNet: 3,600 vs 72,000 img/s): it always compiles with XLA.
        jit_compile=True if keras.backend.backend() == "jax" else cfg.jit_compile,
    )
    model.optimizer.build(model.trainable_variables)
    return model.optimizer


# ---- checkpoints ------------------------------------------------------------------------------
def training_state(model: keras.Model) -> dict[str, np.ndarray]:
    """Every model and optimizer variable, keyed ``model:<path>`` / ``optimizer:<path>``."""
    state = {f"model:{v.path}": ops.convert_to_numpy(v) for v in model.weights}
    state.update({_optimizer_key(v): ops.convert_to_numpy(v) for v in optimizer_state(model.optimizer)})
    return state


def optimizer_state(optimizer) -> list:
    """The optimizer's variables that define the training state: not the masks it holds
    (`lottery.pruning.MaskConstraint`), which belong to the ticket, not to the checkpoint."""
    from lottery.pruning import is_mask_state

    return [v for v in optimizer.variables if not is_mask_state(v)]


def assign_saved_weights(model: keras.Model, path: str | Path) -> None:
    """The weights of the ``.keras`` file ``path`` (the same architecture) into ``model``'s variables;
    its optimizer is left alone (``model.load_weights`` would load the file's optimizer state too)."""
    saved = keras.models.load_model(path, compile=False)
    if len(saved.weights) != len(model.weights):
        raise ValueError(f"{path} has {len(saved.weights)} variables, the model {len(model.weights)}")
    for target, source in zip(model.weights, saved.weights):
        if tuple(source.shape) != tuple(target.shape):
            raise ValueError(f"{path}: {source.path} has shape {tuple(source.shape)}, the model expects {tuple(target.shape)}")
        target.assign(ops.convert_to_numpy(source))


def reset_optimizer_slots(optimizer) -> None:
    """A fresh optimizer at the same iteration: its slots (SGD momentum, Adam moments) set to zero;
    the iteration counter (the learning-rate schedule's position) and any loss scale are kept."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    for variable in optimizer_state(inner):
        if variable.path.endswith(("_momentum", "_velocity", "_velocity_hat")):
            variable.assign(np.zeros(variable.shape, dtype=variable.dtype))


def _optimizer_key(variable) -> str:
    # "sgd_1/fc1_kernel_momentum" -> "optimizer:fc1_kernel_momentum": Keras numbers optimizer names
    # per process, so the optimizer's own name is not part of the key.
    return "optimizer:" + variable.path.split("/", 1)[-1]


def save_checkpoint(path: str | Path, model: keras.Model, *, step: int, steps_per_epoch: int, extra: dict | None = None) -> None:
    meta = {
        "step": int(step),
        "epoch": step // steps_per_epoch,
        "batch_in_epoch": step % steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "optimizer_iterations": int(ops.convert_to_numpy(model.optimizer.iterations)),
        "lr": float(current_lr(model.optimizer)),
        **(extra or {}),
    }
    save_arrays(path, training_state(model), meta)


def load_checkpoint(path: str | Path, model: keras.Model, *, weights: bool = True, optimizer: bool = True) -> dict:
    """Restore a checkpoint into a compiled model; every variable must match by path and shape."""
    arrays, meta = load_arrays(path)
    restore_checkpoint(model, arrays, path, weights=weights, optimizer=optimizer)
    return meta


def restore_checkpoint(model: keras.Model, arrays: dict, path, *, weights: bool = True, optimizer: bool = True) -> None:
    """Assign the arrays of a checkpoint read from ``path`` to the model's (and optimizer's) variables."""
    targets = []
    if weights:
        targets += [(f"model:{v.path}", v) for v in model.weights]
    if optimizer:
        targets += [(_optimizer_key(v), v) for v in optimizer_state(model.optimizer)]
    missing = [key for key, _ in targets if key not in arrays]
    if missing:
        raise ValueError(f"checkpoint {path} does not match this model: no values for {missing[:3]} ({len(missing)} in all)")
    for key, variable in targets:
        value = arrays[key]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"checkpoint {path}: {key} has shape {value.shape}, the model expects {tuple(variable.shape)}")
        variable.assign(value)


def read_resume_checkpoint(checkpoint: Path, label: str) -> tuple[dict, dict] | None:
    """(arrays, meta) of an interrupted run's epoch checkpoint; None when there is none, or when it
    is damaged: then it is named in the log and deleted, and the run starts over (never resumes
    from a state it cannot trust)."""
    if not checkpoint.exists():
        return None
    try:
        return load_arrays(checkpoint)
    except CorruptArtifactError as exc:
        log.warning("%s: the resume checkpoint is damaged, not using it; starting over: %s", label, exc)
        remove_arrays(checkpoint)
        return None


def resume_point(checkpoint: Path, model: keras.Model, label: str = "train", metrics: Path | None = None) -> tuple[int, list[dict]] | None:
    """(step, history) of an interrupted run's checkpoint, restored into ``model``; None if there is
    none or it is damaged (`read_resume_checkpoint`). ``metrics``: rewritten from the checkpoint's
    history, so that it matches the state the run resumes from."""
    found = read_resume_checkpoint(checkpoint, label)
    if found is None:
        return None
    arrays, meta = found
    restore_checkpoint(model, arrays, checkpoint)
    if metrics is not None:
        write_metrics(metrics, meta["history"])
    return meta["step"], meta["history"]


def epoch_saver(model: keras.Model, checkpoint: Path, metrics: Path, steps_per_epoch: int) -> Callable[[int, list[dict]], None]:
    """The ``on_epoch_end`` of a resumable run: the metrics so far and a checkpoint to resume from."""

    def save_epoch(step: int, rows: list[dict]) -> None:
        write_metrics(metrics, rows)
        save_checkpoint(checkpoint, model, step=step, steps_per_epoch=steps_per_epoch, extra={"history": rows})

    return save_epoch


def write_metrics(path: Path, rows: list[dict]) -> None:
    """One CSV row per finished epoch (``METRIC_COLUMNS``)."""
    write_csv(path, METRIC_COLUMNS, rows)


def current_lr(optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer under mixed precision
    lr = inner.learning_rate  # Keras evaluates a schedule at the current iteration here
    return float(ops.convert_to_numpy(lr))


# ---- the loop ---------------------------------------------------------------------------------
# Evaluation is forward-only, so it takes larger batches than training where images are small: on
# 2 CPU cores, Fashion-MNIST's 10,000 validation images take 0.12-0.19 s at batch 1,024 against
# 0.34 s at 128. Capped by input values per batch (1,024 images of 28 x 28), a whole multiple of
# the training batch (so data parallelism still divides it); 224 x 224 x 3 keeps the training batch.
EVAL_BATCH_VALUES = 1024 * 28 * 28


def eval_batch_size(batch_size: int, image_shape) -> int:
    """The validation batch: the largest multiple of ``batch_size`` within ``EVAL_BATCH_VALUES``."""
    return batch_size * max(1, EVAL_BATCH_VALUES // (int(np.prod(image_shape)) * batch_size))


@dataclass
class TrainingRun:
    """What to train and where to stop. ``history`` holds the metric rows of finished epochs;
    ``data_seed`` replaces the config's seed in the data order (shuffling and augmentation) only. Its
    phases (`lottery.phases`, unit ``label``): ``epochs`` (``model.fit``: the training steps, the
    first trace of the train step included), ``eval`` (``model.evaluate`` at each epoch end) and
    ``write`` (``on_epoch_end``: metrics and checkpoints)."""

    model: keras.Model
    cfg: ExperimentConfig
    train_data: Any  # lottery.data.pipeline.ShardedDataset
    val_data: Any
    steps_per_epoch: int
    total_steps: int
    label: str = "train"
    stop_points: tuple[int, ...] = ()  # steps where on_stop is called (rewind points)
    on_stop: Callable[[int], None] | None = None
    on_epoch_end: Callable[[int, list[dict]], None] | None = None
    progress: bool = False
    history: list[dict] = field(default_factory=list)
    data_seed: int | None = None  # the data order's seed (None: the config's); the model's init is not changed

    def run(self, start_step: int) -> list[dict]:
        step, spe, total = start_step, self.steps_per_epoch, self.total_steps
        val_stream = self.val_data.eval_batches(eval_batch_size(self.cfg.batch_size, self.val_data.image_shape))
        if step in self.stop_points and self.on_stop:
            self.on_stop(step)
        epoch = _EpochTally()
        while step < total:
            index, position = divmod(step, spe)
            epoch_end = min((index + 1) * spe, total)
            next_stops = [s for s in self.stop_points if step < s < epoch_end]
            segment_end = min(next_stops) if next_stops else epoch_end
            self._fit(index, position, segment_end - step, epoch)
            step = segment_end
            if step in self.stop_points and self.on_stop:
                self.on_stop(step)
            if step == epoch_end:
                self._end_epoch(step, val_stream, epoch)
                epoch = _EpochTally()
        return self.history

    def _fit(self, epoch: int, position: int, n: int, tally: "_EpochTally") -> None:
        """``n`` steps of epoch ``epoch`` from batch ``position``: one ``model.fit`` call."""
        seed = self.cfg.seed if self.data_seed is None else self.data_seed
        stream = self.train_data.batches(
            self.cfg.batch_size, seed=seed, epoch=epoch, augmentation=self.cfg.augmentation, skip_batches=position
        ).take(n)
        started = time.perf_counter()
        with phase("epochs", self.label):
            fit = self.model.fit(stream, epochs=1, steps_per_epoch=n, shuffle=False, verbose=1 if self.progress else 0)
        tally.train_time += time.perf_counter() - started
        tally.loss += fit.history["loss"][-1] * n
        tally.correct += fit.history["accuracy"][-1] * n
        tally.seen += n

    def _end_epoch(self, step: int, val_stream, tally: "_EpochTally") -> None:
        """Evaluate, record the epoch's row and log its line, call ``on_epoch_end``."""
        with phase("eval", self.label):
            val = self.model.evaluate(val_stream, verbose=0, return_dict=True)
        train = (tally.loss / tally.seen, tally.correct / tally.seen, tally.seen * self.cfg.batch_size / max(tally.train_time, 1e-9))
        end_of_epoch(self.history, step, self.steps_per_epoch, self.total_steps, self.model.optimizer, train,
                     (val["loss"], val["accuracy"]), tally.wall_start, self.label)
        if self.on_epoch_end:
            with phase("write", self.label):
                self.on_epoch_end(step, self.history)


@dataclass
class _EpochTally:
    """The running sums of one epoch (an epoch can take several ``fit`` segments)."""

    loss: float = 0.0
    correct: float = 0.0
    seen: int = 0
    train_time: float = 0.0
    wall_start: float = field(default_factory=time.perf_counter)


def end_of_epoch(history: list[dict], step: int, spe: int, total: int, optimizer, train: tuple, val: tuple,
                 wall_start: float, label: str) -> None:
    """Append the row of the epoch that ends at ``step`` to ``history`` (``METRIC_COLUMNS``) and log
    its line. ``train``: (loss, accuracy, images/s); ``val``: (loss, accuracy); ``wall_start``: the
    epoch's start (``time.perf_counter``)."""
    row = {"epoch": -(-step // spe), "step": step, "lr": current_lr(optimizer), "train_loss": float(train[0]),
           "train_accuracy": float(train[1]), "val_loss": float(val[0]), "val_accuracy": float(val[1]),
           "images_per_s": float(train[2]), "wall_s": time.perf_counter() - wall_start}
    history.append(row)
    log.info(
        "%s epoch %d/%d  step %d/%d  loss %.4f  acc %.2f%%  val_loss %.4f  val_acc %.2f%%  %.0f img/s  %.1fs",
        label, row["epoch"], math.ceil(total / spe), step, total, row["train_loss"], 100 * row["train_accuracy"],
        row["val_loss"], 100 * row["val_accuracy"], row["images_per_s"], row["wall_s"],
    )


def count_params(variables) -> int:
    return int(sum(int(np.prod(v.shape)) for v in variables))

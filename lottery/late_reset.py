"""Late resetting: rewind to a point of the dense run, apply a mask, retrain to the end with the
mask fixed. One ticket per (mask, rewind point); the random controls are tickets too.

    retrain(workdir, mask, rewind[, control=...]) -> small result dict (what XCom may carry)
    retrain_many(workdir, [mask, ...] | "all", rewind[, control=..., pack=...]) -> one per ticket

Controls: ``random_reinit`` keeps the mask but starts from freshly drawn weights (and a fresh
optimizer state) at the rewind step; ``random_prune`` keeps the rewound weights and optimizer
state but a random mask with the same number of surviving weights in every layer.

Writes ``tickets/<ticket name>/`` (result.json, model.keras, metrics.csv; error.json when it fails;
paths: lottery/paths.py), resumes from the ticket's checkpoint (starts over from the rewind point
when it is damaged, saying so), does nothing when the result exists and every file it lists is
intact. Its result.json is sealed (`lottery.files.write_json`). A ticket is trained under its lock
(``.locks/<name>.train.lock``, `lottery.locks`): another run of the same config, in the same work
directory, waits for it and then finds it done instead of training it a second time.

A group (`retrain_many`) opens the data, builds and compiles the model once, then trains its
tickets one after another in that model: each ticket restores every variable from its rewind
checkpoint (or its own checkpoint), reseeds, and assigns its mask to the mask variables of the
compiled step (`lottery.pruning.MaskConstraint`), so the step is traced once and each ticket's
result is bit for bit the one it gets alone. Each ticket stays resumable and idempotent on its own.
On the JAX backend with a pack size above 1, tickets train side by side instead (lottery/packed.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from lottery.config import CONTROLS, Step
from lottery.dense import verify_rewind_checkpoint
from lottery.errors import CorruptArtifactError, MissingArtifactError
from lottery.files import atomic_path, intact_result, output_records, remove_arrays, write_json
from lottery.locks import wait_lock
from lottery.paths import TicketPaths, Workdir
from lottery.plan import MaskSpec, RunPlan, TicketSpec
from lottery.session import build_model, final_accuracy, keras_backend, mean_images_per_s, open_data, session, small

log = logging.getLogger("lottery")

# What result.json's "timings" holds, in seconds. Shared by the group, carried by the first ticket
# that finishes in the process (0 on the others): imports_s (Keras, the backend, the engine; 0 when
# the process had them), data_open_s, build_compile_s (the train step's trace happens in the first
# fit: inside that ticket's epochs_s). Per ticket: start_s (rewind or resume, mask), epochs_s
# (model.fit), eval_s (model.evaluate at each epoch end), write_s (metrics.csv, the epoch
# checkpoints, model.keras; result.json itself is not counted). They add up; wall_s is their sum
# without imports_s.
TIMING_KEYS = ("imports_s", "data_open_s", "build_compile_s", "start_s", "epochs_s", "eval_s", "write_s")


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
    """Reset to rewind point ``rewind``, apply mask ``mask``, train to the end with the mask fixed
    (``mask`` and ``rewind``: an index or an id / step; ``control``: one of ``CONTROLS``)."""
    return retrain_many(workdir, [mask], rewind, control=control, threads=threads, data_dir=data_dir,
                        progress=progress, pack=1)[0]


def retrain_many(
    workdir: str | os.PathLike,
    masks: Sequence[int | str] | str,
    rewind: int | str,
    *,
    control: str | Sequence[str | None] | None = None,
    threads: int | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = False,
    pack: int | None = None,
) -> list[dict[str, Any]]:
    """Retrain the tickets of ``masks`` (indices or ids, or ``"all"``) at one rewind point in this
    process: one small result dict per ticket, in the order given (``"skipped": True`` for those
    already done). ``control``: one kind for the whole group (a list must name one kind only).
    ``pack``: tickets trained side by side (JAX backend; None: ``LOTTERY_PACK`` or from the
    device's memory, 1 on CPU). A bad group is refused before any training, naming the value.
    When a ticket fails, the others still train; the first failure is raised at the end."""
    workdir = Workdir(workdir)
    cfg, run_info = workdir.load()
    plan = RunPlan.from_config(cfg)
    kind = _group_control(control)
    tickets = [LateReset(workdir, cfg, run_info, m, plan.rewind(rewind), kind) for m in _group_masks(plan, masks)]
    results = {t.name: done for t in tickets if (done := t.done_result()) is not None}
    todo = [t for t in tickets if t.name not in results]
    for ticket in todo:
        ticket.check_inputs()
    if todo:  # one rewind point per group: its checkpoint is checked against the dense run's record once
        try:
            verify_rewind_checkpoint(workdir, todo[0].rewind)
        except CorruptArtifactError:
            for ticket in todo:  # none of them can train: each one's report says why
                ticket.record_failure()
            raise
    with contextlib.ExitStack() as held:
        todo = _claim(todo, results, held)
        if todo:  # a group with nothing to do imports no Keras
            shared = {"imports_s": _import_engine()}
            data = Path(data_dir or run_info["data_dir"])
            results.update(_train_group(cfg, todo, threads, data, progress, pack, shared))
    return [results[t.name] for t in tickets]


def _claim(todo: list[LateReset], results: dict[str, dict], held: contextlib.ExitStack) -> list[LateReset]:
    """Hold the training lock of each ticket in ``todo`` (until ``held`` closes); the tickets still
    to train. Another process training one of them (a run of the same config) is waited for, and
    what it finished meanwhile goes to ``results`` instead of being trained again. The locks are
    taken in name order, so two groups that share tickets never wait on each other."""
    for ticket in sorted(todo, key=lambda t: t.name):
        held.enter_context(wait_lock(ticket.workdir.training_lock(ticket.name), f"retrain {ticket.name}", log=log))
        done = ticket.done_result()  # finished by another process since the first look
        if done is not None:
            results[ticket.name] = done
    return [t for t in todo if t.name not in results]


def _import_engine() -> float:
    """Import Keras, its backend and the engine's training modules; the seconds it took (0 when
    this process had them already)."""
    started = time.perf_counter()
    import keras

    from lottery import pruning, training  # noqa: F401

    if keras.backend.backend() == "tensorflow":
        from lottery.data import pipeline  # noqa: F401  (TensorFlow itself)
    else:
        from lottery.data import arrays  # noqa: F401
    return time.perf_counter() - started


def _group_masks(plan: RunPlan, masks: Sequence[int | str] | str) -> list[MaskSpec]:
    """The group's masks: every one for ``"all"``; a mask named twice or unknown is refused."""
    if isinstance(masks, str) and masks == "all":
        return list(plan.masks)
    if isinstance(masks, (str, int)):
        masks = [masks]
    if not masks:
        raise ValueError("the group names no mask: give mask indices or ids, or 'all'")
    specs, named = [], {}
    for ref in masks:
        spec = plan.mask(ref)
        if spec.mask_id in named:
            raise ValueError(f"mask {spec.mask_id} is named twice in the group (as {named[spec.mask_id]!r} and {ref!r})")
        named[spec.mask_id] = ref
        specs.append(spec)
    return specs


def _group_control(control: str | Sequence[str | None] | None) -> str | None:
    """The group's one control kind (or None): a list naming two kinds, or a ticket and a control, is refused."""
    kinds = [control] if control is None or isinstance(control, str) else list(control)
    for kind in kinds:
        if kind is not None and kind not in CONTROLS:
            raise ValueError(f"unknown control {kind!r}: choose one of {', '.join(CONTROLS)}")
    if len(set(kinds)) > 1:
        named = ", ".join(sorted(k or "none (ticket)" for k in set(kinds)))
        raise ValueError(f"a group mixes controls ({named}): one group trains one control kind, or tickets only")
    return kinds[0] if kinds else None


def _train_group(cfg, todo: list[LateReset], threads, data_dir: Path, progress: bool, pack, shared) -> dict[str, dict]:
    """Open the data, build and compile once; then the tickets not done yet: packed on JAX when the
    pack size is above 1 (decided inside the session: JAX must not start before it), else one after
    another in the compiled model."""
    from lottery.packed import pack_size, train_packed
    from lottery.training import compile_model

    with session(cfg, threads):
        try:
            shared["data_open_s"], (train, val, spe) = _timed(open_data, cfg, data_dir)
            started = time.perf_counter()
            model = build_model(cfg, train)
            compile_model(model, cfg, spe)
            shared["build_compile_s"] = time.perf_counter() - started
            size = pack_size(cfg, pack, len(todo), model)
        except BaseException:
            for ticket in todo:  # none of them can train: each one's report says why
                ticket.record_failure()
            raise
        if size > 1:
            return train_packed(cfg, todo, model, (train, val, spe), size, shared)
        return _train_sequentially(todo, model, (train, val, spe), progress, shared)


def _train_sequentially(todo: list[LateReset], model, data: tuple, progress: bool, shared) -> dict[str, dict]:
    """Each ticket in turn in the compiled ``model``. A ticket that fails leaves its error.json;
    the others still train; the first failure is raised at the end."""
    results, failures = {}, []
    for ticket in todo:
        try:
            results[ticket.name] = ticket.run(model, *data, progress, shared)
        except Exception as exc:
            ticket.record_failure()
            failures.append(exc)
            continue
        except BaseException:
            ticket.record_failure()
            raise
        shared = {}  # the shared costs go to the first ticket that finished
    if failures:
        if len(failures) > 1:
            log.error("retrain: %d of %d tickets failed; raising the first", len(failures), len(todo))
        raise failures[0]
    return results


def _timed(function, *args) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - started, value


class LateReset:
    """One ticket (or control): its inputs, its directory, and the steps that retrain it."""

    def __init__(self, workdir: Workdir, cfg, run_info: dict, mask: MaskSpec, rewind: str, control: str | None):
        self.workdir, self.cfg, self.run_info = workdir, cfg, run_info
        self.mask, self.rewind, self.control = mask, rewind, control
        self.spec = TicketSpec(mask.mask_id, rewind, control)
        self.name = self.spec.name
        self.paths: TicketPaths = workdir.ticket(self.spec)
        self.mask_path = workdir.mask_file(mask.mask_id)
        self.rewind_path = workdir.rewind_checkpoint(rewind)

    def check_inputs(self) -> None:
        for needed, step_name in ((self.mask_path, "masks"), (self.rewind_path, "dense")):
            if not needed.exists():
                raise MissingArtifactError(f"{needed} does not exist: run `python -m lottery {step_name} --workdir {self.workdir}` first")

    def done_result(self) -> dict[str, Any] | None:
        """The small result of a ticket already done (with its "already done" log line), or None.
        Done means: result.json readable and every file it lists (``files``: size, sha256) intact;
        a damaged ticket is named in the log and trained again (``files.intact_result``)."""
        result = intact_result(self.paths.result, f"retrain {self.name}")
        if result is None:
            return None
        log.info("retrain %s: already done (val_acc %.2f%%; %d files checked), nothing to do: %s",
                 self.name, 100 * result["val_accuracy"], len(result.get("files", ())), self.paths.dir)
        return {**small(result), "skipped": True}

    def produced_files(self) -> list[str]:
        """The files of this ticket that its result vouches for (names inside its directory)."""
        produced = [self.paths.model, self.paths.metrics] + ([self.paths.mask] if self.control == "random_prune" else [])
        return [p.name for p in produced]

    def record_failure(self) -> None:
        """Leave a note for the report; keep the checkpoint so that a rerun resumes. Best effort: on
        a full disk the note cannot be written either, and the failure itself is what must surface."""
        import sys

        exc = sys.exc_info()[1]
        try:
            write_json(self.paths.error, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        except OSError as note_error:
            log.error("retrain %s: could not record the failure (%s): %s", self.name, note_error, exc)

    def run(self, model, train, val, spe: int, progress: bool, shared: dict[str, float]) -> dict[str, Any]:
        """Bring the compiled ``model`` (shared by the group) to this ticket's start point, mask
        it, train it to the end, record the result. ``shared``: the group's shared costs to carry."""
        started = time.perf_counter()
        total = self.cfg.total_iterations(spe)
        mask, start, history, report = self.prepare(model, train, spe)
        start_s = time.perf_counter() - started
        history, timings = self._train(model, mask, train, val, spe, total, start, history, progress)
        timings = {**dict.fromkeys(TIMING_KEYS, 0.0), **shared, "start_s": start_s, **timings}
        wall_s = time.perf_counter() - started + timings["data_open_s"] + timings["build_compile_s"]
        return self.finish(self.result(report, spe, history, timings, wall_s))

    def prepare(self, model, train, spe: int) -> tuple[dict, int, list[dict], dict]:
        """Bring ``model`` to this ticket's start point (every variable restored, RNG reseeded), mask
        it, log the start line: (mask, start step, history so far, mask report)."""
        import keras

        from lottery.models import set_random_seed

        set_random_seed(self.cfg.seed)  # as a fresh process: training draws no other randomness
        mask = self.load_ticket_mask()
        start, history = self.start_point(model, train)
        report = self.apply_ticket_mask(model, mask)
        self.log_start(report, spe, start, self.cfg.total_iterations(spe))
        return mask, start, history, report

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """Write result.json (with the size and sha256 of each file the ticket made), drop the
        checkpoint and any old error, log the end line."""
        result = {**result, **output_records(self.paths.dir, self.produced_files())}
        write_json(self.paths.result, result, sealed=True)
        remove_arrays(self.paths.checkpoint)
        self.paths.error.unlink(missing_ok=True)
        log.info("retrain %s: done in %.1fs  val_acc %.2f%% (best %.2f%%)  %.0f img/s  -> %s", self.name, result["wall_s"],
                 100 * result["val_accuracy"], 100 * result["best_val_accuracy"], result["images_per_s"], self.paths.dir)
        return {**small(result), "skipped": False}

    def load_ticket_mask(self) -> dict:
        """The ticket's mask; for ``random_prune``, a random one with the same count in every layer."""
        from lottery.pruning import load_mask, random_prune_like

        mask, _ = load_mask(self.mask_path)
        if self.control == "random_prune":
            mask = random_prune_like(mask, seed=_stable_seed(self.cfg.seed, self.mask.mask_id, "random_prune"))
        return mask

    def start_point(self, model, train) -> tuple[int, list[dict]]:
        """Resume from the ticket's checkpoint, or rewind (``random_reinit``: then draw fresh weights)."""
        from lottery.training import load_checkpoint, resume_point

        resumed = resume_point(self.paths.checkpoint, model, f"retrain {self.name}", self.paths.metrics)
        if resumed:
            log.info("retrain %s: resuming from the checkpoint at step %d", self.name, resumed[0])
            return resumed
        meta = load_checkpoint(self.rewind_path, model)
        if self.control == "random_reinit":
            self._reinitialize(model, train)
        return meta["step"], []

    def _reinitialize(self, model, train) -> None:
        """Freshly drawn weights and optimizer slots; the schedule keeps its position (the rewind step)."""
        import keras
        import numpy as np

        fresh = build_model(self.cfg, train, seed=_stable_seed(self.cfg.seed, self.mask.mask_id, self.rewind, "random_reinit"))
        for target, source in zip(model.weights, fresh.weights):
            target.assign(keras.ops.convert_to_numpy(source))
        for variable in model.optimizer.variables:
            if variable.path.endswith(("_momentum", "_velocity")):
                variable.assign(np.zeros(variable.shape, dtype=variable.dtype))

    def apply_ticket_mask(self, model, mask: dict) -> dict:
        """Zero the pruned weights (and check that they are: the invariant the experiment rests on)."""
        import keras
        import numpy as np

        from lottery.models import prunable_weights
        from lottery.pruning import apply_mask, mask_report, save_mask

        report = mask_report(mask)
        apply_mask(model, mask)
        weights = prunable_weights(model)
        for path, keep in mask.items():
            if np.any(keras.ops.convert_to_numpy(weights[path])[~keep] != 0):
                raise AssertionError(f"pruned weights of {path} are not zero after applying mask {self.mask.mask_id}")
        if self.control == "random_prune":  # drawn again each time (the same mask): never a damaged leftover
            save_mask(self.paths.mask, mask, {"control": self.control, "like": self.mask.mask_id, "report": report})
        return report

    def log_start(self, report: dict, spe: int, start: int, total: int) -> None:
        log.info(
            "retrain %s: start  mask %s (%.2f%% of prunable weights left)  rewind %s = step %d  %s  %d -> %d it (%d epochs)",
            self.name, self.mask.mask_id, 100 * report["kept"] / report["total"], self.rewind,
            Step.parse(self.rewind).iterations(spe), f"control {self.control}" if self.control else "ticket",
            start, total, -(-(total - start) // spe),
        )

    def _train(self, model, mask, train, val, spe, total, start, history, progress) -> tuple[list[dict], dict]:
        """Train with the mask fixed to the end; save the model with its zeros explicit. Returns the
        history and the run's timings (epochs_s, eval_s, write_s)."""
        from lottery.training import TrainingRun, epoch_saver

        run = TrainingRun(model, self.cfg, train, val, spe, total, label=f"retrain {self.name}",
                          on_epoch_end=epoch_saver(model, self.paths.checkpoint, self.paths.metrics, spe),
                          progress=progress, history=list(history))
        history = run.run(start)
        started = time.perf_counter()
        self.save_model(model, mask)
        run.timings["write_s"] += time.perf_counter() - started
        return history, run.timings

    def save_model(self, model, mask: dict) -> None:
        """model.keras, with the mask's zeros explicit and no constraint attached (not serialisable)."""
        from lottery.pruning import apply_mask, remove_mask

        apply_mask(model, mask)  # idempotent; keeps the saved model's zeros explicit
        remove_mask(model)
        with atomic_path(self.paths.model) as tmp:
            model.save(tmp)

    def result(self, report: dict, spe: int, history: list[dict], timings: dict, wall_s: float) -> dict[str, Any]:
        return {
            "experiment_id": self.run_info["experiment_id"],
            "ticket": str(self.paths.dir),
            "mask_id": self.mask.mask_id,
            "sparsity": self.mask.sparsity,
            "remaining": report["kept"] / report["total"],
            "rewind": self.rewind,
            "rewind_step": Step.parse(self.rewind).iterations(spe),
            "control": self.control,
            "backend": keras_backend(),
            **final_accuracy(history),
            "curve": history,
            "images_per_s": mean_images_per_s(history),
            "wall_s": wall_s,
            "timings": timings,
        }


def _stable_seed(*parts: Any) -> int:
    """A seed from names (not from Python's salted hash): the same control draws the same weights."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")

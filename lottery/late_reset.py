"""Late resetting: rewind to a point of the dense run, apply a mask, retrain to the end with the
mask fixed. One ticket per (mask, rewind point); the random controls are tickets too.

    retrain(workdir, mask, rewind[, control=...]) -> small result dict (what XCom may carry)

Controls: ``random_reinit`` keeps the mask but starts from freshly drawn weights (and a fresh
optimizer state) at the rewind step; ``random_prune`` keeps the rewound weights and optimizer
state but a random mask with the same number of surviving weights in every layer.

Writes ``tickets/<ticket name>/`` (result.json, model.keras, metrics.csv; error.json when it fails;
paths: lottery/paths.py), resumes from the ticket's checkpoint, does nothing when the result exists.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

from lottery.config import CONTROLS, Step
from lottery.errors import MissingArtifactError
from lottery.files import atomic_path, read_json, write_json
from lottery.paths import TicketPaths, Workdir
from lottery.plan import MaskSpec, RunPlan, TicketSpec
from lottery.session import build_model, final_accuracy, mean_images_per_s, open_data, session, small

log = logging.getLogger("lottery")


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
    workdir = Workdir(workdir)
    cfg, run_info = workdir.load()
    if control is not None and control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}: choose one of {', '.join(CONTROLS)}")
    plan = RunPlan.from_config(cfg)
    ticket = LateReset(workdir, cfg, run_info, plan.mask(mask), plan.rewind(rewind), control)
    if ticket.paths.result.exists():
        result = read_json(ticket.paths.result)
        log.info("retrain %s: already done (val_acc %.2f%%), nothing to do: %s",
                 ticket.name, 100 * result["val_accuracy"], ticket.paths.dir)
        return {**small(result), "skipped": True}
    ticket.check_inputs()
    try:
        return {**small(ticket.run(threads, Path(data_dir or run_info["data_dir"]), progress)), "skipped": False}
    except BaseException as exc:
        # Leave a note for the report; keep the checkpoint so that a rerun resumes.
        write_json(ticket.paths.error, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        raise


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

    def run(self, threads: int | None, data_dir: Path, progress: bool) -> dict[str, Any]:
        """Build the model at its start point, mask it, train it to the end, record the result."""
        from lottery.training import compile_model

        started = time.perf_counter()
        with session(self.cfg, threads):
            train, val, spe = open_data(self.cfg, data_dir)
            total = self.cfg.total_iterations(spe)
            model = build_model(self.cfg, train)
            compile_model(model, self.cfg, spe)
            mask = self._mask()
            start, history = self._start_point(model, train)
            report = self._apply_mask(model, mask)
            self._log_start(report, spe, start, total)
            history = self._train(model, mask, train, val, spe, total, start, history, progress)
        result = self._result(report, spe, history, time.perf_counter() - started)
        write_json(self.paths.result, result)
        self.paths.checkpoint.unlink(missing_ok=True)
        self.paths.error.unlink(missing_ok=True)
        log.info("retrain %s: done in %.1fs  val_acc %.2f%% (best %.2f%%)  %.0f img/s  -> %s", self.name, result["wall_s"],
                 100 * result["val_accuracy"], 100 * result["best_val_accuracy"], result["images_per_s"], self.paths.dir)
        return result

    def _mask(self) -> dict:
        """The ticket's mask; for ``random_prune``, a random one with the same count in every layer."""
        from lottery.pruning import load_mask, random_prune_like

        mask, _ = load_mask(self.mask_path)
        if self.control == "random_prune":
            mask = random_prune_like(mask, seed=_stable_seed(self.cfg.seed, self.mask.mask_id, "random_prune"))
        return mask

    def _start_point(self, model, train) -> tuple[int, list[dict]]:
        """Resume from the ticket's checkpoint, or rewind (``random_reinit``: then draw fresh weights)."""
        from lottery.training import load_checkpoint, resume_point

        resumed = resume_point(self.paths.checkpoint, model)
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

    def _apply_mask(self, model, mask: dict) -> dict:
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
        if self.control == "random_prune" and not self.paths.mask.exists():
            save_mask(self.paths.mask, mask, {"control": self.control, "like": self.mask.mask_id, "report": report})
        return report

    def _log_start(self, report: dict, spe: int, start: int, total: int) -> None:
        log.info(
            "retrain %s: start  mask %s (%.2f%% of prunable weights left)  rewind %s = step %d  %s  %d -> %d it (%d epochs)",
            self.name, self.mask.mask_id, 100 * report["kept"] / report["total"], self.rewind,
            Step.parse(self.rewind).iterations(spe), f"control {self.control}" if self.control else "ticket",
            start, total, -(-(total - start) // spe),
        )

    def _train(self, model, mask, train, val, spe, total, start, history, progress) -> list[dict]:
        """Train with the mask fixed to the end; save the model with its zeros explicit."""
        from lottery.pruning import apply_mask, remove_mask
        from lottery.training import TrainingRun, epoch_saver

        run = TrainingRun(model, self.cfg, train, val, spe, total, label=f"retrain {self.name}",
                          on_epoch_end=epoch_saver(model, self.paths.checkpoint, self.paths.metrics, spe),
                          progress=progress, history=list(history))
        history = run.run(start)
        apply_mask(model, mask)  # idempotent; keeps the saved model's zeros explicit
        remove_mask(model)
        with atomic_path(self.paths.model) as tmp:
            model.save(tmp)
        return history

    def _result(self, report: dict, spe: int, history: list[dict], wall_s: float) -> dict[str, Any]:
        return {
            "experiment_id": self.run_info["experiment_id"],
            "ticket": str(self.paths.dir),
            "mask_id": self.mask.mask_id,
            "sparsity": self.mask.sparsity,
            "remaining": report["kept"] / report["total"],
            "rewind": self.rewind,
            "rewind_step": Step.parse(self.rewind).iterations(spe),
            "control": self.control,
            **final_accuracy(history),
            "curve": history,
            "images_per_s": mean_images_per_s(history),
            "wall_s": wall_s,
        }


def _stable_seed(*parts: Any) -> int:
    """A seed from names (not from Python's salted hash): the same control draws the same weights."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")

"""One ticket of late resetting: what it trains (a mask, a rewind point, a control), its files
(``tickets/<name>/``: result.json, model.keras, metrics.csv; error.json when it fails), and the
steps every training strategy takes around its epochs: `Ticket.start` (rewind, or resume from its
checkpoint; reseed; mask) and `Ticket.finish` (model.keras, the sealed result.json).

Controls: ``random_reinit`` keeps the mask but starts from freshly drawn weights (and a fresh
optimizer state) at the rewind step; ``random_prune`` keeps the rewound weights and optimizer
state but a random mask with the same number of surviving weights in every layer.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from lottery.config import ExperimentConfig, Step
from lottery.errors import MissingArtifactError
from lottery.files import atomic_path, intact_result, output_records, remove_arrays, write_json
from lottery.paths import TicketPaths, Workdir
from lottery.phases import phase
from lottery.plan import MaskSpec, TicketSpec
from lottery.session import build_model, final_accuracy, keras_backend, mean_images_per_s, small

log = logging.getLogger("lottery")


@dataclass
class Start:
    """Where a ticket's training starts: its mask, step, metric rows so far, mask report (kept / total)."""

    mask: dict
    step: int
    history: list[dict]
    report: dict


@dataclass
class Ticket:
    """One ticket (or control) to retrain, and its small result once it is done."""

    workdir: Workdir
    cfg: ExperimentConfig
    run_info: dict
    mask: MaskSpec
    rewind: str
    control: str | None = None
    started: float = field(default_factory=time.perf_counter)  # its group's start here: wall_s counts from it
    result: dict[str, Any] | None = None  # what XCom may carry ("skipped": True when it was done before)
    spec: TicketSpec = field(init=False)
    paths: TicketPaths = field(init=False)

    def __post_init__(self) -> None:
        self.spec = TicketSpec(self.mask.mask_id, self.rewind, self.control)
        self.paths = self.workdir.ticket(self.spec)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        """What its log lines (and its phases) start with."""
        return f"retrain {self.name}"

    @property
    def iterative(self) -> bool:
        return self.cfg.pruning_schedule == "iterative"

    @property
    def mask_path(self):
        """Where the ticket's mask is: ``masks/<mask id>.npz`` (one-shot), or the ``mask.npz`` of its
        level of the chain of its rewind point (iterative; a control reads its ticket's)."""
        if not self.iterative:
            return self.workdir.mask_file(self.mask.mask_id)
        return self.workdir.ticket(TicketSpec(self.mask.mask_id, self.rewind)).mask

    def check_inputs(self) -> None:
        chain = f"imp --workdir {self.workdir} --rewind {self.rewind} --levels {self.mask.index + 1}"
        for needed, command in ((self.mask_path, chain if self.iterative else f"masks --workdir {self.workdir}"),
                                (self.workdir.rewind_checkpoint(self.rewind), f"dense --workdir {self.workdir}")):
            if not needed.exists():
                raise MissingArtifactError(f"{needed} does not exist: run `python -m lottery {command}` first")

    def done_result(self) -> dict[str, Any] | None:
        """The small result of a ticket already done (with its "already done" log line), or None.
        Done means: result.json readable and every file it lists (``files``: size, sha256) intact;
        a damaged ticket is named in the log and trained again (``files.intact_result``)."""
        result = intact_result(self.paths.result, f"retrain {self.name}")
        if result is None:
            return None
        log.info("retrain %s: already done (val_acc %.2f%%; %d files checked), nothing to do: %s",
                 self.name, 100 * result["val_accuracy"], len(result.get("files", ())), self.paths.dir)
        self.result = {**small(result), "skipped": True}
        return self.result

    def record_failure(self) -> None:
        """Leave a note for the report; keep the checkpoint so that a rerun resumes. Best effort: on
        a full disk the note cannot be written either, and the failure itself is what must surface."""
        exc = sys.exc_info()[1]
        try:
            write_json(self.paths.error, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        except OSError as note_error:
            log.error("retrain %s: could not record the failure (%s): %s", self.name, note_error, exc)

    def start(self, model, train, spe: int) -> Start:
        """Bring the compiled ``model`` (shared by the group) to this ticket's start point (every
        variable restored, RNG reseeded as in a fresh process), mask it, log the start line."""
        from lottery.models import set_random_seed

        with phase("start", self.label):
            set_random_seed(self.cfg.seed)  # training draws no other randomness
            mask = self.load_ticket_mask()
            step, history = self.start_point(model, train)
            report = self.apply_ticket_mask(model, mask)
        total = self.cfg.total_iterations(spe)
        log.info("retrain %s: start  mask %s (%.2f%% of prunable weights left)  rewind %s = step %d  %s  %d -> %d it (%d epochs)",
                 self.name, self.mask.mask_id, 100 * report["kept"] / report["total"], self.rewind,
                 Step.parse(self.rewind).iterations(spe), f"control {self.control}" if self.control else "ticket",
                 step, total, -(-(total - step) // spe))
        return Start(mask, step, list(history), report)

    def finish(self, model, start: Start, history: list[dict], spe: int, **extra: Any) -> dict[str, Any]:
        """Save the trained ``model`` (its zeros explicit), write result.json (with the size and sha256
        of each file the ticket made), drop the checkpoint and any old error, log the end line."""
        with phase("write", self.label):
            self.save_model(model, start.mask)
        own_mask = self.control == "random_prune" or (self.iterative and not self.control)
        produced = [self.paths.model, self.paths.metrics] + ([self.paths.mask] if own_mask else [])
        result = {**self.result_fields(start.report, spe, history), **extra,
                  **output_records(self.paths.dir, [p.name for p in produced])}
        write_json(self.paths.result, result, sealed=True)
        remove_arrays(self.paths.checkpoint)
        self.paths.error.unlink(missing_ok=True)
        log.info("retrain %s: done in %.1fs  val_acc %.2f%% (best %.2f%%)  %.0f img/s  -> %s", self.name, result["wall_s"],
                 100 * result["val_accuracy"], 100 * result["best_val_accuracy"], result["images_per_s"], self.paths.dir)
        self.result = {**small(result), "skipped": False}
        return self.result

    def load_ticket_mask(self) -> dict:
        """The ticket's mask; for ``random_prune``, a random one with the same count in every layer."""
        from lottery.pruning import load_mask, random_prune_like

        mask, _ = load_mask(self.mask_path)
        if self.control == "random_prune":
            mask = random_prune_like(mask, seed=stable_seed(self.cfg.seed, self.mask.mask_id, "random_prune"))
        return mask

    def start_point(self, model, train) -> tuple[int, list[dict]]:
        """Resume from the ticket's checkpoint, or rewind as ``rewind_mode`` says: ``full`` restores the
        rewind checkpoint's weights and optimizer state (slots and iteration: the schedule's
        position); ``weights`` its weights with fresh (zero) optimizer slots at the rewind step's
        learning rate; ``learning_rate`` the final trained weights (`final_weights`) with fresh slots,
        the schedule replayed from the rewind step. ``random_reinit`` then draws fresh weights."""
        from lottery.training import resume_point

        resumed = resume_point(self.paths.checkpoint, model, f"retrain {self.name}", self.paths.metrics)
        if resumed:
            log.info("retrain %s: resuming from the checkpoint at step %d", self.name, resumed[0])
            return resumed
        return self.rewind_to(model, train), []

    def rewind_to(self, model, train) -> int:
        """Bring the compiled ``model`` to the ticket's rewind state as ``rewind_mode`` says (its mask
        is `apply_ticket_mask`'s business); the rewind step."""
        from lottery.training import assign_saved_weights, load_checkpoint, reset_optimizer_slots

        meta = load_checkpoint(self.workdir.rewind_checkpoint(self.rewind), model)  # the iteration: the rewind step
        mode = self.cfg.rewind_mode
        if mode == "learning_rate":
            assign_saved_weights(model, self.final_weights())
        if mode != "full":
            reset_optimizer_slots(model.optimizer)
        if self.control == "random_reinit":
            self._reinitialize(model, train)
        return meta["step"]

    def final_weights(self):
        """The trained weights learning-rate rewinding starts from: those the ticket's mask was pruned
        from (the dense network's final weights; for iterative level k > 1, level k-1's), verified."""
        from lottery.dense import verify_dense_file
        from lottery.plan import RunPlan

        if not self.iterative or self.mask.index == 0:
            verify_dense_file(self.workdir, self.workdir.final_model)
            return self.workdir.final_model
        before = self.workdir.ticket(TicketSpec(RunPlan.from_config(self.cfg).masks[self.mask.index - 1].mask_id, self.rewind))
        if intact_result(before.result, f"retrain {before.dir.name}") is None:
            raise MissingArtifactError(f"{before.dir} is not done (or damaged): the level before {self.name} "
                                       f"(`python -m lottery imp --workdir {self.workdir} --rewind {self.rewind}`)")
        return before.model

    def _reinitialize(self, model, train) -> None:
        """Freshly drawn weights and optimizer slots; the schedule keeps its position (the rewind step)."""
        import keras

        from lottery.training import reset_optimizer_slots

        fresh = build_model(self.cfg, train, seed=stable_seed(self.cfg.seed, self.mask.mask_id, self.rewind, "random_reinit"))
        for target, source in zip(model.weights, fresh.weights):
            target.assign(keras.ops.convert_to_numpy(source))
        reset_optimizer_slots(model.optimizer)

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

    def save_model(self, model, mask: dict) -> None:
        """model.keras, with the mask's zeros explicit and no constraint attached (not serialisable)."""
        from lottery.pruning import apply_mask, remove_mask

        apply_mask(model, mask)  # idempotent; keeps the saved model's zeros explicit
        remove_mask(model)
        with atomic_path(self.paths.model) as tmp:
            model.save(tmp)

    def result_fields(self, report: dict, spe: int, history: list[dict]) -> dict[str, Any]:
        """result.json's fields; ``wall_s``: seconds from the start of its group in this process (the
        engine's imports, the data, the model's build included) to this result."""
        return {
            "experiment_id": self.run_info["experiment_id"],
            "ticket": str(self.paths.dir),
            "mask_id": self.mask.mask_id,
            "sparsity": self.mask.sparsity,
            "remaining": report["kept"] / report["total"],
            "rewind": self.rewind,
            "rewind_step": Step.parse(self.rewind).iterations(spe),
            "control": self.control,
            "schedule": self.cfg.pruning_schedule,
            **({"level": self.mask.index + 1} if self.iterative else {}),
            "rewind_mode": self.cfg.rewind_mode,
            "backend": keras_backend(),
            **final_accuracy(history),
            "curve": history,
            "images_per_s": mean_images_per_s(history),
            "wall_s": time.perf_counter() - self.started,
        }


def stable_seed(*parts: Any) -> int:
    """A seed from names (not from Python's salted hash): the same control draws the same weights."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")

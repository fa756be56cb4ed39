"""Iterative magnitude pruning (IMP, Frankle & Carbin): per rewind point, a chain of levels.

    run_chain(workdir, rewind[, levels=K]) -> one small result per level, 1..K

Level 0 is the dense network. Level k+1 keeps, of the weights level k kept, all but the
``level_rates()[k]`` share with the smallest magnitude in level k's *trained* weights (globally or
per layer as ``pruning_scope`` says, the output layer at ``output_layer_prune_factor`` x the rate),
rewinds to the chain's rewind point as ``rewind_mode`` says and retrains to the end with that mask.

Level k is the ticket ``tickets/<mask id of level k>__<rewind>/``: its result.json (``"schedule":
"iterative"``, ``"level": k``), model.keras and mask.npz, so the report, the controls and the
Report tab read a chain's levels as they read one-shot tickets. A level whose result and files are
intact is never trained again; a killed chain resumes at its first level that is not (from that
level's epoch checkpoint). A level's mask is computed afresh from the level before (verified) each
time the level starts: a damaged mask or level is named in the log and made again, never pruned from.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from lottery.config import ConfigError
from lottery.errors import MissingArtifactError
from lottery.files import intact_result
from lottery.locks import wait_training_lock
from lottery.paths import Workdir
from lottery.phases import phase
from lottery.plan import RunPlan
from lottery.ticket import Ticket

log = logging.getLogger("lottery")


def run_chain(
    workdir: str | os.PathLike,
    rewind: int | str,
    *,
    levels: int | None = None,
    threads: int | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run (or resume) the chain of rewind point ``rewind`` (an index or a step) up to level
    ``levels`` (default: every level); one small result per level (``"skipped": True`` when done before)."""
    workdir = Workdir(workdir)
    cfg, run_info = workdir.load()
    plan = RunPlan.from_config(cfg)
    if not plan.iterative:
        raise ConfigError("pruning_schedule", cfg.pruning_schedule,
                          f"is not iterative in {workdir}: its masks come from `python -m lottery masks`, its tickets from `retrain`")
    label = plan.rewind(rewind)
    count = len(plan.masks) if levels is None else int(levels)
    if not 1 <= count <= len(plan.masks):
        raise ValueError(f"levels {levels} is out of range: this experiment has {len(plan.masks)} levels (1..{len(plan.masks)})")
    chain = [Ticket(workdir, cfg, run_info, m, label) for m in plan.masks[:count]]
    name = f"imp rewind {label}"
    with wait_training_lock(workdir.training_lock(f"imp__{label}"), name, log=log):
        todo = _first_todo(chain, name)
        if todo is None:
            log.info("%s: all %d levels already done, nothing to do", name, count)
        else:
            _check_dense(workdir, label)
            log.info("%s: start  levels %d..%d of %d (%d done before)  %s  rewind_mode %s", name, todo + 1, count,
                     len(plan.masks), todo, cfg.pruning_scope, cfg.rewind_mode)
            _train_chain(cfg, chain, todo, threads, Path(data_dir or run_info["data_dir"]), progress, name)
    return [{**t.result, "level": t.mask.index + 1} for t in chain]


def _first_todo(chain: list[Ticket], name: str) -> int | None:
    """The index of the first level not done (its result or a file it lists missing or damaged); the
    levels before it are logged as done."""
    for index, ticket in enumerate(chain):
        if ticket.done_result() is None:
            return index
        _log_level(name, ticket, len(chain))
    return None


def _check_dense(workdir: Workdir, label: str) -> None:
    """The dense run's files exist, and the rewind checkpoint is intact (the final weights are
    verified where they are read: level 1's mask, learning-rate rewinding)."""
    from lottery.dense import verify_rewind_checkpoint

    for needed in (workdir.final_model, workdir.rewind_checkpoint(label)):
        if not needed.exists():
            raise MissingArtifactError(f"{needed} does not exist: run `python -m lottery dense --workdir {workdir}` first")
    verify_rewind_checkpoint(workdir, label)


def _train_chain(cfg, chain: list[Ticket], first: int, threads, data_dir: Path, progress: bool, name: str) -> None:
    """Open the data and compile once; then each level from ``first`` in turn: its mask from the
    level before, then its retraining (`late_reset.train_in_turn`: resumes from its checkpoint)."""
    from lottery.late_reset import train_in_turn, training_session

    with training_session(cfg, threads, data_dir, name) as (model, data):
        for index in range(first, len(chain)):
            ticket = chain[index]
            if index > first and ticket.done_result() is not None:  # done before, after a damaged level
                _log_level(name, ticket, len(chain))
                continue
            ticket.started = time.perf_counter()
            try:
                with phase("prune", ticket.label):
                    write_level_mask(ticket, chain[index - 1] if index else None)
            except BaseException:
                ticket.record_failure()
                raise
            train_in_turn([ticket], model, data, progress=progress)
            _log_level(name, ticket, len(chain))


def write_level_mask(ticket: Ticket, before: Ticket | None) -> dict:
    """Level k's mask from level k-1's trained weights and mask (level 1: the dense network's final
    weights, nothing pruned before), saved as the level's ``mask.npz``; returns it."""
    import keras

    from lottery.dense import verify_dense_file
    from lottery.files import sha256_file
    from lottery.models import output_kernel_path, prunable_weights
    from lottery.pruning import iterative_masks, load_mask, mask_report, save_mask

    workdir, cfg = ticket.workdir, ticket.cfg
    if before is None:
        verify_dense_file(workdir, workdir.final_model)  # masks from damaged weights would pass for good ones
        source, prior = workdir.final_model, None
    else:
        if intact_result(before.paths.result, before.label) is None:
            raise MissingArtifactError(f"level {before.mask.index + 1} ({before.paths.dir}) is not done or damaged: "
                                       f"level {ticket.mask.index + 1} cannot be pruned from it")
        source, (prior, _) = before.paths.model, load_mask(before.paths.mask)
    model = keras.models.load_model(source, compile=False)
    weights = {path: keras.ops.convert_to_numpy(v) for path, v in prunable_weights(model).items()}
    rate = cfg.level_rates()[ticket.mask.index]
    mask = iterative_masks(weights, prior, rate, scope=cfg.pruning_scope, output_path=output_kernel_path(model),
                           output_factor=cfg.output_layer_prune_factor)
    meta = {"schedule": "iterative", "level": ticket.mask.index + 1, "mask_id": ticket.mask.mask_id, "sparsity": ticket.mask.sparsity,
            "rate": rate, "scope": cfg.pruning_scope, "output_layer_prune_factor": cfg.output_layer_prune_factor,
            "source": str(Path(source).relative_to(workdir.path)), "source_sha256": sha256_file(source),
            "report": mask_report(mask)}
    save_mask(ticket.paths.mask, mask, meta)
    return mask


def _log_level(name: str, ticket: Ticket, count: int) -> None:
    result = ticket.result or {}
    if "val_accuracy" in result:
        log.info("%s: level %d/%d  sparsity %.2f%%  %.2f%% left  val_acc %.2f%%%s", name, ticket.mask.index + 1, count,
                 100 * ticket.mask.sparsity, 100 * result["remaining"], 100 * result["val_accuracy"],
                 "  (done before)" if result.get("skipped") else "")

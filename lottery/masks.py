"""Masks: one magnitude mask per sparsity level, from the final dense weights.

    make_masks(workdir) -> [{"index", "mask_id", "sparsity", "remaining"}, ...]

Writes ``masks/<mask id>.npz`` (checksummed in its sealed ``<mask id>.json``) and
``masks/index.json``; a mask that exists and verifies is kept, a damaged one is named in the log and
recomputed (a mask is cheap), from a ``dense/final.keras`` that matches the dense run's record of it
(a damaged one is refused, naming the command that recomputes it).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lottery.errors import CorruptArtifactError, MissingArtifactError
from lottery.files import read_json, write_json
from lottery.paths import Workdir
from lottery.plan import MaskSpec, RunPlan

log = logging.getLogger("lottery")


def make_masks(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """One magnitude mask per sparsity level, from the final dense weights."""
    workdir = Workdir(workdir)
    cfg, _ = workdir.load()
    if not workdir.dense_result.exists():
        raise MissingArtifactError(f"{workdir.final_model} does not exist yet: train the dense network first (lottery dense)")
    plan = RunPlan.from_config(cfg)
    if plan.iterative:  # each chain prunes its own levels from the level before (lottery.imp)
        log.info("masks: iterative pruning: the chain of each rewind point makes its own masks (python -m lottery imp)")
        return [{"index": m.index, "mask_id": m.mask_id, "sparsity": m.sparsity, "remaining": 1 - m.sparsity} for m in plan.masks]
    descriptors, todo = _existing_masks(workdir, plan)
    if todo:
        descriptors += _compute_masks(workdir, cfg, todo)
        log.info("masks: wrote %d of %d masks from %s", len(todo), len(plan.masks), workdir.final_model)
    else:
        log.info("masks: all %d masks already exist, nothing to do", len(plan.masks))
    descriptors.sort(key=lambda d: d["index"])
    if not _index_is(workdir, descriptors):  # unchanged: left as it is (its mtime says when masks last changed)
        write_json(workdir.mask_index, descriptors)
    for d in descriptors:
        log.info("masks: %s  %.2f%% of prunable weights left", d["mask_id"], 100 * d["remaining"])
    return descriptors


def _index_is(workdir: Workdir, descriptors: list[dict[str, Any]]) -> bool:
    try:
        return workdir.mask_index.exists() and read_json(workdir.mask_index) == descriptors
    except CorruptArtifactError:
        return False


def _existing_masks(workdir: Workdir, plan: RunPlan) -> tuple[list[dict[str, Any]], list[MaskSpec]]:
    """Descriptors of the masks already on disk (checksum verified), and the masks still to make."""
    from lottery.pruning import load_mask

    descriptors, todo = [], []
    for spec in plan.masks:
        path = workdir.mask_file(spec.mask_id)
        if path.exists():
            try:
                _, meta = load_mask(path)  # verifies the checksum
            except CorruptArtifactError as exc:  # a mask is cheap to recompute: never use a damaged one
                log.warning("masks: %s is damaged, recomputing it: %s", spec.mask_id, exc)
            else:
                descriptors.append(_descriptor(spec, meta))
                continue
        todo.append(spec)
    return descriptors, todo


def _compute_masks(workdir: Workdir, cfg, todo: list[MaskSpec]) -> list[dict[str, Any]]:
    import keras

    from lottery.dense import verify_dense_file
    from lottery.files import sha256_file
    from lottery.models import output_kernel_path, prunable_weights
    from lottery.pruning import magnitude_masks, mask_report, save_mask

    verify_dense_file(workdir, workdir.final_model)  # masks from damaged weights would pass for good ones
    model = keras.models.load_model(workdir.final_model, compile=False)
    weights = {path: keras.ops.convert_to_numpy(v) for path, v in prunable_weights(model).items()}
    source = {"source": str(workdir.final_model.relative_to(workdir.path)), "source_sha256": sha256_file(workdir.final_model)}
    descriptors = []
    for spec in todo:
        mask = magnitude_masks(
            weights, spec.sparsity, scope=cfg.pruning_scope, output_path=output_kernel_path(model),
            output_factor=cfg.output_layer_prune_factor,
        )
        meta = {"mask_id": spec.mask_id, "index": spec.index, "sparsity": spec.sparsity, "scope": cfg.pruning_scope,
                "output_layer_prune_factor": cfg.output_layer_prune_factor, **source, "report": mask_report(mask)}
        save_mask(workdir.mask_file(spec.mask_id), mask, meta)
        descriptors.append(_descriptor(spec, meta))
    return descriptors


def _descriptor(spec: MaskSpec, meta: dict) -> dict[str, Any]:
    report = meta["report"]
    return {"index": spec.index, "mask_id": spec.mask_id, "sparsity": spec.sparsity, "remaining": report["kept"] / report["total"]}

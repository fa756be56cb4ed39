"""The experiment id: a hash of the config fields that differ from their defaults, and the data set's id.

The shape hashed is fixed: changing it changes every id and orphans every work directory
(tests/test_config.py pins ids). Steps are compared in their canonical spelling (``"1ep0it"`` is
``"1ep"``); the sparsity levels enter resolved under ``sparsities`` (an explicit list and the same
levels derived from ``num_levels`` are one experiment); the fields that only add runs (the controls,
the instability analysis) or only spell the levels (``NOT_IN_ID``) never enter it. Pure Python, no
import of the config class: ``lottery.config`` imports this module.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from lottery.steps import Step

# replicates: each replicate is an experiment of its own (its seed), so the count only adds experiments;
# the stability fields only add analyses beside the tickets (and how the report judges them).
NOT_IN_ID = ("num_levels", "prune_rate", "controls", "control_kinds", "control_sparsities", "replicates", "stability",
             "stability_sparsities", "stability_points", "stability_threshold")
# Unset lr_milestones hash as this list (the default drop at 4ep, which unset equals wherever that list is valid).
UNSET_MILESTONES = ["4ep"]
_FLOATS = ("lr", "momentum", "weight_decay", "lr_gamma", "output_layer_prune_factor")


def id_fields(cfg: Any) -> dict[str, Any]:
    """The fields of ``cfg`` (an ``ExperimentConfig``) that differ from their defaults, canonicalised."""
    defaults = _id_shape(type(cfg)())
    return {k: v for k, v in _id_shape(cfg).items() if v != defaults[k]}


def experiment_id(cfg: Any, dataset_id: str) -> str:
    """``<model>-<12 hex>``: a hash of the non-default fields and the data set's id."""
    payload = json.dumps({"config": id_fields(cfg), "dataset": dataset_id}, sort_keys=True, separators=(",", ":"))
    return f"{cfg.model}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def _id_shape(cfg: Any) -> dict[str, Any]:
    out = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IN_ID}
    out["sparsities"] = [round(float(s), 9) for s in cfg.levels()]
    if out["mixed_precision"] == "float16":  # the same experiment as `true`: same id
        out["mixed_precision"] = True
    for key in ("training_steps", "warmup_steps"):
        out[key] = str(Step.parse(out[key]))
    for key in ("rewind_points", "lr_milestones"):
        out[key] = [str(Step.parse(s)) for s in (UNSET_MILESTONES if out[key] is None else out[key])]
    return {**out, **{key: round(float(out[key]), 12) for key in _FLOATS}}

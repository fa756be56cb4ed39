"""The run plan: everything one experiment will do, derived once from its config.

    plan = RunPlan.from_config(cfg)
    plan.masks      one MaskSpec per sparsity level (index, mask id, sparsity)
    plan.rewinds    the canonical rewind labels ("0it", "100it", "1ep", ...)
    plan.tickets    every (mask, rewind) pair, mask-major
    plan.controls   the random controls: kind-major, then mask, then rewind
    plan.chains     iterative pruning: the rewind points, one chain of levels each (() for one-shot)
    plan.stability  the instability analyses: the dense network, then each chosen level, at every rewind point
    plan.expected   tickets + controls: what the report expects to find

The DAG passes ``plan.to_dict()`` between tasks (only the config travels; the rest is derived), so
this module is imported at DAG parse time: pure Python, no NumPy, Keras or TensorFlow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lottery.config import ConfigError, ExperimentConfig, Step


def check_data_size(cfg: ExperimentConfig, data_dir: str | Path) -> int | None:
    """The checks that need the training set's size (``batch_size``, and steps given in iterations
    against the training length), run as soon as the data set is written: by validate_config when it
    already is, else after preprocess, before any training. Returns the iterations per epoch (None: no
    data set yet). ``ConfigError`` names every field that fails."""
    try:  # the manifest's format: docs/data-format.md (lottery.data.manifest imports NumPy: not at parse time)
        images = int(json.loads((Path(data_dir) / "manifest.json").read_text())["splits"]["train"]["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not written (or damaged): preprocess writes it, and this runs again after it
    steps_per_epoch = images // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError("batch_size", cfg.batch_size, f"is larger than the training set ({images} images in {data_dir})")
    cfg.check_against_data(steps_per_epoch)
    return steps_per_epoch


def mask_id(sparsity: float) -> str:
    """The mask's name in files and logs: ``sp20.000`` is 20% of the prunable weights removed."""
    return f"sp{100 * sparsity:06.3f}"


@dataclass(frozen=True)
class MaskSpec:
    index: int
    mask_id: str
    sparsity: float


@dataclass(frozen=True)
class TicketSpec:
    """One late-reset retraining: a mask, a rewind point and, for a control, its kind."""

    mask_id: str
    rewind: str
    control: str | None = None

    @property
    def name(self) -> str:
        """The ticket's directory name: ``<mask id>__<rewind>[__<control>]``."""
        return f"{self.mask_id}__{self.rewind}" + (f"__{self.control}" if self.control else "")


def stability_name(mask_id: str | None, rewind: str) -> str:
    """``dense__1ep`` (the dense network) or ``sp89.263__1ep`` (a ticket's mask) at rewind point ``rewind``."""
    return f"{mask_id or 'dense'}__{rewind}"


@dataclass(frozen=True)
class StabilitySpec:
    """One instability analysis: the dense network (``mask_id`` None) or a ticket's mask, at a rewind point."""

    mask_id: str | None
    rewind: str

    @property
    def name(self) -> str:
        """Its directory name under ``stability/``: ``dense__1ep``, ``sp89.263__1ep``."""
        return stability_name(self.mask_id, self.rewind)

    @property
    def network(self) -> str:
        """``dense`` or the mask id."""
        return self.mask_id or "dense"

    @classmethod
    def from_name(cls, name: str) -> StabilitySpec | None:
        """The analysis a directory name spells (None: not one)."""
        network, sep, rewind = name.partition("__")
        if not sep or not network or not rewind or "__" in rewind:
            return None
        return cls(None if network == "dense" else network, rewind)


@dataclass(frozen=True)
class RunPlan:
    config: ExperimentConfig
    masks: tuple[MaskSpec, ...]
    rewinds: tuple[str, ...]
    tickets: tuple[TicketSpec, ...]
    controls: tuple[TicketSpec, ...]
    stability: tuple[StabilitySpec, ...] = ()

    @property
    def iterative(self) -> bool:
        """Iterative magnitude pruning: mask k is level k of a chain, one chain per rewind point."""
        return self.config.pruning_schedule == "iterative"

    @property
    def chains(self) -> tuple[str, ...]:
        return self.rewinds if self.iterative else ()

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> RunPlan:
        levels = cfg.levels()
        ids = [mask_id(s) for s in levels]
        if len(set(ids)) != len(ids):
            raise ConfigError("sparsities", list(levels), "two levels round to the same mask id (0.001% apart)")
        masks = tuple(MaskSpec(i, mid, s) for i, (mid, s) in enumerate(zip(ids, levels)))
        rewinds = tuple(cfg.rewind_labels())
        tickets = tuple(TicketSpec(m.mask_id, r) for m in masks for r in rewinds)
        control_ids = {mask_id(s) for s in cfg.control_levels()}
        controls = tuple(
            TicketSpec(m.mask_id, r, kind)
            for kind in (cfg.control_kinds if cfg.controls else ())
            for m in masks if m.mask_id in control_ids
            for r in rewinds
        )
        stable_levels = cfg.stability_levels()
        networks = ([None] if cfg.stability else []) + [m.mask_id for m in masks if m.sparsity in stable_levels]
        stability = tuple(StabilitySpec(network, r) for network in networks for r in rewinds)
        return cls(cfg, masks, rewinds, tickets, controls, stability)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunPlan:
        return cls.from_config(ExperimentConfig.from_dict(d["config"]))

    def to_dict(self) -> dict[str, Any]:
        """``{"config": ...}``: the config is the whole plan; the rest is derived from it."""
        return {"config": self.config.to_dict()}

    @property
    def expected(self) -> tuple[TicketSpec, ...]:
        return self.tickets + self.controls

    def mask(self, ref: int | str) -> MaskSpec:
        """A mask by index (``3``, ``"3"``) or id (``"sp48.800"``)."""
        if isinstance(ref, str) and ref.isdigit():
            ref = int(ref)
        if isinstance(ref, int):
            if not 0 <= ref < len(self.masks):
                raise ValueError(
                    f"mask index {ref} is out of range: this experiment has {len(self.masks)} masks (0..{len(self.masks) - 1})"
                )
            return self.masks[ref]
        for m in self.masks:
            if m.mask_id == ref:
                return m
        raise ValueError(f"unknown mask {ref!r}: this experiment's masks are {', '.join(m.mask_id for m in self.masks)}")

    def rewind(self, ref: int | str) -> str:
        """A rewind point by index (``1``, ``"1"``) or step (``"1ep0it"``): its canonical label."""
        labels = self.rewinds
        if isinstance(ref, str) and ref.isdigit():
            ref = int(ref)
        if isinstance(ref, int):
            if not 0 <= ref < len(labels):
                raise ValueError(
                    f"rewind index {ref} is out of range: this experiment has {len(labels)} rewind points ({', '.join(labels)})"
                )
            return labels[ref]
        try:
            label = str(Step.parse(ref))
        except ValueError:
            label = ref
        if label not in labels:
            raise ValueError(f"unknown rewind point {ref!r}: this experiment's rewind points are {', '.join(labels)}")
        return label

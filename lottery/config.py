"""Experiment configuration: typed, validated, hashable into an experiment id.

Style follows OpenLTH's hyperparameter dataclasses: every field has a default, steps are strings
such as ``4ep``, ``500it`` or ``2ep100it``, and the experiment id hashes only the fields that differ
from their defaults, so adding a new field with a default never changes an existing id. The
sparsity levels enter the id resolved (``levels()``); the controls, which add runs but never change a
ticket's result, do not enter it (``NOT_IN_ID``). ``lottery.plan.RunPlan`` derives the rest.

This module is imported by the DAG file at parse time: keep it free of TensorFlow, Keras and NumPy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

# The registry lives in lottery.models (which imports Keras); the names are repeated here so that
# config validation and the DAG's trigger form need no Keras import. tests/test_config.py keeps
# the two lists equal.
MODEL_NAMES = (
    "lenet_300_100",
    "conv2",
    "conv4",
    "conv6",
    "resnet20",
    "vgg16",
    "resnet50",
    "mobilenetv2",
)
OPTIMIZERS = ("sgd", "adam")
PRUNING_SCOPES = ("global", "layerwise")
AUGMENTATIONS = ("none", "crop_flip", "random_resized_crop")
# mixed_precision: false, "float16" (= true, loss scaling) or "bfloat16" (Ampere/Hopper GPUs, TPUs).
PRECISIONS = ("bfloat16", "float16")
PRECISION_POLICIES = {False: "float32", True: "mixed_float16", "float16": "mixed_float16",
                      "bfloat16": "mixed_bfloat16"}
CONTROLS = ("random_reinit", "random_prune")


class ConfigError(ValueError):
    """An invalid configuration value. The message always names the field and the value."""

    def __init__(self, field_name: str, value: Any, reason: str):
        self.field = field_name
        self.value = value
        super().__init__(f"config field '{field_name}' = {value!r}: {reason}")


_STEP_RE = re.compile(r"^\s*(?:(\d+)\s*ep)?\s*(?:(\d+)\s*it)?\s*$")


@dataclass(frozen=True, order=True)
class Step:
    """A point in training: ``ep`` whole epochs plus ``it`` iterations (OpenLTH's Step)."""

    ep: int = 0
    it: int = 0

    @classmethod
    def parse(cls, text: str | Step) -> Step:
        if isinstance(text, Step):
            return text
        if not isinstance(text, str):
            raise ValueError(f"a step is a string like '4ep', '500it' or '2ep100it', not {text!r}")
        match = _STEP_RE.match(text)
        if not text.strip() or match is None or match.group(0).strip() == "":
            raise ValueError(f"a step is a string like '4ep', '500it' or '2ep100it', not {text!r}")
        ep, it = match.groups()
        if ep is None and it is None:
            raise ValueError(f"a step is a string like '4ep', '500it' or '2ep100it', not {text!r}")
        return cls(int(ep or 0), int(it or 0))

    def iterations(self, steps_per_epoch: int) -> int:
        return self.ep * steps_per_epoch + self.it

    def __str__(self) -> str:
        if self.ep and self.it:
            return f"{self.ep}ep{self.it}it"
        if self.ep:
            return f"{self.ep}ep"
        return f"{self.it}it"


# Level k of the derived schedule removes 1 - (1 - prune_rate)**k of the prunable weights.
DEFAULT_NUM_LEVELS = 20
DEFAULT_PRUNE_RATE = 0.2
CONTROL_MATCH_TOLERANCE = 0.005  # a control sparsity picks the nearest level within 0.5 points
# Fields that add runs or only say how the levels are spelled: never part of the experiment id.
NOT_IN_ID = ("num_levels", "prune_rate", "controls", "control_kinds", "control_sparsities")


def derived_sparsities(num_levels: int, prune_rate: float) -> list[float]:
    """``sparsity_k = 1 - (1 - prune_rate)**k`` for k = 1..num_levels, rounded to 6 places."""
    return [round(1 - (1 - prune_rate) ** k, 6) for k in range(1, num_levels + 1)]


def default_sparsities() -> list[float]:
    """Twenty levels, 20% of the remaining weights removed per level: 1 - 0.8**k, k = 1..20."""
    return derived_sparsities(DEFAULT_NUM_LEVELS, DEFAULT_PRUNE_RATE)


# Three levels across the range (51.2%, 10.7% and 2.3% of the weights left), as in the LTH papers' control plots.
DEFAULT_CONTROL_SPARSITIES = tuple(default_sparsities()[k - 1] for k in (3, 10, 17))


def default_rewind_points() -> list[str]:
    return ["0it", "100it", "250it", "1ep", "2ep"]


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines an experiment: what determines its results, and which random
    controls it runs beside its tickets. Execution settings (threads, caching, paths) are not here: they do not change results and must not change the experiment id.

    The defaults are tuned for the bundled data set (LeNet-300-100 on Fashion-MNIST: Adam at
    1.2e-3 as in Frankle & Carbin, 6 epochs with a 10x decay after 4, about 89% val accuracy).
    Changing a default changes what existing ids mean: add a field instead."""

    model: str = "lenet_300_100"
    training_steps: str = "6ep"
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 0.0012
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    warmup_steps: str = "0it"
    lr_milestones: tuple[str, ...] = ("4ep",)
    lr_gamma: float = 0.1
    rewind_points: tuple[str, ...] = field(default_factory=lambda: tuple(default_rewind_points()))
    # Empty: derived, ``num_levels`` levels at ``prune_rate`` (see ``levels()``).
    sparsities: tuple[float, ...] = ()
    num_levels: int = DEFAULT_NUM_LEVELS
    prune_rate: float = DEFAULT_PRUNE_RATE
    pruning_scope: str = "global"
    output_layer_prune_factor: float = 0.5
    augmentation: str = "none"
    # false, "bfloat16" or "float16" (loss scaling); true = "float16" (ids of true/false unchanged)
    mixed_precision: bool | str = False
    jit_compile: bool = False
    seed: int = 0
    # The random controls: they add runs, never change a ticket's result (not in the id).
    controls: bool = True
    control_kinds: tuple[str, ...] = CONTROLS
    # Matched to the nearest level; empty: every level. The default follows a run's own levels.
    control_sparsities: tuple[float, ...] = DEFAULT_CONTROL_SPARSITIES

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> ExperimentConfig:
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(unknown[0], raw[unknown[0]], f"unknown field; known fields: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "mixed_precision" and isinstance(raw.get(f.name), str):
                values[f.name] = raw[f.name]  # checked in validate()
            elif f.name in raw:
                values[f.name] = _coerce(f.name, raw[f.name], _default_of(f))
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    def replace(self, **changes: Any) -> ExperimentConfig:
        return ExperimentConfig.from_dict({**self.to_dict(), **changes})

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        _one_of("model", self.model, MODEL_NAMES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("pruning_scope", self.pruning_scope, PRUNING_SCOPES)
        _one_of("augmentation", self.augmentation, AUGMENTATIONS)
        if not isinstance(self.mixed_precision, bool):
            _one_of("mixed_precision", self.mixed_precision, PRECISIONS)
        total = _step("training_steps", self.training_steps)
        if total == Step(0, 0):
            raise ConfigError("training_steps", self.training_steps, "must be longer than zero")
        _step("warmup_steps", self.warmup_steps)
        if self.batch_size < 1:
            raise ConfigError("batch_size", self.batch_size, "must be at least 1")
        if not self.lr > 0:
            raise ConfigError("lr", self.lr, "must be greater than 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError("momentum", self.momentum, "must be in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", self.weight_decay, "must be >= 0")
        if not 0 < self.lr_gamma <= 1:
            raise ConfigError("lr_gamma", self.lr_gamma, "must be in (0, 1]")
        if not 0 < self.output_layer_prune_factor <= 1:
            raise ConfigError("output_layer_prune_factor", self.output_layer_prune_factor, "must be in (0, 1]")
        if self.seed < 0:
            raise ConfigError("seed", self.seed, "must be >= 0")
        milestones = [_step("lr_milestones", m) for m in self.lr_milestones]
        _no_duplicates("lr_milestones", self.lr_milestones, milestones)
        for text, step in zip(self.lr_milestones, milestones):
            if _surely_after(step, total):
                raise ConfigError("lr_milestones", text, f"is past the end of training ({self.training_steps})")
        if not self.rewind_points:
            raise ConfigError("rewind_points", list(self.rewind_points), "needs at least one rewind point")
        rewinds = [_step("rewind_points", r) for r in self.rewind_points]
        _no_duplicates("rewind_points", self.rewind_points, rewinds)
        for text, step in zip(self.rewind_points, rewinds):
            if _surely_after(step, total) or step == total:
                raise ConfigError("rewind_points", text, f"is not before the end of training ({self.training_steps})")
        self._validate_levels()
        self._validate_controls()

    def _validate_levels(self) -> None:
        if self.num_levels < 1:
            raise ConfigError("num_levels", self.num_levels, "must be at least 1")
        if not 0 < self.prune_rate < 1:
            raise ConfigError("prune_rate", self.prune_rate, "must be in (0, 1)")
        for s in self.sparsities:
            if not 0 < s < 1:
                raise ConfigError("sparsities", s, "each sparsity (fraction of prunable weights removed) must be in (0, 1)")
        _no_duplicates("sparsities", self.sparsities, list(self.sparsities))
        levels = self.levels()
        if not all(0 < s < 1 for s in levels):  # rounded to 6 places: 0% or 100% removed
            raise ConfigError("num_levels", self.num_levels, f"at prune_rate {self.prune_rate:g} some levels round to 0 or 1")
        _no_duplicates("num_levels", levels, levels)

    def _validate_controls(self) -> None:
        for kind in self.control_kinds:
            _one_of("control_kinds", kind, CONTROLS)
        _no_duplicates("control_kinds", self.control_kinds, list(self.control_kinds))
        if self.controls and not self.control_kinds:
            raise ConfigError("control_kinds", [], "needs at least one kind when controls is true")
        for s in self.control_sparsities:
            if not 0 < s < 1:
                raise ConfigError("control_sparsities", s, "each control sparsity must be in (0, 1)")
        _no_duplicates("control_sparsities", self.control_sparsities, list(self.control_sparsities))
        self.control_levels()  # a wanted level that is not one of the experiment's: named error

    def check_against_data(self, steps_per_epoch: int) -> None:
        """Validation that needs the data set size: steps given in iterations vs epochs."""
        total = self.total_iterations(steps_per_epoch)
        if total < 1:
            raise ConfigError("training_steps", self.training_steps, f"is zero iterations at {steps_per_epoch} iterations per epoch")
        seen: dict[int, str] = {}
        for text in self.rewind_points:
            it = Step.parse(text).iterations(steps_per_epoch)
            if it >= total:
                raise ConfigError("rewind_points", text, f"is iteration {it}, not before the end of training (iteration {total})")
            if it in seen:
                raise ConfigError("rewind_points", text, f"is the same iteration ({it}) as {seen[it]!r}")
            seen[it] = text
        for text in self.lr_milestones:
            if Step.parse(text).iterations(steps_per_epoch) > total:
                raise ConfigError("lr_milestones", text, f"is past the end of training (iteration {total})")

    # ---- derived values -----------------------------------------------------------------------
    def total_iterations(self, steps_per_epoch: int) -> int:
        return Step.parse(self.training_steps).iterations(steps_per_epoch)

    def precision_policy(self) -> str:
        """The Keras dtype policy: "mixed_bfloat16", "mixed_float16" (true or "float16") or "float32"."""
        return PRECISION_POLICIES[self.mixed_precision]

    def rewind_labels(self) -> list[str]:
        """Canonical names of the rewind points (``2ep``, ``500it``), as used in directory names."""
        return [str(Step.parse(r)) for r in self.rewind_points]

    def levels(self) -> tuple[float, ...]:
        """The sparsity levels: ``sparsities`` when given, else ``num_levels`` derived at ``prune_rate``."""
        return tuple(self.sparsities) or tuple(derived_sparsities(self.num_levels, self.prune_rate))

    def control_levels(self) -> tuple[float, ...]:
        """The levels the controls run at: each wanted ``control_sparsities`` value mapped to the
        nearest level (empty list: every level; ``()`` when ``controls`` is false). A value further
        than ``CONTROL_MATCH_TOLERANCE`` from every level is an error, except in the default list,
        which follows a run's own levels."""
        if not self.controls:
            return ()
        levels = self.levels()
        if not self.control_sparsities:
            return levels
        strict = tuple(self.control_sparsities) != DEFAULT_CONTROL_SPARSITIES
        out: list[float] = []
        for wanted in self.control_sparsities:
            nearest = min(levels, key=lambda s: abs(s - wanted))
            if strict and abs(nearest - wanted) > CONTROL_MATCH_TOLERANCE:
                raise ConfigError(
                    "control_sparsities", wanted,
                    f"is not one of this experiment's sparsity levels ({', '.join(f'{s:g}' for s in levels)})",
                )
            if nearest not in out:
                out.append(nearest)
        return tuple(out)

    def id_fields(self) -> dict[str, Any]:
        """The fields that differ from their defaults, canonicalised. Steps are compared in their
        canonical spelling, so ``"1ep0it"`` and ``"1ep"`` are the same experiment. The shape is the
        one ids have always hashed: the resolved levels under ``sparsities``, none of ``NOT_IN_ID``
        (so an explicit list and the same levels derived from ``num_levels`` are one experiment)."""
        defaults = _id_shape(ExperimentConfig())
        return {k: v for k, v in _id_shape(self).items() if v != defaults[k]}


def experiment_id(cfg: ExperimentConfig, dataset_id: str) -> str:
    """``<model>-<12 hex>``: a hash of the non-default fields and the data set's id."""
    payload = json.dumps({"config": cfg.id_fields(), "dataset": dataset_id}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode()).hexdigest()[:12]
    return f"{cfg.model}-{digest}"


# ---- helpers ----------------------------------------------------------------------------------
def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Accept JSON-ish input (lists, ints for floats) but reject wrong kinds with the field name."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(name, value, "must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, value, "must be an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, value, "must be a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(name, value, "must be a string")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, value, "must be a list")
        if name in ("sparsities", "control_sparsities"):
            for v in value:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(name, v, "each sparsity must be a number")
            return tuple(float(v) for v in value)
        what = "a control kind" if name == "control_kinds" else "a step string like '2ep' or '500it'"
        for v in value:
            if not isinstance(v, str):
                raise ConfigError(name, v, f"each entry must be {what}")
        return tuple(value)
    raise AssertionError(f"no coercion for field {name}")  # pragma: no cover


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(name, value, f"must be one of {', '.join(allowed)}")


def _step(name: str, text: str) -> Step:
    try:
        return Step.parse(text)
    except ValueError as exc:
        raise ConfigError(name, text, str(exc)) from None


def _no_duplicates(name: str, texts, values) -> None:
    seen: dict[Any, Any] = {}
    for text, value in zip(texts, values):
        if value in seen:
            raise ConfigError(name, text, f"duplicate of {seen[value]!r}")
        seen[value] = text


def _surely_after(step: Step, total: Step) -> bool:
    """Whether ``step`` is after ``total`` for every epoch length (an epoch has >= 1 iteration)."""
    if step.ep > total.ep:  # the gap grows with the epoch length: smallest at one iteration per epoch
        return (step.ep - total.ep) + step.it > total.it
    if step.ep == total.ep:
        return step.it > total.it
    return False


def _id_shape(cfg: ExperimentConfig) -> dict[str, Any]:
    out = cfg.to_dict()
    for key in NOT_IN_ID:
        del out[key]
    out["sparsities"] = list(cfg.levels())
    if out["mixed_precision"] == "float16":  # the same experiment as `true`: same id
        out["mixed_precision"] = True
    return _canonical(out)


def _canonical(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for key in ("training_steps", "warmup_steps"):
        out[key] = str(Step.parse(out[key]))
    for key in ("rewind_points", "lr_milestones"):
        out[key] = [str(Step.parse(s)) for s in out[key]]
    out["sparsities"] = [round(float(s), 9) for s in out["sparsities"]]
    for key in ("lr", "momentum", "weight_decay", "lr_gamma", "output_layer_prune_factor"):
        out[key] = round(float(out[key]), 12)
    return out

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
from typing import Any, Callable

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
    """Invalid configuration values. The message names every field and its value; ``field`` and
    ``value`` are the first one's, ``errors`` lists them all as (field, value, reason)."""

    def __init__(self, field_name: str, value: Any, reason: str):
        self.field = field_name
        self.value = value
        self.errors: list[tuple[str, Any, str]] = [(field_name, value, reason)]
        super().__init__(_describe(field_name, value, reason))

    @property
    def fields(self) -> list[str]:
        return [name for name, _, _ in self.errors]

    @classmethod
    def combine(cls, errors: list[ConfigError]) -> ConfigError:
        """One error that lists every field of ``errors``, in order: a user fixes them all at once."""
        items = [item for error in errors for item in error.errors]
        combined = cls(*items[0])
        if len(items) > 1:
            combined.errors = items
            combined.args = (f"{len(items)} config errors: " + "; ".join(_describe(*item) for item in items),)
        return combined


def _describe(field_name: str, value: Any, reason: str) -> str:
    return f"config field '{field_name}' = {value!r}: {reason}"


class ConfigChecks:
    """Runs checks and keeps every ``ConfigError``. A check that reads a field which already failed
    is skipped: one wrong value gives one error, not a cascade of follow-on errors."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        self.failed: set[str] = set()

    def add(self, error: ConfigError) -> None:
        self.errors.append(error)
        self.failed.update(error.fields)

    def run(self, reads: tuple[str, ...], check: Callable[[], Any]) -> None:
        if self.failed.intersection(reads):
            return
        try:
            check()
        except ConfigError as exc:
            self.add(exc)

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigError.combine(self.errors)


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


# The default LR milestone before it followed the training length: an unset lr_milestones still
# means this milestone wherever it is within training (and hashes like it: experiment ids unchanged).
LEGACY_LR_MILESTONE = "4ep"

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
    # None (unset): at 4ep, or at two thirds of training when that is shorter (``milestone_iterations``).
    lr_milestones: tuple[str, ...] | None = None
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
        """A validated config; one ``ConfigError`` names every unknown field and invalid value."""
        raw = dict(raw or {})
        checks = ConfigChecks()
        known = sorted(f.name for f in fields(cls))
        for name in sorted(set(raw) - set(known)):
            checks.add(ConfigError(name, raw[name], f"unknown field; known fields: {', '.join(known)}"))
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in raw:  # a value of the wrong kind keeps the default: the checks reading it are skipped
                checks.run((f.name,), lambda f=f: values.__setitem__(f.name, _coerce(f.name, raw[f.name], _default_of(f))))
        cfg = cls(**values)
        cfg.run_checks(checks)
        checks.raise_if_any()
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
        """Every check; raises one ``ConfigError`` that names every invalid field."""
        self.run_checks(ConfigChecks()).raise_if_any()

    def run_checks(self, checks: ConfigChecks) -> ConfigChecks:
        for reads, check in self._field_checks() + self._cross_checks():
            checks.run(reads, check)
        return checks

    def _field_checks(self) -> list[tuple[tuple[str, ...], Callable[[], Any]]]:
        """The checks of one field each, with the field they read."""
        c = self
        return [
            (("model",), lambda: _one_of("model", c.model, MODEL_NAMES)),
            (("optimizer",), lambda: _one_of("optimizer", c.optimizer, OPTIMIZERS)),
            (("pruning_scope",), lambda: _one_of("pruning_scope", c.pruning_scope, PRUNING_SCOPES)),
            (("augmentation",), lambda: _one_of("augmentation", c.augmentation, AUGMENTATIONS)),
            (("mixed_precision",), lambda: isinstance(c.mixed_precision, bool) or _one_of("mixed_precision", c.mixed_precision, PRECISIONS)),
            (("training_steps",), c._check_training_steps),
            (("warmup_steps",), lambda: _step("warmup_steps", c.warmup_steps)),
            (("batch_size",), lambda: _require(c.batch_size >= 1, "batch_size", c.batch_size, "must be at least 1")),
            (("lr",), lambda: _require(c.lr > 0, "lr", c.lr, "must be greater than 0")),
            (("momentum",), lambda: _require(0 <= c.momentum < 1, "momentum", c.momentum, "must be in [0, 1)")),
            (("weight_decay",), lambda: _require(c.weight_decay >= 0, "weight_decay", c.weight_decay, "must be >= 0")),
            (("lr_gamma",), lambda: _require(0 < c.lr_gamma <= 1, "lr_gamma", c.lr_gamma, "must be in (0, 1]")),
            (("output_layer_prune_factor",), lambda: _require(0 < c.output_layer_prune_factor <= 1, "output_layer_prune_factor",
                                                              c.output_layer_prune_factor, "must be in (0, 1]")),
            (("seed",), lambda: _require(c.seed >= 0, "seed", c.seed, "must be >= 0")),
            (("lr_milestones",), lambda: _steps("lr_milestones", c.lr_milestones or ())),
            (("rewind_points",), lambda: _steps("rewind_points", c.rewind_points, at_least_one=True)),
            (("num_levels",), lambda: _require(c.num_levels >= 1, "num_levels", c.num_levels, "must be at least 1")),
            (("prune_rate",), lambda: _require(0 < c.prune_rate < 1, "prune_rate", c.prune_rate, "must be in (0, 1)")),
            (("sparsities",), lambda: _fractions("sparsities", c.sparsities,
                                                 "each sparsity (fraction of prunable weights removed) must be in (0, 1)")),
            (("control_kinds",), c._check_control_kinds),
            (("control_sparsities",), lambda: _fractions("control_sparsities", c.control_sparsities,
                                                         "each control sparsity must be in (0, 1)")),
        ]

    def _cross_checks(self) -> list[tuple[tuple[str, ...], Callable[[], Any]]]:
        """The checks of one field against others; skipped when one of the fields they read is invalid."""
        c = self
        levels = ("sparsities", "num_levels", "prune_rate")
        return [
            (("lr_milestones", "training_steps"), c._check_milestones_in_training),
            (("rewind_points", "training_steps"), c._check_rewinds_in_training),
            (levels, c._check_levels),
            (("control_kinds", "controls"), lambda: _require(not c.controls or bool(c.control_kinds), "control_kinds", [],
                                                             "needs at least one kind when controls is true")),
            (("control_sparsities", "controls", *levels), c.control_levels),  # a wanted level that is not a level: named error
        ]

    def _check_training_steps(self) -> None:
        if _step("training_steps", self.training_steps) == Step(0, 0):
            raise ConfigError("training_steps", self.training_steps, "must be longer than zero")

    def _check_milestones_in_training(self) -> None:
        total = Step.parse(self.training_steps)
        for text in self.lr_milestones or ():  # unset: placed within training (milestone_iterations)
            if _surely_after(Step.parse(text), total):
                raise ConfigError("lr_milestones", text, f"is past the end of training ({self.training_steps})")

    def _check_rewinds_in_training(self) -> None:
        total = Step.parse(self.training_steps)
        for text in self.rewind_points:
            step = Step.parse(text)
            if _surely_after(step, total) or step == total:
                raise ConfigError("rewind_points", text, f"is not before the end of training ({self.training_steps})")

    def _check_levels(self) -> None:
        levels = self.levels()
        if not all(0 < s < 1 for s in levels):  # rounded to 6 places: 0% or 100% removed
            raise ConfigError("num_levels", self.num_levels, f"at prune_rate {self.prune_rate:g} some levels round to 0 or 1")
        _no_duplicates("num_levels", levels, levels)

    def _check_control_kinds(self) -> None:
        for kind in self.control_kinds:
            _one_of("control_kinds", kind, CONTROLS)
        _no_duplicates("control_kinds", self.control_kinds, list(self.control_kinds))

    def check_against_data(self, steps_per_epoch: int) -> None:
        """Validation that needs the data set size (steps given in iterations vs epochs); one
        ``ConfigError`` names every field that fails."""
        total = self.total_iterations(steps_per_epoch)
        if total < 1:
            raise ConfigError("training_steps", self.training_steps, f"is zero iterations at {steps_per_epoch} iterations per epoch")
        checks = ConfigChecks()
        checks.run(("rewind_points",), lambda: self._check_rewind_iterations(steps_per_epoch, total))
        for text in self.lr_milestones or ():
            it = Step.parse(text).iterations(steps_per_epoch)
            checks.run((), lambda text=text, it=it: _require(it <= total, "lr_milestones", text,
                                                             f"is past the end of training (iteration {total})"))
        checks.raise_if_any()

    def _check_rewind_iterations(self, steps_per_epoch: int, total: int) -> None:
        seen: dict[int, str] = {}
        for text in self.rewind_points:
            it = Step.parse(text).iterations(steps_per_epoch)
            if it >= total:
                raise ConfigError("rewind_points", text, f"is iteration {it}, not before the end of training (iteration {total})")
            if it in seen:
                raise ConfigError("rewind_points", text, f"is the same iteration ({it}) as {seen[it]!r}")
            seen[it] = text

    # ---- derived values -----------------------------------------------------------------------
    def total_iterations(self, steps_per_epoch: int) -> int:
        return Step.parse(self.training_steps).iterations(steps_per_epoch)

    def milestone_iterations(self, steps_per_epoch: int) -> tuple[int, ...]:
        """The iterations at which the learning rate drops by ``lr_gamma``. Unset (the default):
        at 4ep, as before this default followed the training length (so every experiment that ran
        keeps its id and its meaning), or at two thirds of training when 4ep is past its end."""
        if self.lr_milestones is not None:
            return tuple(Step.parse(m).iterations(steps_per_epoch) for m in self.lr_milestones)
        total = self.total_iterations(steps_per_epoch)
        legacy = Step.parse(LEGACY_LR_MILESTONE).iterations(steps_per_epoch)
        return (legacy,) if legacy <= total else (max(1, 2 * total // 3),)

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
    if name == "mixed_precision" and isinstance(value, str):
        return value  # "bfloat16" / "float16": checked in validate()
    if default is None:  # lr_milestones: null (the default that follows training) or a list
        return None if value is None else _coerce(name, value, ())
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


def _require(ok: bool, name: str, value: Any, reason: str) -> None:
    if not ok:
        raise ConfigError(name, value, reason)


def _steps(name: str, texts: tuple[str, ...], *, at_least_one: bool = False) -> list[Step]:
    """Parse a list of step strings: each one valid, no two the same step."""
    if at_least_one and not texts:
        raise ConfigError(name, list(texts), "needs at least one rewind point")
    steps = [_step(name, text) for text in texts]
    _no_duplicates(name, texts, steps)
    return steps


def _fractions(name: str, values: tuple[float, ...], reason: str) -> None:
    for value in values:
        _require(0 < value < 1, name, value, reason)
    _no_duplicates(name, values, list(values))


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
    if out["lr_milestones"] is None:  # unset hashes as the old default: ids of existing experiments unchanged
        out["lr_milestones"] = [LEGACY_LR_MILESTONE]
    for key in ("rewind_points", "lr_milestones"):
        out[key] = [str(Step.parse(s)) for s in out[key]]
    out["sparsities"] = [round(float(s), 9) for s in out["sparsities"]]
    for key in ("lr", "momentum", "weight_decay", "lr_gamma", "output_layer_prune_factor"):
        out[key] = round(float(out[key]), 12)
    return out

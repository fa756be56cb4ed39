"""Experiment configuration: typed, validated, hashable into an experiment id.

Style follows OpenLTH's hyperparameters: every field has a default, steps are strings such as
``4ep``, ``500it`` or ``2ep100it`` (``lottery.steps``), and the experiment id hashes only the fields
that differ from their defaults (``lottery.ids``), so a new field with a default never changes an
existing id. Each field is declared once (pydantic v2): its type, range, default, title and help,
which the DAG's trigger form reads. ``lottery.plan.RunPlan`` derives the rest.

This module is imported by the DAG file at parse time: keep it free of TensorFlow, Keras and NumPy.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, Strict, ValidationError

from lottery.config_errors import ConfigError, errors_of, field_errors
from lottery.ids import NOT_IN_ID, UNSET_MILESTONES, experiment_id, id_fields  # noqa: F401 - public here
from lottery.steps import Length, Step, StepList, StepText, distinct

# The registry lives in lottery.models (which imports Keras); the names are repeated here so that
# config validation and the DAG's trigger form need no Keras import. tests/test_config.py keeps
# the two lists equal.
MODEL_NAMES = ("lenet_300_100", "conv2", "conv4", "conv6", "resnet20", "vgg16", "resnet50", "mobilenetv2")
OPTIMIZERS = ("sgd", "adam")
PRUNING_SCOPES = ("global", "layerwise")
AUGMENTATIONS = ("none", "crop_flip", "random_resized_crop")
PRECISION_POLICIES = {False: "float32", True: "mixed_float16", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
CONTROLS = ("random_reinit", "random_prune")
PRUNING_SCHEDULES = ("one_shot", "iterative")
REWIND_MODES = ("full", "weights", "learning_rate")
MAX_REPLICATES = 10
MAX_ITERATIVE_LEVELS = 100  # a chain trains its levels one after another


# Unset lr_milestones: one drop at 4ep, or at two thirds of training when training is shorter (``milestone_iterations``).
DEFAULT_LR_MILESTONE = UNSET_MILESTONES[0]
# Level k of the derived schedule removes 1 - (1 - prune_rate)**k of the prunable weights.
DEFAULT_NUM_LEVELS = 20
DEFAULT_PRUNE_RATE = 0.2
CONTROL_MATCH_TOLERANCE = 0.005  # a control (or stability) sparsity picks the nearest level within 0.5 points
# The instability analysis (lottery.stability): points on the line between the two copies (at least
# the endpoints and one between: lottery.interpolation.MIN_POINTS), and the paper's threshold of stability.
DEFAULT_STABILITY_POINTS, MIN_STABILITY_POINTS, MAX_STABILITY_POINTS = 11, 3, 101
DEFAULT_STABILITY_THRESHOLD = 2.0


def derived_sparsities(num_levels: int, prune_rate: float) -> list[float]:
    """``sparsity_k = 1 - (1 - prune_rate)**k`` for k = 1..num_levels, rounded to 6 places."""
    return [round(1 - (1 - prune_rate) ** k, 6) for k in range(1, num_levels + 1)]


def default_sparsities() -> list[float]:
    """Twenty levels, 20% of the remaining weights removed per level: 1 - 0.8**k, k = 1..20."""
    return derived_sparsities(DEFAULT_NUM_LEVELS, DEFAULT_PRUNE_RATE)


# Three levels across the range (51.2%, 10.7% and 2.3% of the weights left), as in the LTH papers' control plots.
DEFAULT_CONTROL_SPARSITIES = tuple(default_sparsities()[k - 1] for k in (3, 10, 17))


def _precision(value: Any) -> bool | str:
    if isinstance(value, bool) or value in ("bfloat16", "float16"):
        return value
    raise ValueError('must be false, "bfloat16", "float16" (loss scaling) or true (= "float16")')


Int, Float, Bool = Annotated[int, Strict()], Annotated[float, Strict()], Annotated[bool, Strict()]
Fraction = Annotated[float, Strict(), Field(gt=0, lt=1)]
Fractions, Kinds = Annotated[tuple[Fraction, ...], AfterValidator(distinct)], Annotated[tuple[Literal[CONTROLS], ...], AfterValidator(distinct)]


def _field(default: Any, title: str, section: str, help: str = "", **limits: Any) -> Any:  # noqa: A002 - pydantic's word
    return Field(default, title=title, description=help or None, json_schema_extra={"section": section}, **limits)


TRAIN, PRUNE, CTRL, STAB = "Model and training", "Pruning", "Controls", "Stability"


class ExperimentConfig(BaseModel):
    """Everything that defines an experiment: what determines its results, and which random
    controls it runs beside its tickets. Execution settings (threads, caching, paths) are not here:
    they do not change results and must not change the experiment id.

    The defaults are tuned for the bundled data set (LeNet-300-100 on Fashion-MNIST: Adam at
    1.2e-3 as in Frankle & Carbin, 6 epochs with a 10x decay after 4, about 89% val accuracy).
    Changing a default changes what existing ids mean: add a field instead."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Literal[MODEL_NAMES] = _field("lenet_300_100", "Model", TRAIN)
    training_steps: Length = _field("6ep", "Training length", TRAIN, "A step string: `8ep`, `4000it` or `2ep100it` (epochs and/or iterations).")
    batch_size: Int = _field(128, "Batch size", TRAIN, ge=1, le=65536)
    optimizer: Literal[OPTIMIZERS] = _field("adam", "Optimizer", TRAIN)
    lr: Float = _field(0.0012, "Learning rate", TRAIN, gt=0, le=100)
    momentum: Float = _field(0.9, "Momentum (SGD)", TRAIN, ge=0, lt=1)
    nesterov: Bool = _field(False, "Nesterov momentum (SGD)", TRAIN)
    weight_decay: Float = _field(0.0, "Weight decay", TRAIN, ge=0)
    warmup_steps: StepText = _field("0it", "Linear warm-up", TRAIN, "A step string; `0it` = no warm-up.")
    lr_milestones: StepList | None = _field(None, "LR milestones", TRAIN, "Steps at which the learning rate is multiplied by "
                                         f"lr_gamma (one per line). Unset (the default): at {DEFAULT_LR_MILESTONE}, or at two thirds "
                                         "of training when training is shorter. No decay: lr_gamma 1 (or [] in the JSON conf).")
    lr_gamma: Float = _field(0.1, "LR decay factor", TRAIN, gt=0, le=1)
    augmentation: Literal[AUGMENTATIONS] = _field("none", "Augmentation", TRAIN)
    mixed_precision: Annotated[bool | str, PlainValidator(_precision, json_schema_input_type=bool | Literal["bfloat16", "float16"])] = _field(
        False, "Mixed precision", TRAIN, 'false (float32), "bfloat16" (recommended on Ampere/Hopper GPUs and TPUs) or '
        '"float16" (with loss scaling); true means "float16"')
    jit_compile: Bool = _field(False, "XLA jit_compile", TRAIN)
    seed: Int = _field(0, "Seed", TRAIN, ge=0, le=2**31 - 1)
    replicates: Int = _field(1, "Replicates", TRAIN, "Independent experiments with seeds seed, seed+1, ...: each its own dense "
                             "network, masks and tickets (and experiment id); the report shows mean ± std over them.",
                             ge=1, le=MAX_REPLICATES)
    rewind_points: StepList = _field(("0it", "100it", "250it", "1ep", "2ep"), "Rewind points", PRUNE, "Where the pruned network "
                                  "is reset to (late resetting), one step string per line; `0it` is the original lottery ticket. "
                                  "Must be before the end of training.", min_length=1)
    sparsities: Fractions = _field((), "Sparsities (explicit)", PRUNE, "Fractions of prunable weights removed, e.g. [0.5, 0.9, "
                                   "0.99]. Empty (the default): num_levels levels from prune_rate. When given, num_levels and "
                                   "prune_rate are ignored.")
    num_levels: Int = _field(DEFAULT_NUM_LEVELS, "Number of sparsity levels", PRUNE, "Used when `sparsities` is empty: level k "
                             "removes 1 - (1 - prune_rate)^k of the weights.", ge=1, le=100)
    prune_rate: Fraction = _field(DEFAULT_PRUNE_RATE, "Pruning rate per level", PRUNE, "Used when `sparsities` is empty (0.2: 20% "
                                  "of the remaining weights per level).")
    pruning_schedule: Literal[PRUNING_SCHEDULES] = _field("one_shot", "Pruning schedule", PRUNE, "one_shot: every level "
                                                           "pruned from the dense network's final weights. iterative (IMP): per "
                                                           "rewind point a chain of levels, each pruned from the previous level's "
                                                           "trained weights.")
    rewind_mode: Literal[REWIND_MODES] = _field("full", "Rewind mode", PRUNE, "full: weights, optimizer state and schedule "
                                                "position of the rewind point. weights (OpenLTH): the weights, a fresh optimizer at "
                                                "the rewind point's learning rate. learning_rate (Renda et al.): the final trained "
                                                "weights, a fresh optimizer, the schedule replayed from the rewind point.")
    pruning_scope: Literal[PRUNING_SCOPES] = _field("global", "Pruning scope", PRUNE)
    output_layer_prune_factor: Float = _field(0.5, "Output layer prune factor", PRUNE, "The output layer is pruned at this "
                                              "fraction of the rate.", gt=0, le=1)
    controls: Bool = _field(True, "Run the random baselines", CTRL)
    control_kinds: Kinds = _field(CONTROLS, "Control kinds", CTRL, "random_reinit: the ticket's mask, fresh random weights; "
                                  "random_prune: the rewound weights, a random mask with the same layer-wise sparsity.")
    control_sparsities: Fractions = _field(DEFAULT_CONTROL_SPARSITIES, "Control sparsities", CTRL, "The levels the controls run "
                                           "at (each matched to the nearest sparsity level within 0.005); empty: every level. "
                                           "Every rewind point is run.")
    stability: Bool = _field(True, "Run the instability analysis", STAB, "Two copies of a network trained from each rewind "
                             "point with different data orders, and the error on the line between them (linear mode "
                             "connectivity): the dense network, and the tickets at stability_sparsities. Two trainings "
                             "from the rewind point to the end per network and rewind point.")
    stability_sparsities: Fractions = _field((), "Stability: ticket sparsities", STAB, "The ticket levels analysed beside the "
                                             "dense network (each must be a sparsity level within 0.005), e.g. [0.79, 0.95]: "
                                             "about 20% and 5% of the weights left at the default levels. Empty (the "
                                             "default): the dense network only.")
    stability_points: Int = _field(DEFAULT_STABILITY_POINTS, "Stability: points on the line", STAB, "Networks evaluated on "
                                   "the line between the two copies, the copies included.", ge=MIN_STABILITY_POINTS,
                                   le=MAX_STABILITY_POINTS)
    stability_threshold: Float = _field(DEFAULT_STABILITY_THRESHOLD, "Stability: threshold (percentage points)", STAB,
                                        "A network is stable at a rewind point when its instability (the error barrier "
                                        "on the line, in percentage points) is below this; the report names the earliest "
                                        "such rewind point.", gt=0, le=100)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> ExperimentConfig:
        """A validated config; one ``ConfigError`` names every unknown field and invalid value."""
        raw = dict(raw or {})
        try:
            return cls.model_validate(raw)._checked()
        except ValidationError as exc:
            errors = field_errors(exc, sorted(cls.model_fields))
        failed = {error.field for error in errors}  # they keep their defaults: the checks reading them are skipped
        valid = cls.model_validate({k: v for k, v in raw.items() if k not in failed})
        raise ConfigError.combine(errors + valid._cross_errors(failed))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_dump().items()}

    def replace(self, **changes: Any) -> ExperimentConfig:
        return ExperimentConfig.from_dict({**self.to_dict(), **changes})

    # ---- the checks of one field against others ------------------------------------------------
    def _checked(self) -> ExperimentConfig:
        errors = self._cross_errors(set())
        if errors:
            raise ConfigError.combine(errors)
        return self

    def _cross_errors(self, failed: set[str]) -> list[ConfigError]:
        """Skipped when a field they read is invalid: one wrong value gives one error, not a cascade."""
        levels = ("sparsities", "num_levels", "prune_rate")
        checks = [(("lr_milestones", "training_steps"), self._check_milestones),
                  (("rewind_points", "training_steps"), self._check_rewinds), (levels, self._check_levels),
                  (("control_kinds", "controls"), self._check_control_kinds), (("control_sparsities", "controls", *levels), self.control_levels),
                  (("pruning_schedule", *levels), self._check_iterative), (("rewind_mode", "rewind_points"), self._check_rewind_mode),
                  (("seed", "replicates"), self._check_replicate_seeds),
                  (("stability_sparsities", "stability", *levels), self.stability_levels)]
        return [error for reads, check in checks if not failed.intersection(reads) for error in errors_of(check)]

    def _check_milestones(self) -> None:
        total = Step.parse(self.training_steps)
        for text in self.lr_milestones or ():  # unset: placed within training (milestone_iterations)
            if Step.parse(text).surely_after(total):
                raise ConfigError("lr_milestones", text, f"is past the end of training ({self.training_steps})")

    def _check_rewinds(self) -> None:
        total = Step.parse(self.training_steps)
        for text in self.rewind_points:
            if Step.parse(text).surely_after(total) or Step.parse(text) == total:
                raise ConfigError("rewind_points", text, f"is not before the end of training ({self.training_steps})")

    def _check_levels(self) -> None:
        levels = self.levels()
        if not all(0 < s < 1 for s in levels) or len(set(levels)) < len(levels):  # rounded to 6 places
            raise ConfigError("num_levels", self.num_levels, f"at prune_rate {self.prune_rate:g} some levels round to 0, 1 or each other")

    def _check_iterative(self) -> None:
        if self.pruning_schedule != "iterative":
            return
        levels = self.levels()
        field = "sparsities" if self.sparsities else "num_levels"
        if len(levels) > MAX_ITERATIVE_LEVELS:
            raise ConfigError(field, len(levels), f"is more than {MAX_ITERATIVE_LEVELS} levels: an iterative chain trains them one after another")
        if list(levels) != sorted(levels):
            raise ConfigError("sparsities", list(levels), "must increase for pruning_schedule iterative (each level prunes the one before)")

    def _check_rewind_mode(self) -> None:
        for text in self.rewind_points:
            if self.rewind_mode == "learning_rate" and Step.parse(text) == Step(0, 0):
                raise ConfigError("rewind_points", text, "is the start of training: rewind_mode learning_rate replays the "
                                  "schedule from a rewind point, and from 0 there is nothing to replay (use rewind_mode full)")

    def _check_replicate_seeds(self) -> None:
        if self.seed + self.replicates - 1 > 2**31 - 1:
            raise ConfigError("seed", self.seed, f"+ {self.replicates - 1} (the last replicate's seed) is above 2**31 - 1")

    def _check_control_kinds(self) -> None:
        if self.controls and not self.control_kinds:
            raise ConfigError("control_kinds", [], "needs at least one kind when controls is true")

    def check_against_data(self, steps_per_epoch: int) -> None:
        """The checks that need the data set's size (steps in iterations vs epochs); one ``ConfigError``
        names every field that fails."""
        total = self.total_iterations(steps_per_epoch)
        if total < 1:
            raise ConfigError("training_steps", self.training_steps, f"is zero iterations at {steps_per_epoch} iterations per epoch")
        where = f"the end of training (iteration {total} at {steps_per_epoch} iterations per epoch)"
        seen: dict[int, str] = {}
        errors = []
        for text in self.rewind_points:
            it = Step.parse(text).iterations(steps_per_epoch)
            if it >= total or it in seen:
                reason = f"is iteration {it}, not before {where}" if it >= total else f"is the same iteration ({it}) as {seen[it]!r}"
                errors.append(ConfigError("rewind_points", text, reason))
                break
            seen[it] = text
        errors += [ConfigError("lr_milestones", text, f"is past {where}") for text in self.lr_milestones or ()
                   if Step.parse(text).iterations(steps_per_epoch) > total]
        if errors:
            raise ConfigError.combine(errors)

    # ---- derived values -----------------------------------------------------------------------
    def total_iterations(self, steps_per_epoch: int) -> int:
        return Step.parse(self.training_steps).iterations(steps_per_epoch)

    def milestone_iterations(self, steps_per_epoch: int) -> tuple[int, ...]:
        """The iterations at which the learning rate drops by ``lr_gamma``. Unset (the default): at
        ``DEFAULT_LR_MILESTONE``, or at two thirds of training when that is past its end."""
        if self.lr_milestones is not None:
            return tuple(Step.parse(m).iterations(steps_per_epoch) for m in self.lr_milestones)
        total = self.total_iterations(steps_per_epoch)
        default = Step.parse(DEFAULT_LR_MILESTONE).iterations(steps_per_epoch)
        return (default,) if default <= total else (max(1, 2 * total // 3),)

    def precision_policy(self) -> str:
        """The Keras dtype policy: "mixed_bfloat16", "mixed_float16" (true or "float16") or "float32"."""
        return PRECISION_POLICIES[self.mixed_precision]

    def rewind_labels(self) -> list[str]:
        """Canonical names of the rewind points (``2ep``, ``500it``), as used in directory names."""
        return [str(Step.parse(r)) for r in self.rewind_points]

    def levels(self) -> tuple[float, ...]:
        """The sparsity levels: ``sparsities`` when given, else ``num_levels`` derived at ``prune_rate``."""
        return tuple(self.sparsities) or tuple(derived_sparsities(self.num_levels, self.prune_rate))

    def level_rates(self) -> tuple[float, ...]:
        """Iterative pruning: the share of the remaining weights each level removes: ``prune_rate``
        when the levels are derived from it, else ``1 - (1 - s_k) / (1 - s_{k-1})`` (``s_0`` = 0)."""
        if not self.sparsities:
            return (self.prune_rate,) * self.num_levels
        before = (0.0, *self.sparsities[:-1])
        return tuple(1 - (1 - s) / (1 - b) for b, s in zip(before, self.sparsities))

    def control_levels(self) -> tuple[float, ...]:
        """The levels the controls run at: each wanted ``control_sparsities`` value mapped to the
        nearest level (empty list: every level; ``()`` when ``controls`` is false). A value further
        than ``CONTROL_MATCH_TOLERANCE`` from every level is an error, except in the default list,
        which follows a run's own levels (the trigger form always sends it)."""
        levels = self.levels()
        if not self.controls or not self.control_sparsities:
            return levels if self.controls else ()
        strict = tuple(self.control_sparsities) != DEFAULT_CONTROL_SPARSITIES
        out: list[float] = []
        for wanted in self.control_sparsities:
            nearest = min(levels, key=lambda s: abs(s - wanted))
            if strict and abs(nearest - wanted) > CONTROL_MATCH_TOLERANCE:
                raise ConfigError("control_sparsities", wanted,
                                  f"is not one of this experiment's sparsity levels ({', '.join(f'{s:g}' for s in levels)})")
            out += [] if nearest in out else [nearest]
        return tuple(out)

    def stability_levels(self) -> tuple[float, ...]:
        """The ticket levels of the instability analysis: each ``stability_sparsities`` value mapped
        to the nearest level (``()`` when the list is empty, the dense network only, or when
        ``stability`` is false). A value further than ``CONTROL_MATCH_TOLERANCE`` from every level
        is an error naming the field."""
        if not self.stability:
            return ()
        levels, out = self.levels(), []
        for wanted in self.stability_sparsities:
            nearest = min(levels, key=lambda s: abs(s - wanted))
            if abs(nearest - wanted) > CONTROL_MATCH_TOLERANCE:
                raise ConfigError("stability_sparsities", wanted,
                                  f"is not one of this experiment's sparsity levels ({', '.join(f'{s:g}' for s in levels)})")
            out += [] if nearest in out else [nearest]
        return tuple(out)

    def replicate(self, index: int) -> ExperimentConfig:
        """Replicate ``index`` (0-based) of this experiment: seed ``seed + index``, one replicate. An
        experiment of its own, with its own id; replicate 0 is the experiment itself."""
        if not 0 <= index < self.replicates:
            raise ValueError(f"replicate {index} is out of range: this experiment has {self.replicates} (0..{self.replicates - 1})")
        return self.model_copy(update={"seed": self.seed + index, "replicates": 1})

    def replicate_configs(self) -> list[ExperimentConfig]:
        return [self.replicate(i) for i in range(self.replicates)]

    def id_fields(self) -> dict[str, Any]:
        """The fields the experiment id hashes: those that differ from their defaults, canonicalised (``lottery.ids``)."""
        return id_fields(self)

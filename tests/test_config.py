"""The experiment config: parsing, validation (every field names itself), experiment ids."""

import hashlib
import json

import pytest

from lottery.config import (
    MODEL_NAMES,
    ConfigError,
    ExperimentConfig,
    Step,
    default_sparsities,
    derived_sparsities,
    experiment_id,
)


@pytest.mark.parametrize(
    "text, step",
    [("4ep", Step(4, 0)), ("500it", Step(0, 500)), ("2ep100it", Step(2, 100)), ("0it", Step(0, 0)), ("0ep", Step(0, 0))],
)
def test_step_parsing(text, step):
    assert Step.parse(text) == step
    assert Step.parse(str(step)) == step


@pytest.mark.parametrize("text", ["", "ep", "4", "4 epochs", "-1ep", "1.5ep", "it2ep"])
def test_bad_steps_are_rejected(text):
    with pytest.raises(ValueError):
        Step.parse(text)


def test_step_iterations():
    assert Step.parse("2ep100it").iterations(468) == 1036


def test_defaults_are_valid_and_follow_the_papers():
    cfg = ExperimentConfig.from_dict({})
    assert len(cfg.rewind_points) == 5 and len(cfg.levels()) == 20 and cfg.sparsities == ()
    assert cfg.levels()[0] == pytest.approx(0.2) and cfg.levels()[-1] == pytest.approx(1 - 0.8**20)
    assert cfg.pruning_scope == "global" and cfg.output_layer_prune_factor == 0.5
    assert list(cfg.levels()) == default_sparsities() == derived_sparsities(20, 0.2)
    # the controls: both kinds at levels 3, 10 and 17 (51.2%, 10.7% and 2.3% of the weights left)
    assert cfg.controls and cfg.control_kinds == ("random_reinit", "random_prune")
    assert cfg.control_levels() == (0.488, 0.892626, 0.977482) == tuple(cfg.levels()[k - 1] for k in (3, 10, 17))


INVALID = [
    ({"no_such_field": 1}, "no_such_field"),
    ({"model": "resnet9000"}, "model"),
    ({"training_steps": "ten epochs"}, "training_steps"),
    ({"training_steps": "0ep"}, "training_steps"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": "128"}, "batch_size"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"lr": 0}, "lr"),
    ({"lr": "fast"}, "lr"),
    ({"momentum": 1.5}, "momentum"),
    ({"nesterov": "yes"}, "nesterov"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"warmup_steps": "soon"}, "warmup_steps"),
    ({"lr_milestones": ["20ep"]}, "lr_milestones"),
    ({"lr_milestones": ["2ep", "2ep"]}, "lr_milestones"),
    ({"lr_gamma": 2}, "lr_gamma"),
    ({"rewind_points": ["9ep"]}, "rewind_points"),
    ({"rewind_points": ["8ep"]}, "rewind_points"),
    ({"rewind_points": ["1ep", "1ep0it"]}, "rewind_points"),
    ({"rewind_points": []}, "rewind_points"),
    ({"rewind_points": [3]}, "rewind_points"),
    ({"sparsities": [0.5, 1.0]}, "sparsities"),
    ({"sparsities": [0.0]}, "sparsities"),
    ({"sparsities": [0.5, 0.5]}, "sparsities"),
    ({"sparsities": ["half"]}, "sparsities"),
    ({"num_levels": 0}, "num_levels"),
    ({"num_levels": 200, "prune_rate": 0.5}, "num_levels"),  # deep levels round to 1.0
    ({"prune_rate": 1.0}, "prune_rate"),
    ({"controls": "yes"}, "controls"),
    ({"control_kinds": ["random_everything"]}, "control_kinds"),
    ({"control_kinds": []}, "control_kinds"),
    ({"control_sparsities": [0.3]}, "control_sparsities"),  # not a level (strict: not the default list)
    ({"control_sparsities": [1.5]}, "control_sparsities"),
    ({"pruning_scope": "random"}, "pruning_scope"),
    ({"output_layer_prune_factor": 0}, "output_layer_prune_factor"),
    ({"augmentation": "mixup"}, "augmentation"),
    ({"mixed_precision": 1}, "mixed_precision"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"jit_compile": "true"}, "jit_compile"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**31 - 1, "replicates": 2}, "seed"),  # the last replicate's seed
    ({"replicates": 0}, "replicates"),
    ({"replicates": 11}, "replicates"),
    ({"pruning_schedule": "gradual"}, "pruning_schedule"),
    ({"pruning_schedule": "iterative", "sparsities": [0.5, 0.2]}, "sparsities"),  # a chain's levels increase
    ({"pruning_schedule": "iterative", "sparsities": [k / 1000 for k in range(1, 102)]}, "sparsities"),  # > 100 levels
    ({"rewind_mode": "optimizer"}, "rewind_mode"),
    ({"rewind_mode": "learning_rate"}, "rewind_points"),  # 0it is among the default points: nothing to replay
    ({"stability": "yes"}, "stability"),
    ({"stability_sparsities": [0.3]}, "stability_sparsities"),  # not one of the levels
    ({"stability_sparsities": [0.5, 0.9], "sparsities": [0.5, 0.8]}, "stability_sparsities"),
    ({"stability_sparsities": [1.5]}, "stability_sparsities"),
    ({"stability_sparsities": [0.8, 0.8]}, "stability_sparsities"),
    ({"stability_points": 2}, "stability_points"),  # the two copies and nothing between
    ({"stability_points": 102}, "stability_points"),
    ({"stability_points": 11.0}, "stability_points"),
    ({"stability_threshold": 0}, "stability_threshold"),
    ({"stability_threshold": "2"}, "stability_threshold"),
]


@pytest.mark.parametrize("conf, field", INVALID, ids=[f for _, f in INVALID])
def test_every_invalid_field_is_rejected_with_its_name(conf, field):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict(conf)
    assert info.value.field == field
    assert f"'{field}'" in str(info.value)


def test_every_field_is_covered_by_an_invalid_case():
    covered = {field for _, field in INVALID}
    assert set(ExperimentConfig.model_fields) <= covered


def test_checks_that_need_the_epoch_length():
    cfg = ExperimentConfig.from_dict({"training_steps": "2ep", "lr_milestones": [], "rewind_points": ["0it", "900it"]})
    cfg.check_against_data(steps_per_epoch=500)  # 900 < 1000
    with pytest.raises(ConfigError, match="rewind_points"):
        cfg.check_against_data(steps_per_epoch=400)  # 900 >= 800
    same = ExperimentConfig.from_dict({"training_steps": "2ep", "lr_milestones": [], "rewind_points": ["1ep", "100it"]})
    with pytest.raises(ConfigError, match="same iteration"):
        same.check_against_data(steps_per_epoch=100)


def test_experiment_id_ignores_defaults_and_spelling_but_not_values():
    base = ExperimentConfig.from_dict({})
    spelled = ExperimentConfig.from_dict({"lr": 0.0012, "training_steps": "6ep0it", "rewind_points": ["0ep", "100it", "250it", "1ep", "2ep"]})
    assert experiment_id(base, "data1") == experiment_id(spelled, "data1")
    assert experiment_id(base, "data1") != experiment_id(base, "data2")
    assert experiment_id(base, "data1") != experiment_id(base.replace(seed=1), "data1")
    assert experiment_id(base, "data1") != experiment_id(base.replace(lr=0.001), "data1")
    assert experiment_id(base, "data1").startswith("lenet_300_100-")


def test_adding_a_field_with_a_default_keeps_existing_ids():
    """Ids hash only non-default fields: a config made before a new field existed keeps its id."""
    cfg = ExperimentConfig.from_dict({"model": "conv2", "seed": 3})
    assert cfg.id_fields() == {"model": "conv2", "seed": 3}
    # The id of a frozen, known config: changing it orphans every existing work directory.
    assert experiment_id(cfg, "abc") == "conv2-" + __import__("hashlib").sha256(
        b'{"config":{"model":"conv2","seed":3},"dataset":"abc"}'
    ).hexdigest()[:12]


def test_model_names_match_the_registry():
    from lottery.models import MODELS

    assert set(MODELS) == set(MODEL_NAMES)


# ---- experiment ids: pinned (computed with the code before the run plan, commit 43c644e) --------
FASHION_MNIST_ID = "bb5f6bf2d867"
PINNED_IDS = [
    ({}, "lenet_300_100-c30a9b1461f8"),
    ({"sparsities": [0.5, 0.9, 0.99]}, "lenet_300_100-3b4c9144eb69"),
    # what the DAG passed for num_levels=10: the derived levels as an explicit list
    ({"sparsities": derived_sparsities(10, 0.2)}, "lenet_300_100-d5206a76762c"),
    ({"num_levels": 10}, "lenet_300_100-d5206a76762c"),
    ({"num_levels": 5, "prune_rate": 0.3}, "lenet_300_100-87592278637f"),
    ({"lr": 0.01}, "lenet_300_100-6f1e1650fa7a"),
    # an old config.json: the 20 default levels spelled out; the controls never change the id
    ({"sparsities": default_sparsities()}, "lenet_300_100-c30a9b1461f8"),
    ({"controls": False, "control_kinds": ["random_prune"], "control_sparsities": []}, "lenet_300_100-c30a9b1461f8"),
    # the instability analysis only adds runs beside the tickets: never in the id
    ({"stability": False, "stability_sparsities": [0.79, 0.95], "stability_points": 21, "stability_threshold": 1.0},
     "lenet_300_100-c30a9b1461f8"),
    # mixed_precision: true (pinned before "bfloat16" existed) and "float16" are one experiment
    ({"mixed_precision": True}, "lenet_300_100-570092597f34"),
    ({"mixed_precision": "float16"}, "lenet_300_100-570092597f34"),
    ({"mixed_precision": False}, "lenet_300_100-c30a9b1461f8"),
    ({"mixed_precision": "bfloat16"}, "lenet_300_100-642a4048d5f2"),
]


@pytest.mark.parametrize("value, policy", [(False, "float32"), (True, "mixed_float16"),
                                           ("float16", "mixed_float16"), ("bfloat16", "mixed_bfloat16")])
def test_precision_policy(value, policy):
    assert ExperimentConfig.from_dict({"mixed_precision": value}).precision_policy() == policy


@pytest.mark.parametrize("conf, wanted", PINNED_IDS)
def test_experiment_ids_do_not_change(conf, wanted):
    assert experiment_id(ExperimentConfig.from_dict(conf), FASHION_MNIST_ID) == wanted


def test_id_fields_keep_the_old_shape():
    assert ExperimentConfig().id_fields() == {}
    assert ExperimentConfig.from_dict({"num_levels": 2, "controls": False}).id_fields() == {"sparsities": [0.2, 0.36]}


def test_control_levels():
    ten = ExperimentConfig.from_dict({"num_levels": 10})
    assert ten.control_levels() == (0.488, 0.892626)  # the default list follows the run's levels
    custom = ExperimentConfig.from_dict({"sparsities": [0.5, 0.9, 0.99], "control_sparsities": [0.899, 0.5]})
    assert custom.control_levels() == (0.9, 0.5)
    assert custom.replace(control_sparsities=[]).control_levels() == (0.5, 0.9, 0.99)
    assert custom.replace(controls=False).control_levels() == ()
    with pytest.raises(ConfigError, match="control_sparsities"):
        custom.replace(control_sparsities=[0.8])


def test_stability_levels():
    """Dense only by default; each wanted ticket sparsity is matched to a level within 0.005 (the
    suggested [0.79, 0.95]: levels 7 and 13 of the default twenty, 21.0% and 5.5% of the weights left)."""
    assert ExperimentConfig().stability and ExperimentConfig().stability_levels() == ()
    cfg = ExperimentConfig.from_dict({"stability_sparsities": [0.79, 0.95]})
    assert cfg.stability_levels() == (0.790285, 0.945024) == (cfg.levels()[6], cfg.levels()[12])
    assert cfg.replace(stability=False).stability_levels() == ()
    custom = ExperimentConfig.from_dict({"sparsities": [0.5, 0.9, 0.99], "stability_sparsities": [0.99, 0.896]})
    assert custom.stability_levels() == (0.99, 0.9)
    with pytest.raises(ConfigError, match="'stability_sparsities' = 0.8: is not one of this experiment's sparsity levels"):
        custom.replace(stability_sparsities=[0.8])


def test_stability_points_agree_with_the_engines():
    from lottery.config import DEFAULT_STABILITY_POINTS, MIN_STABILITY_POINTS
    from lottery.interpolation import MIN_POINTS
    from lottery.stability import DEFAULT_POINTS

    assert (MIN_STABILITY_POINTS, DEFAULT_STABILITY_POINTS) == (MIN_POINTS, DEFAULT_POINTS) == (3, 11)
    assert ExperimentConfig().stability_points == 11 and ExperimentConfig().stability_threshold == 2.0


# ---- the run plan -------------------------------------------------------------------------------
def test_run_plan_lists_tickets_and_controls_in_order():
    from lottery.plan import MaskSpec, RunPlan, TicketSpec, mask_id

    plan = RunPlan.from_config(ExperimentConfig())
    assert len(plan.masks) == 20 and plan.masks[2] == MaskSpec(2, "sp48.800", 0.488)
    assert plan.rewinds == ("0it", "100it", "250it", "1ep", "2ep")
    assert len(plan.tickets) == 100 and plan.tickets[:2] == (TicketSpec("sp20.000", "0it"), TicketSpec("sp20.000", "100it"))
    assert len(plan.controls) == 2 * 3 * 5 and len(plan.expected) == 130
    assert plan.controls[0] == TicketSpec("sp48.800", "0it", "random_reinit")
    assert plan.controls[-1].name == "sp97.748__2ep__random_prune"
    assert [c.mask_id for c in plan.controls[:15:5]] == ["sp48.800", "sp89.263", "sp97.748"]
    assert mask_id(0.2) == "sp20.000" and TicketSpec("sp20.000", "1ep").name == "sp20.000__1ep"
    assert RunPlan.from_dict(plan.to_dict()) == plan
    assert RunPlan.from_config(ExperimentConfig(controls=False)).controls == ()


def test_run_plan_lists_the_instability_analyses_dense_first():
    from lottery.plan import RunPlan, StabilitySpec

    plan = RunPlan.from_config(ExperimentConfig.from_dict({"sparsities": [0.5, 0.9], "rewind_points": ["0it", "1ep"],
                                                           "stability_sparsities": [0.9, 0.5]}))
    assert plan.stability == tuple(StabilitySpec(m, r) for m in (None, "sp50.000", "sp90.000") for r in ("0it", "1ep"))
    assert [s.name for s in plan.stability[:3]] == ["dense__0it", "dense__1ep", "sp50.000__0it"]
    assert RunPlan.from_config(ExperimentConfig(stability=False, stability_sparsities=(0.2,))).stability == ()
    assert RunPlan.from_dict(plan.to_dict()) == plan


def test_run_plan_resolves_masks_and_rewinds():
    from lottery.plan import RunPlan

    plan = RunPlan.from_config(ExperimentConfig.from_dict({"sparsities": [0.5, 0.9]}))
    assert plan.mask(1).mask_id == "sp90.000" and plan.mask("1") == plan.mask("sp90.000")
    assert plan.rewind(3) == "1ep" and plan.rewind("1ep0it") == "1ep" and plan.rewind("100it") == "100it"
    with pytest.raises(ValueError, match="out of range"):
        plan.mask(2)
    with pytest.raises(ValueError, match="sp50.000, sp90.000"):
        plan.mask("sp10.000")
    with pytest.raises(ValueError, match="unknown rewind point"):
        plan.rewind("3ep")
    with pytest.raises(ConfigError, match="same mask id"):
        RunPlan.from_config(ExperimentConfig.from_dict({"sparsities": [0.5, 0.500001]}))


# ---- the work directory ---------------------------------------------------------------------------
def test_workdir_status(tmp_path):
    from lottery.paths import Workdir
    from lottery.plan import RunPlan

    plan = RunPlan.from_config(ExperimentConfig.from_dict({"sparsities": [0.5, 0.9], "rewind_points": ["0it", "1ep"], "control_sparsities": [0.9]}))
    w = Workdir(tmp_path / "w")
    status = w.status(plan)
    assert not status.dense_done and not status.masks_done and len(status.missing) == 8
    assert status.summary() == "dense not done, 0 of 8 tickets done"
    for path in (w.dense_result, w.ticket(plan.tickets[0]).result, w.ticket(plan.controls[1]).error):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    status = w.status(plan)
    assert status.done == [plan.tickets[0]] and status.failed == [plan.controls[1]]
    assert status.summary() == "dense done, 1 of 8 tickets done, 1 failed"
    assert w.started_controls() == [plan.controls[1]]
    assert w.ticket(plan.controls[1]).dir == tmp_path / "w" / "tickets" / "sp90.000__1ep__random_reinit"
    assert w.rewind_checkpoint("1ep") == tmp_path / "w" / "dense" / "rewind" / "1ep.npz"


# ---- every error at once ------------------------------------------------------------------------
def test_every_invalid_field_is_named_at_once():
    conf = {"no_such_field": 1, "model": "resnet9000", "lr": 0, "seed": -1, "batch_size": "128", "control_kinds": []}
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict(conf)
    assert info.value.fields == ["no_such_field", "batch_size", "model", "lr", "seed", "control_kinds"]  # unknown, wrong kinds, then values
    assert info.value.field == "no_such_field"  # the first one, as before
    assert str(info.value).startswith("6 config errors: ")
    for field in info.value.fields:
        assert f"config field '{field}' = " in str(info.value)


def test_a_wrong_value_gives_no_follow_on_errors():
    """A check that reads a field which already failed is skipped: no cascade from one mistake."""
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({"training_steps": "ten epochs", "lr_milestones": ["20ep"], "rewind_points": ["9ep"]})
    assert info.value.fields == ["training_steps"]
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({"sparsities": [0.5, 0.5], "control_sparsities": [0.3]})
    assert info.value.fields == ["sparsities"]
    with pytest.raises(ConfigError) as info:  # independent cross-field errors are all listed
        ExperimentConfig.from_dict({"training_steps": "2ep", "lr_milestones": ["3ep"], "rewind_points": ["0it", "2ep"]})
    assert info.value.fields == ["lr_milestones", "rewind_points"]


def test_checks_against_the_data_name_every_field_at_once():
    cfg = ExperimentConfig.from_dict({"training_steps": "2ep", "lr_milestones": ["1000it"], "rewind_points": ["0it", "900it"]})
    with pytest.raises(ConfigError) as info:
        cfg.check_against_data(steps_per_epoch=400)
    assert info.value.fields == ["rewind_points", "lr_milestones"]


# ---- the default LR milestone follows the training length ----------------------------------------
def test_default_lr_milestone_follows_the_training_length():
    """Unset: at 4ep wherever 4ep is within training (as always), else at two thirds of training."""
    assert ExperimentConfig().lr_milestones is None
    assert ExperimentConfig().milestone_iterations(100) == (400,)
    short = ExperimentConfig.from_dict({"training_steps": "3ep", "rewind_points": ["0it", "1ep"]})  # was refused
    assert short.milestone_iterations(100) == (200,)
    assert ExperimentConfig.from_dict({"training_steps": "1ep", "rewind_points": ["0it"]}).milestone_iterations(30) == (20,)
    assert ExperimentConfig.from_dict({"training_steps": "8ep"}).milestone_iterations(100) == (400,)
    mixed = ExperimentConfig.from_dict({"training_steps": "3ep500it"})  # 4ep is inside at 468 iterations per epoch
    assert mixed.milestone_iterations(468) == (1872,) and mixed.milestone_iterations(600) == (2 * 2300 // 3,)
    assert ExperimentConfig.from_dict({"lr_milestones": []}).milestone_iterations(100) == ()
    assert ExperimentConfig.from_dict({"lr_milestones": ["1ep", "5ep"]}).milestone_iterations(100) == (100, 500)
    with pytest.raises(ConfigError, match="'lr_milestones' = '4ep': is past the end of training"):
        ExperimentConfig.from_dict({"training_steps": "3ep", "lr_milestones": ["4ep"], "rewind_points": ["0it"]})  # explicit: kept


@pytest.mark.parametrize("conf", [{"training_steps": "8ep"}, {"training_steps": "5ep", "seed": 2}, {"model": "conv2"}])
def test_unset_milestones_keep_the_ids_of_the_old_default(conf):
    """An experiment that ran with the old default ["4ep"] keeps its id, whether its config.json
    spells the milestone out (as old ones do) or leaves it unset (as new ones do)."""
    old = hashlib.sha256(json.dumps({"config": conf, "dataset": FASHION_MNIST_ID}, sort_keys=True,
                                    separators=(",", ":")).encode()).hexdigest()[:12]
    unset, spelled = ExperimentConfig.from_dict(conf), ExperimentConfig.from_dict({**conf, "lr_milestones": ["4ep"]})
    assert experiment_id(unset, FASHION_MNIST_ID) == experiment_id(spelled, FASHION_MNIST_ID) == f"{unset.model}-{old}"
    assert ExperimentConfig.from_dict(unset.to_dict()) == unset  # config.json round trip: null stays unset


# ---- the checks that need the data's size, as soon as it is written ------------------------------------
def _write_manifest(data_dir, train_images):
    """The one manifest entry the size checks read (docs/data-format.md: splits.train.count)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "manifest.json").write_text(json.dumps({"splits": {"train": {"count": train_images}}}))


def test_data_size_checks_run_once_the_manifest_exists(tmp_path):
    from lottery.plan import check_data_size

    cfg = ExperimentConfig.from_dict({"training_steps": "2ep", "rewind_points": ["0it", "500it"]})
    assert check_data_size(cfg, tmp_path / "data") is None  # not written yet: preprocess comes first
    _write_manifest(tmp_path / "data", 128 * 300)
    assert check_data_size(cfg, tmp_path / "data") == 300  # 500 < 600 iterations
    _write_manifest(tmp_path / "data", 128 * 200)  # a small data set: 2ep is 400 iterations
    with pytest.raises(ConfigError) as info:
        check_data_size(cfg, tmp_path / "data")
    assert info.value.fields == ["rewind_points"]
    assert str(info.value) == ("config field 'rewind_points' = '500it': is iteration 500, not before the end of training "
                               "(iteration 400 at 200 iterations per epoch)")
    with pytest.raises(ConfigError, match="'batch_size' = 128: is larger than the training set"):
        check_data_size(cfg, _write_manifest(tmp_path / "tiny", 100) or tmp_path / "tiny")

"""The experiment config: parsing, validation (every field names itself), experiment ids."""

import dataclasses

import pytest

from lottery.config import MODEL_NAMES, ConfigError, ExperimentConfig, Step, default_sparsities, experiment_id


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
    assert len(cfg.rewind_points) == 5 and len(cfg.sparsities) == 20
    assert cfg.sparsities[0] == pytest.approx(0.2) and cfg.sparsities[-1] == pytest.approx(1 - 0.8**20)
    assert cfg.pruning_scope == "global" and cfg.output_layer_prune_factor == 0.5
    assert list(cfg.sparsities) == default_sparsities()


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
    ({"sparsities": []}, "sparsities"),
    ({"pruning_scope": "random"}, "pruning_scope"),
    ({"output_layer_prune_factor": 0}, "output_layer_prune_factor"),
    ({"augmentation": "mixup"}, "augmentation"),
    ({"mixed_precision": 1}, "mixed_precision"),
    ({"jit_compile": "true"}, "jit_compile"),
    ({"seed": -1}, "seed"),
]


@pytest.mark.parametrize("conf, field", INVALID, ids=[f for _, f in INVALID])
def test_every_invalid_field_is_rejected_with_its_name(conf, field):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict(conf)
    assert info.value.field == field
    assert f"'{field}'" in str(info.value)


def test_every_field_is_covered_by_an_invalid_case():
    covered = {field for _, field in INVALID}
    assert {f.name for f in dataclasses.fields(ExperimentConfig)} <= covered


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

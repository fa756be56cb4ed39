"""The lottery_ticket DAG: parses fast and light, has the right shape, refuses bad params.

No training here (see test_dag_e2e.py). Airflow runs on a throwaway home (SQLite) set up before
``airflow`` is imported.
"""

import json
import os
from datetime import datetime, timezone
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
from tests.helpers import init_db_here, use_test_home  # noqa: E402  (before airflow is imported)

HOME = use_test_home()

from lottery.config import CONTROLS, MODEL_NAMES, ConfigError, ExperimentConfig, default_sparsities, experiment_id  # noqa: E402
from lottery.steps import STEP_PATTERN  # noqa: E402
from lottery.plan import RunPlan, TicketSpec  # noqa: E402

DAG_FILE = ROOT / "dags" / "lottery_ticket.py"
TRAINING_TASKS = {"train_dense", "late_reset", "imp_chain", "controls", "stability"}


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags["lottery_ticket"]


@pytest.fixture(scope="module")
def sdag(dag):
    """The DAG as the scheduler and the API server see it (serialized): what validates a new run's conf."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))


def resolve(sdag, conf):
    """Exactly what ``create_dagrun`` does with a trigger's conf before the run exists."""
    return sdag.params.deep_merge(conf).validate()


@pytest.fixture(scope="module")
def form():
    """The trigger form (lottery.dag.params) and what a run derives from its params."""
    from lottery.dag import params

    return params


@pytest.fixture(scope="module")
def tasks():
    """The task bodies' helpers."""
    from lottery.dag import tasks

    return tasks


# ---- parsing ----------------------------------------------------------------------------------
def test_dagbag_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {"lottery_ticket", "lottery_compare"}


def test_parse_is_fast_and_light():
    """In a fresh interpreter: the file parses in well under a second and pulls in no TF/Keras/Spark/NumPy."""
    code = textwrap.dedent(f"""
        import json, sys, time
        from airflow.dag_processing.dagbag import DagBag
        import airflow.sdk, airflow.providers.apache.spark.operators.spark_submit  # what every DAG file pays
        t = time.perf_counter()
        bag = DagBag(dag_folder={str(ROOT / "dags")!r})
        cold = time.perf_counter() - t
        t = time.perf_counter()
        DagBag(dag_folder={str(ROOT / "dags")!r})
        warm = time.perf_counter() - t
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"tensorflow", "keras", "pyspark", "numpy", "matplotlib", "jax", "torch"}})
        print(json.dumps({{"errors": list(bag.import_errors), "cold": cold, "warm": warm, "heavy": heavy,
                          "stat": bag.dagbag_stats[0].duration.total_seconds()}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["errors"] == []
    assert result["heavy"] == [], f"parsing imported {result['heavy']}"
    assert result["cold"] < 0.9, result
    assert result["warm"] < 0.3, result


# ---- structure --------------------------------------------------------------------------------
def test_dag_settings(dag):
    assert dag.schedule is None or str(dag.timetable.summary) in ("None", "Never, external triggers only")
    assert dag.catchup is False
    assert dag.max_active_tasks >= 20
    assert {"lottery-ticket"} <= set(dag.tags)
    assert "late_reset" in dag.doc_md and "num_levels" in dag.doc_md


def test_tasks_and_dependencies(dag):
    upstream = {t.task_id: set(t.upstream_task_ids) for t in dag.tasks}
    assert set(upstream) == {
        "validate_config", "fetch_dataset", "preprocess", "prepare_workdir", "plan_replicates", "train_dense", "make_masks",
        "plan_tickets", "late_reset", "plan_chains", "imp_chain", "chains_done", "plan_controls", "controls",
        "plan_stability", "stability", "report", "check_results",
    }
    assert upstream["validate_config"] == set()
    assert upstream["fetch_dataset"] == {"validate_config"}
    assert upstream["preprocess"] == {"validate_config", "fetch_dataset"}
    assert "preprocess" in upstream["prepare_workdir"]
    assert upstream["plan_replicates"] == {"prepare_workdir"}
    assert "plan_replicates" in upstream["train_dense"] and "plan_replicates" in upstream["make_masks"]
    assert "train_dense" in upstream["make_masks"]
    assert "make_masks" in upstream["plan_tickets"] and "plan_tickets" in upstream["late_reset"]
    assert "make_masks" in upstream["plan_chains"] and upstream["imp_chain"] == {"plan_chains"}
    # the controls are planned after every chain has ended (an iterative control needs its chain's level mask)
    assert upstream["chains_done"] == {"imp_chain"}
    assert upstream["plan_controls"] == {"make_masks", "validate_config", "chains_done"}
    assert upstream["controls"] == {"plan_controls"}
    # the instability analyses: planned as the controls are (an iterative ticket's needs its chain's level mask)
    assert upstream["plan_stability"] == {"make_masks", "validate_config", "chains_done"}
    assert upstream["stability"] == {"plan_stability"}
    assert {"late_reset", "imp_chain", "controls", "stability", "prepare_workdir"} <= upstream["report"]
    # reads the work dirs, not report's XCom; waits for the tickets also when report is not cleared
    assert upstream["check_results"] == {"report", "prepare_workdir", "validate_config", "late_reset", "imp_chain", "controls",
                                         "stability"}
    assert [t.task_id for t in dag.leaves] == ["check_results"]


def test_pool_queue_retries_trigger_rules(dag):
    for t in dag.tasks:
        if t.task_id in TRAINING_TASKS:
            assert t.pool == "lottery_workers", t.task_id
            assert t.queue == "gpu", t.task_id
            assert t.retries >= 1 and t.retry_delay.total_seconds() > 0, t.task_id
        else:
            assert t.pool == "default_pool", t.task_id
            assert t.queue != "gpu", t.task_id
    assert dag.get_task("validate_config").retries == 0
    rules = {t.task_id: str(t.trigger_rule.value if hasattr(t.trigger_rule, "value") else t.trigger_rule) for t in dag.tasks}
    assert rules["report"] == "all_done"
    assert rules["check_results"] == "all_done"
    assert rules["preprocess"] == "none_failed"
    assert rules["late_reset"] == "all_success"
    # a failed chain must not stop the controls of the other chains, and a one-shot run's imp_chain
    # (nothing to map: skipped) must not skip the controls; a failure before the chains still stops them
    assert rules["chains_done"] == "all_done"
    assert rules["plan_controls"] == "all_success" and rules["controls"] == "all_success"
    assert rules["plan_stability"] == "all_success" and rules["stability"] == "all_success"
    assert dag.get_task("imp_chain").priority_weight == dag.get_task("late_reset").priority_weight


def test_tickets_are_scheduled_before_controls(dag):
    # The scheduler orders queued instances by priority weight: the long ticket groups first, the
    # controls' short ones last, so that no long group runs alone at the end of the run.
    tickets, controls = dag.get_task("late_reset"), dag.get_task("controls")
    assert str(tickets.weight_rule) == str(controls.weight_rule)
    assert tickets.priority_weight > controls.priority_weight


def test_mapped_tasks_and_their_names(dag):
    from jinja2 import Environment

    group = "rewind 1ep: masks 1-10 (80.0%…10.7% left)"
    for task_id, kwargs, label in [
        ("train_dense", {"workdir": "/a/lenet_300_100-3f2a9c1d0b7e", "replicate": "lenet_300_100-3f2a9c1d0b7e"},
         "lenet_300_100-3f2a9c1d0b7e"),
        ("train_dense", {"workdir": "/a/w", "replicate": "rep 2"}, "rep 2"),
        ("make_masks", {"workdir": "/a/w", "replicate": "rep 2"}, "rep 2"),
        ("imp_chain", {"workdir": "/a/w", "rewind": "1ep", "group": "rep 2: chain, rewind 1ep"}, "rep 2: chain, rewind 1ep"),
        ("late_reset", {"workdir": "/a/w", "masks": [], "rewind": "2ep", "group": "rep 2: 5.0% left, rewind 2ep"},
         "rep 2: 5.0% left, rewind 2ep"),
        ("late_reset", {"masks": [], "rewind": "2ep", "group": "5.0% left, rewind 2ep"}, "5.0% left, rewind 2ep"),
        ("controls", {"masks": [], "rewind": "2ep", "control": "random_prune", "group": "random_prune: 5.0% left, rewind 2ep"},
         "random_prune: 5.0% left, rewind 2ep"),
        ("late_reset", {"masks": [], "rewind": "1ep", "group": group}, group),
        ("stability", {"workdir": "/a/w", "rewind": "1ep", "mask": None, "points": 11, "group": "dense, rewind 1ep"},
         "dense, rewind 1ep"),
        ("stability", {"workdir": "/a/w", "rewind": "1ep", "mask": "sp95.000", "points": 11,
                       "group": "rep 2: 5.0% left, rewind 1ep"}, "rep 2: 5.0% left, rewind 1ep"),
        ("controls", {"masks": [], "rewind": "1ep", "control": "random_prune", "group": "random_prune, " + group},
         "random_prune, " + group),
    ]:
        task = dag.get_task(task_id)
        assert type(task).__name__.endswith("MappedOperator"), task_id
        rendered = Environment().from_string(task.map_index_template).render(task=SimpleNamespace(op_kwargs=kwargs))
        assert rendered == label


def test_spark_submit_task(dag):
    task = dag.get_task("preprocess")
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    # a SparkSubmitOperator that starts Spark only when the data needs writing (tests/test_concurrent_runs.py)
    assert type(task).__name__ == "PreprocessOperator" and isinstance(task, SparkSubmitOperator)
    assert task.conn_id == "spark_default" if hasattr(task, "conn_id") else task._conn_id == "spark_default"
    assert task.application == str(ROOT / "spark_jobs" / "preprocess_images.py")
    assert Path(task.application).is_file()


def test_remaining_labels(form):
    assert form.remaining_label(0.05) == "5.0% left"
    assert form.remaining_label(0.8) == "80.0% left"
    assert form.remaining_label(0.0137) == "1.4% left"
    assert form.remaining_label(0.0023) == "0.23% left"


# ---- params -----------------------------------------------------------------------------------
def test_default_params_are_the_default_experiment(sdag, form):
    params = resolve(sdag, {})
    cfg = form.experiment_config(params)
    assert cfg == ExperimentConfig()
    assert experiment_id(cfg, "d") == experiment_id(ExperimentConfig(), "d")
    plan = RunPlan.from_config(cfg)
    assert len(plan.tickets) == 100 and len(plan.controls) == 2 * 3 * 5
    # the instability analysis of the dense network at every rewind point: 5 x 2 trainings beside the 130
    assert [(s.mask_id, s.rewind) for s in plan.stability] == [(None, r) for r in plan.rewinds]
    assert list(cfg.levels()) == default_sparsities()
    assert params["queue"] == "gpu" and params["dataset"] == "fashion_mnist" and params["controls"] is True


def test_form_metadata(dag):
    """Every param has a title and a section; enums come from the engine's lists."""
    for name, param in dag.params.items():
        assert param.schema.get("title"), name
        assert param.schema.get("section"), name
    assert dag.params.get_param("model").schema["enum"] == list(MODEL_NAMES)
    assert dag.params.get_param("control_kinds").schema["items"]["enum"] == list(CONTROLS)
    assert dag.params.get_param("pruning_schedule").schema["enum"] == ["one_shot", "iterative"]
    assert dag.params.get_param("rewind_mode").schema["enum"] == ["full", "weights", "learning_rate"]
    names = ("replicates", "seed", "pruning_schedule", "rewind_mode", "stability", "stability_sparsities", "stability_points",
             "stability_threshold")
    sections = {name: dag.params.get_param(name).schema["section"] for name in names}
    assert sections == {"replicates": "Model and training", "seed": "Model and training", "pruning_schedule": "Pruning",
                        "rewind_mode": "Pruning", **{name: "Stability" for name in names[4:]}}
    assert dag.params["replicates"] == 1 and dag.params.get_param("replicates").schema["type"] == "integer"


# Refused by the form (Airflow's Param validation, before the run exists): a value of the wrong type,
# not one of a field's choices, or an execution setting out of range.
INVALID = [
    ("training_steps", "8 epochs"),
    ("training_steps", ""),
    ("warmup_steps", "soon"),
    ("rewind_points", ["1 epoch"]),
    ("dataset", ""),
    ("dataset", 3),
    ("dataset_limit", 5),
    ("dataset_limit", "100"),
    ("val_labels", 5),
    ("image_size", 4),
    ("image_size", "28"),
    ("image_size", 28.5),
    ("channels", 2),
    ("encoding", "gif"),
    ("model", "resnet1000"),
    ("training_steps", 8),
    ("batch_size", "128"),
    ("optimizer", "rmsprop"),
    ("lr", "fast"),
    ("momentum", "high"),
    ("nesterov", "yes"),
    ("weight_decay", "none"),
    ("warmup_steps", 5),
    ("lr_milestones", "4ep"),
    ("lr_gamma", "0.1"),
    ("augmentation", "mixup"),
    ("mixed_precision", "no"),
    ("jit_compile", "true"),
    ("seed", 1.5),
    ("replicates", "2"),
    ("replicates", 1.5),
    ("pruning_schedule", "gradual"),
    ("rewind_mode", "optimizer"),
    ("rewind_points", "1ep"),
    ("sparsities", ["0.5"]),
    ("num_levels", 2.5),
    ("prune_rate", "0.2"),
    ("pruning_scope", "local"),
    ("output_layer_prune_factor", "half"),
    ("controls", "on"),
    ("control_kinds", ["random_everything"]),
    ("control_sparsities", ["x"]),
    ("stability", "on"),
    ("stability_sparsities", ["0.8"]),
    ("stability_sparsities", 0.8),
    ("stability_points", 11.5),
    ("stability_points", "11"),
    ("stability_threshold", "2"),
    ("artifact_root", ""),
    ("queue", "bad queue"),
    ("queue", ""),
    ("tickets_per_task", 0),
    ("tickets_per_task", -3),
    ("tickets_per_task", 2.5),
    ("tickets_per_task", "10"),
]
# Accepted by the form, refused by validate_config naming the field in words: ranges, step strings,
# repeats and paths (the form's validation stops at the first bad field; validate_config names them all).
INVALID_VALUES = [
    ("dataset", "relative/path"),
    ("dataset", "/nonexistent/images"),
    ("val_labels", "/nonexistent/LOC_val_solution.csv"),  # with fashion_mnist: only for an image folder
    ("training_steps", "0ep"),
    ("batch_size", 0),
    ("lr", 0),
    ("lr", -0.1),
    ("momentum", 1.0),
    ("weight_decay", -0.1),
    ("lr_milestones", ["4 epochs"]),
    ("lr_gamma", 0),
    ("lr_gamma", 1.5),
    ("seed", -1),
    ("replicates", 0),
    ("replicates", 11),
    ("rewind_points", []),
    ("rewind_points", ["1ep", "1ep"]),
    ("sparsities", [1.0]),
    ("sparsities", [0]),
    ("sparsities", [0.5, 0.5]),
    ("num_levels", 0),
    ("num_levels", 101),
    ("prune_rate", 1.0),
    ("prune_rate", 0),
    ("output_layer_prune_factor", 0),
    ("output_layer_prune_factor", 1.5),
    ("control_kinds", []),
    ("control_kinds", ["random_prune", "random_prune"]),
    ("control_sparsities", [1.5]),
    ("stability_sparsities", [0.5]),          # not a level of the default experiment
    ("stability_sparsities", [1.5]),
    ("stability_points", 2),
    ("stability_points", 102),
    ("stability_threshold", 0),
    ("stability_threshold", -1.0),
    ("artifact_root", "artifacts"),
    ("artifact_root", "/etc"),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_param_refused_naming_the_field(sdag, field, value):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError) as err:
        resolve(sdag, {field: value})
    assert f"param {field}" in str(err.value)


@pytest.mark.parametrize("field,value", INVALID_VALUES, ids=[f"{f}={v!r}" for f, v in INVALID_VALUES])
def test_invalid_value_refused_by_validate_config_naming_the_field(sdag, form, field, value):
    params = resolve(sdag, {field: value})
    with pytest.raises(ConfigError) as err:
        form.check_params(params, {field: value})
    assert err.value.fields == [field]
    assert str(err.value).startswith(f"config field '{field}' = ")


def test_every_bad_value_is_named_at_once_in_words(sdag, form):
    """Four bad fields (a REST conf, say): the form lets them through, validate_config names all four."""
    conf = {"lr": 0, "seed": -1, "rewind_points": ["0it", "0it"], "artifact_root": "/etc"}
    with pytest.raises(ConfigError) as err:
        form.check_params(resolve(sdag, conf), conf)
    assert sorted(err.value.fields) == sorted(conf)
    message = str(err.value)
    assert message.startswith("4 config errors: ")
    assert "'lr' = 0: must be greater than 0" in message and "'seed' = -1: must be greater than or equal to 0" in message
    assert "'rewind_points' = ['0it', '0it']: '0it' repeats '0it'" in message
    assert f"in or under an allowed root: {', '.join(form.ARTIFACT_ROOTS)}" in message
    assert "does not match" not in message and "(?!" not in message


def test_form_shows_each_config_field_as_declared(dag):
    """The form's config params come from ExperimentConfig's fields: default, title, help, type, choices
    and a step string's shape."""
    for name, field in ExperimentConfig.model_fields.items():
        param = dag.params.get_param(name)
        schema = param.schema
        assert schema["title"] == field.title and param.description == field.description, name
        assert schema.get("pattern") in (None, STEP_PATTERN) and "minimum" not in schema, name  # only a step string's shape
    assert dag.params.get_param("mixed_precision").schema["enum"] == [False, True, "bfloat16", "float16"]
    assert dag.params.get_param("lr_milestones").schema["type"] == ["null", "array"]
    assert dag.params["rewind_points"] == list(ExperimentConfig().rewind_points)


def test_every_param_has_an_invalid_case(dag):
    untested = set(dag.params) - {f for f, _ in INVALID}
    assert untested == set()


def test_valid_conf_accepted(sdag):
    conf = {"model": "conv4", "image_size": 32, "channels": 3, "training_steps": "2ep100it", "rewind_points": ["0it", "500it"],
            "sparsities": [0.5, 0.9], "controls": True, "control_sparsities": [0.9], "queue": "gpu-a100", "dataset_limit": 500}
    params = resolve(sdag, conf)
    assert params["model"] == "conv4" and params["queue"] == "gpu-a100"


# ---- cross-field checks (validate_config) -----------------------------------------------------
def _params(sdag, **conf):
    return resolve(sdag, conf)


@pytest.mark.parametrize("conf,field", [
    ({"rewind_points": ["0it", "10ep"]}, "rewind_points"),       # after the end of training (6ep)
    ({"rewind_points": ["6ep"]}, "rewind_points"),               # at the end
    ({"lr_milestones": ["9ep"]}, "lr_milestones"),
    ({"sparsities": [0.5, 0.9], "controls": True, "control_sparsities": [0.7]}, "control_sparsities"),
    ({"sparsities": [0.5, 0.9], "stability_sparsities": [0.7]}, "stability_sparsities"),
    ({"dataset": os.path.join(tempfile.gettempdir(), "nonexistent-lottery-images")}, "dataset"),  # in a data root, not there
    ({"dataset": tempfile.gettempdir(), "dataset_limit": 100}, "dataset_limit"),
    ({"rewind_mode": "learning_rate"}, "rewind_points"),                          # 0it: nothing to replay
    ({"pruning_schedule": "iterative", "sparsities": [0.9, 0.5]}, "sparsities"),  # a chain's levels must increase
    ({"seed": 2**31 - 1, "replicates": 2}, "seed"),                               # the last replicate's seed
])
def test_cross_field_errors_name_the_field(sdag, form, conf, field):
    with pytest.raises(ConfigError) as err:
        form.check_params(_params(sdag, **conf), conf)
    assert err.value.field == field
    assert f"'{field}'" in str(err.value)


def test_unknown_conf_key_refused(sdag, form):
    with pytest.raises(ConfigError) as err:
        form.check_params(_params(sdag), {"modle": "conv4"})
    assert err.value.field == "modle"


def test_check_params_derives_paths_and_plan(sdag, form, tmp_path):
    conf = {"artifact_root": str(tmp_path), "image_size": 32, "dataset_limit": 300, "controls": True,
            "control_sparsities": [0.79, 0.488], "rewind_points": ["0it", "1ep"]}
    out = form.check_params(_params(sdag, **conf), conf)
    assert set(out) == {"plan", "dataset", "dataset_limit", "source_dir", "data_dir", "artifact_root", "spark_args", "tickets_per_task"}
    assert out["tickets_per_task"] == 1
    assert out["data_dir"] == str(tmp_path / "data" / "fashion_mnist-32px-c1-png-n300")
    assert out["source_dir"] == str(tmp_path / "sources" / "fashion_mnist-n300")
    assert out["spark_args"][:4] == ["--input", out["source_dir"], "--output", out["data_dir"]]
    plan = RunPlan.from_dict(out["plan"])
    assert plan.rewinds == ("0it", "1ep")
    # nearest levels: 0.79 -> 0.790285, 0.488 -> 0.488
    assert {c.mask_id for c in plan.controls} == {"sp79.029", "sp48.800"}
    assert [c.control for c in plan.controls[::4]] == list(CONTROLS)
    json.dumps(out)  # XCom-able


def test_explicit_sparsities_win_over_levels(sdag, form):
    assert form.experiment_config(_params(sdag, sparsities=[0.5, 0.75], num_levels=3)).levels() == (0.5, 0.75)
    assert form.experiment_config(_params(sdag, num_levels=3, prune_rate=0.5)).levels() == (0.5, 0.75, 0.875)


def test_data_key_distinguishes_options(form, tmp_path):
    base = {"dataset": "fashion_mnist", "image_size": 28, "channels": 1, "encoding": "png", "dataset_limit": None}
    keys = {form.data_key(base), form.data_key({**base, "image_size": 32}), form.data_key({**base, "channels": 3}),
            form.data_key({**base, "encoding": "raw"}), form.data_key({**base, "dataset_limit": 100}),
            form.data_key({**base, "dataset": str(tmp_path / "a" / "imgs")}), form.data_key({**base, "dataset": str(tmp_path / "b" / "imgs")})}
    assert len(keys) == 7
    assert form.data_key(base) == "fashion_mnist-28px-c1-png"


def test_val_labels_param(sdag, form, tmp_path):
    """A flat val/'s label file: passed to the Spark job only when given (the Spark args and data keys of
    other runs stay as they were), refused at trigger time when it is not a file."""
    images = tmp_path / "imgs"
    (images / "train" / "c").mkdir(parents=True)
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("ImageId,PredictionString\n")
    base = {"artifact_root": str(tmp_path), "dataset": str(images)}
    without = form.check_params(_params(sdag, **base), base)
    assert "--val-labels" not in without["spark_args"] and _params(sdag)["val_labels"] is None
    conf = {**base, "val_labels": str(labels)}
    out = form.check_params(_params(sdag, **conf), conf)
    assert out["spark_args"][-2:] == ["--val-labels", str(labels.resolve())]
    assert out["data_dir"].startswith(without["data_dir"] + "-vl")
    for bad, reason in ((str(tmp_path / "nope.csv"), "does not exist"), (str(images), "is a directory")):
        conf = {**base, "val_labels": bad}
        with pytest.raises(ConfigError, match=reason) as err:
            form.check_params(_params(sdag, **conf), conf)
        assert err.value.fields == ["val_labels"]


def test_training_threads(tasks, monkeypatch):
    monkeypatch.setenv("LOTTERY_THREADS", "3")
    assert tasks.training_threads("ticket") == 3
    monkeypatch.delenv("LOTTERY_THREADS")
    cores = len(os.sched_getaffinity(0))
    assert tasks.training_threads("dense") == cores
    monkeypatch.setenv("AIRFLOW__CORE__PARALLELISM", "1")
    assert tasks.training_threads("ticket") == cores
    monkeypatch.setenv("AIRFLOW__CORE__PARALLELISM", str(4 * cores))
    assert tasks.training_threads("ticket") == 1


# ---- the queue policy -------------------------------------------------------------------------
def _hook():
    import airflow_local_settings  # plugins/ is on sys.path (tests/conftest.py), as Airflow puts it on its own

    return airflow_local_settings.task_instance_mutation_hook


@pytest.mark.parametrize("dag_id,queue,conf,want", [
    ("lottery_ticket", "gpu", {"queue": "gpu-a100"}, "gpu-a100"),
    ("lottery_ticket", "gpu", {}, "gpu"),
    ("lottery_ticket", "default", {"queue": "gpu-a100"}, "default"),  # CPU tasks stay put
    ("other_dag", "gpu", {"queue": "gpu-a100"}, "gpu"),
    ("lottery_ticket", "gpu", {"queue": "bad queue"}, "gpu"),
    ("lottery_ticket", "gpu", None, "gpu"),
])
def test_queue_policy(dag_id, queue, conf, want):
    ti = SimpleNamespace(dag_id=dag_id, queue=queue)
    _hook()(ti, SimpleNamespace(conf=conf))
    assert ti.queue == want
    ti = SimpleNamespace(dag_id=dag_id, queue=queue)
    _hook()(ti, None)  # no run yet: untouched
    assert ti.queue == queue


def test_policy_is_loaded_by_airflow():
    """Airflow found plugins/airflow_local_settings.py (the plugins folder is on its sys.path)."""
    from airflow import settings

    assert settings.task_instance_mutation_hook.is_noop is False
    ti = SimpleNamespace(dag_id="lottery_ticket", queue="gpu")
    settings.task_instance_mutation_hook(ti, dag_run=SimpleNamespace(conf={"queue": "q7"}))
    assert ti.queue == "q7"


def sync_dag_to_db():
    """Parse the dags folder into the metadata database, as the dag-processor would."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    init_db_here()
    manager = DagBundlesManager()
    manager.sync_bundles_to_db()
    for bundle in manager.get_all_dag_bundles():
        if not bundle.is_initialized:
            bundle.initialize()
        bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
        sync_bag_to_db(bag, bundle.name, bundle.version)


def test_run_conf_queue_routes_training_tasks(dag):
    """A real DagRun: the scheduler-side task instances get the queue from the run's conf."""
    from airflow.models import TaskInstance
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType
    from airflow.sdk import timezone

    sync_dag_to_db()
    from airflow.models.dagbag import DBDagBag

    with create_session() as session:
        sdag = DBDagBag().get_latest_version_of_dag("lottery_ticket", session=session)
        now = timezone.utcnow()
        run = sdag.create_dagrun(
            run_id=f"queue_test_{now.timestamp()}", logical_date=None, data_interval=None, run_after=now,
            conf={"queue": "gpu-a100"}, run_type=DagRunType.MANUAL, triggered_by=DagRunTriggeredByType.TEST,
            state=DagRunState.QUEUED, session=session,
        )
        session.flush()
        queues = {ti.task_id: ti.queue for ti in session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id)}
    assert queues["train_dense"] == "gpu-a100"
    assert queues["late_reset"] == "gpu-a100"  # the unexpanded mapped task; expansion re-applies the hook
    assert queues["controls"] == "gpu-a100"
    assert queues["validate_config"] == "default" and queues["report"] == "default"


def test_invalid_conf_refused_when_the_run_is_created(dag):
    """What the trigger form and the REST API do: create_dagrun validates the params first."""
    from airflow.sdk.exceptions import ParamValidationError

    init_db_here()
    with pytest.raises(ParamValidationError) as err:
        dag.test(run_conf={"rewind_points": "1ep"})  # a value of the wrong type: not a list
    assert "rewind_points" in str(err.value)


def test_default_control_levels_follow_a_runs_own_sparsities(sdag, form):
    """Controls are on by default at three levels; a run with its own sparsities gets the nearest
    of its levels instead of an error, while explicit control sparsities must be levels."""
    assert len(resolve(sdag, {})["control_sparsities"]) == 3
    out = form.check_params(_params(sdag, sparsities=[0.5, 0.9]))
    assert {c.mask_id for c in RunPlan.from_dict(out["plan"]).controls} == {"sp50.000", "sp90.000"}
    with pytest.raises(ConfigError, match="control_sparsities"):
        form.check_params(_params(sdag, sparsities=[0.5, 0.9], control_sparsities=[0.7]))


def test_mapped_kwargs_follow_the_plan(sdag, form, tasks):
    """plan_tickets / plan_controls: one kwargs dict per ticket of the plan, with the mask's descriptor."""
    conf = {"sparsities": [0.5, 0.9], "rewind_points": ["0it", "1ep"], "control_sparsities": [0.9]}
    plan = form.check_params(_params(sdag, **conf))["plan"]
    masks = [{"index": i, "mask_id": m, "sparsity": s, "remaining": 1 - s, "label": form.remaining_label(1 - s)}
             for i, (m, s) in enumerate([("sp50.000", 0.5), ("sp90.000", 0.9)])]
    tickets = tasks.plan_tickets(_one(masks), plan)
    assert all(k["workdir"] == W for k in tickets)
    assert [([m["mask_id"] for m in k["masks"]], k["rewind"], k["group"]) for k in tickets] == [
        (["sp50.000"], "0it", "50.0% left, rewind 0it"), (["sp50.000"], "1ep", "50.0% left, rewind 1ep"),
        (["sp90.000"], "0it", "10.0% left, rewind 0it"), (["sp90.000"], "1ep", "10.0% left, rewind 1ep")]
    controls = tasks.plan_controls(_one(masks), plan)
    assert [(k["control"], [m["label"] for m in k["masks"]], k["rewind"], k["group"]) for k in controls] == [
        (kind, ["10.0% left"], r, f"{kind}: 10.0% left, rewind {r}") for kind in CONTROLS for r in ("0it", "1ep")]
    assert tasks.plan_controls(_one(masks), form.check_params(_params(sdag, controls=False))["plan"]) == []
    assert tasks.plan_chains(_one(masks), plan) == []  # one-shot: no chain (imp_chain is skipped)
    assert tasks.ticket_label(masks[1], "1ep", "random_prune") == "random_prune: 10.0% left, rewind 1ep"
    json.dumps([tickets, controls])  # XCom-able


# ---- tickets_per_task: groups of tickets per task instance --------------------------------------
def _masks(form, sparsities):
    return [{"index": i, "mask_id": f"sp{100 * s:06.3f}", "sparsity": s, "remaining": 1 - s, "label": form.remaining_label(1 - s)}
            for i, s in enumerate(sparsities)]


W = "/a/lenet_300_100-3f2a9c1d0b7e"


def _one(masks, workdir=W):
    """make_masks' result for an experiment of one replicate (its mapped instance's XCom, as plan_* receive them)."""
    return [{"workdir": workdir, "replicate": Path(workdir).name, "masks": masks}]


def _reps(masks, count):
    """make_masks' results for ``count`` replicates, in map-index order."""
    return [{"workdir": f"/a/rep{i}", "replicate": f"rep {i + 1}", "masks": masks} for i in range(count)]


def test_tickets_per_task_is_an_execution_setting(sdag, form):
    """Default 1; not an ExperimentConfig field: it never changes the experiment id."""
    param = sdag.params.get_param("tickets_per_task")
    assert param.value == 1 and param.schema["section"] == "Execution" and param.schema["minimum"] == 1
    assert "tickets_per_task" not in form.CONFIG_FIELDS
    one, ten = (form.experiment_config(resolve(sdag, {"tickets_per_task": k})) for k in (1, 10))
    assert one == ten and experiment_id(one, "d") == experiment_id(ten, "d")
    assert form.check_params(resolve(sdag, {"tickets_per_task": 10}))["tickets_per_task"] == 10


def test_one_ticket_per_task_is_a_group_of_one_named_after_its_ticket(sdag, form, tasks):
    """tickets_per_task 1 (the default): one instance per ticket, in the plan's order, each a group of
    one named after its ticket."""
    plan = form.check_params(_params(sdag))["plan"]
    masks = _masks(form, default_sparsities())
    tickets = tasks.plan_tickets(_one(masks), plan, 1)
    assert tickets == tasks.plan_tickets(_one(masks), plan)
    run = RunPlan.from_dict(plan)
    by_id = {m["mask_id"]: m for m in masks}
    assert tickets == [{"workdir": W, "masks": [by_id[t.mask_id]], "rewind": t.rewind,
                        "group": tasks.ticket_label(by_id[t.mask_id], t.rewind)} for t in run.tickets]
    controls = tasks.plan_controls(_one(masks), plan, 1)
    assert controls == [{"workdir": W, "masks": [by_id[c.mask_id]], "rewind": c.rewind, "control": c.control,
                         "group": tasks.ticket_label(by_id[c.mask_id], c.rewind, c.control)} for c in run.controls]
    assert len(tickets) == 100 and len(controls) == 30
    assert tickets[0]["group"] == "80.0% left, rewind 0it"


def test_groups_of_three_over_five_masks(sdag, form, tasks):
    """K=3 over 5 masks: 2 groups per rewind point (masks 1-3, 4-5), rewind-major, named readably."""
    conf = {"sparsities": [0.2, 0.36, 0.488, 0.5904, 0.67232], "rewind_points": ["0it", "1ep"], "control_sparsities": [0.36, 0.5904]}
    plan = form.check_params(_params(sdag, **conf))["plan"]
    masks = _masks(form, conf["sparsities"])
    groups = tasks.plan_tickets(_one(masks), plan, 3)
    assert [g["group"] for g in groups] == [
        "rewind 0it: masks 1-3 (80.0%…51.2% left)", "rewind 0it: masks 4-5 (41.0%…32.8% left)",
        "rewind 1ep: masks 1-3 (80.0%…51.2% left)", "rewind 1ep: masks 4-5 (41.0%…32.8% left)",
    ]
    assert [[m["mask_id"] for m in g["masks"]] for g in groups[:2]] == [["sp20.000", "sp36.000", "sp48.800"], ["sp59.040", "sp67.232"]]
    assert all(set(g) == {"workdir", "masks", "rewind", "group"} for g in groups)
    covered = sorted((m["mask_id"], g["rewind"]) for g in groups for m in g["masks"])
    assert covered == sorted((t.mask_id, t.rewind) for t in RunPlan.from_dict(plan).tickets)
    controls = tasks.plan_controls(_one(masks), plan, 3)
    assert [c["group"] for c in controls] == [
        f"{kind}, rewind {r}: masks 2, 4 (64.0%…41.0% left)" for kind in CONTROLS for r in ("0it", "1ep")]
    assert [c["control"] for c in controls] == [kind for kind in CONTROLS for _ in range(2)]
    json.dumps([groups, controls])  # XCom-able


def test_default_experiment_in_groups_of_ten(sdag, form, tasks):
    """The default experiment at K=10: 2 groups per rewind point, the controls 10 groups of 3 (kind x rewind)."""
    plan = form.check_params(_params(sdag))["plan"]
    masks = _masks(form, default_sparsities())
    groups = tasks.plan_tickets(_one(masks), plan, 10)
    assert len(groups) == 10
    assert groups[2]["group"] == "rewind 100it: masks 1-10 (80.0%…10.7% left)"
    assert groups[3]["group"] == "rewind 100it: masks 11-20 (8.6%…1.2% left)"
    controls = tasks.plan_controls(_one(masks), plan, 10)
    assert len(controls) == 10 and all(len(c["masks"]) == 3 for c in controls)
    assert controls[0]["group"] == "random_reinit, rewind 0it: masks 3, 10, 17 (51.2%…2.3% left)"
    assert len(json.dumps(groups + controls)) < 20_000  # XCom stays small
    assert tasks.group_label(masks[19:], "2ep", "random_prune") == "random_prune, rewind 2ep: mask 20 (1.2% left)"


# ---- replicates and iterative chains --------------------------------------------------------------
REPLICATED = {"sparsities": [0.5, 0.9], "rewind_points": ["0it", "1ep"], "control_sparsities": [0.9], "replicates": 3}


def test_replicates_fan_out_over_their_work_dirs_named_rep_k(tasks):
    """train_dense / make_masks: one instance per replicate, named "rep 1", "rep 2", ...; one
    replicate keeps its experiment id as its name."""
    ids = ["lenet_300_100-aaaa", "lenet_300_100-bbbb", "lenet_300_100-cccc"]
    kwargs = tasks.plan_replicates([f"/a/{i}" for i in ids], ids)
    assert kwargs == [{"workdir": f"/a/{i}", "replicate": f"rep {k + 1}"} for k, i in enumerate(ids)]
    assert tasks.plan_replicates(["/a/" + ids[0]], ids[:1]) == [{"workdir": "/a/" + ids[0], "replicate": ids[0]}]


def test_replicates_times_tickets_each_in_its_work_dir_named_after_its_replicate(sdag, form, tasks):
    """plan_tickets / plan_controls over 3 replicates: every ticket and control of each replicate,
    replicate after replicate, each with its replicate's work dir, named "rep 2: …"."""
    plan = form.check_params(_params(sdag, **REPLICATED))["plan"]
    masks = _masks(form, [0.5, 0.9])
    tickets = tasks.plan_tickets(_reps(masks, 3), plan)
    assert [(k["workdir"], k["group"]) for k in tickets] == [
        (f"/a/rep{i}", f"rep {i + 1}: {left} left, rewind {r}") for i in range(3) for left in ("50.0%", "10.0%") for r in ("0it", "1ep")]
    assert [m["mask_id"] for m in tickets[2]["masks"]] == ["sp90.000"]
    controls = tasks.plan_controls(_reps(masks, 3), plan)
    assert [(k["workdir"], k["control"], k["group"]) for k in controls] == [
        (f"/a/rep{i}", kind, f"rep {i + 1}: {kind}: 10.0% left, rewind {r}") for i in range(3) for kind in CONTROLS for r in ("0it", "1ep")]
    # groups stay within a replicate (and a rewind point, and a control kind)
    groups = tasks.plan_tickets(_reps(masks, 3), plan, 10)
    assert [(g["workdir"], g["group"]) for g in groups] == [
        (f"/a/rep{i}", f"rep {i + 1}: rewind {r}: masks 1-2 (50.0%…10.0% left)") for i in range(3) for r in ("0it", "1ep")]
    assert [c["group"] for c in tasks.plan_controls(_reps(masks, 3), plan, 10)][:2] == [
        "rep 1: random_reinit, rewind 0it: mask 2 (10.0% left)", "rep 1: random_reinit, rewind 1ep: mask 2 (10.0% left)"]
    assert tasks.plan_chains(_reps(masks, 3), plan) == []
    json.dumps([tickets, controls, groups])  # XCom-able


def test_one_replicate_runs_as_before(sdag, form, tasks):
    """replicates 1: the same instances and names as before replicates existed (one work dir, no "rep" prefix)."""
    plan = form.check_params(_params(sdag, **{**REPLICATED, "replicates": 1}))["plan"]
    masks = _masks(form, [0.5, 0.9])
    tickets, controls = tasks.plan_tickets(_one(masks), plan), tasks.plan_controls(_one(masks), plan)
    assert [k["group"] for k in tickets] == [f"{left} left, rewind {r}" for left in ("50.0%", "10.0%") for r in ("0it", "1ep")]
    assert [k["group"] for k in controls] == [f"{kind}: 10.0% left, rewind {r}" for kind in CONTROLS for r in ("0it", "1ep")]
    assert {k["workdir"] for k in tickets + controls} == {W}


def test_iterative_pruning_maps_one_chain_per_replicate_and_rewind_point(sdag, form, tasks):
    """pruning_schedule iterative: imp_chain gets one instance per (replicate, rewind point), late_reset
    none; the controls are planned as for one-shot (they run on the chains' level masks)."""
    plan = form.check_params(_params(sdag, **{**REPLICATED, "pruning_schedule": "iterative", "replicates": 2}))["plan"]
    masks = _masks(form, [0.5, 0.9])
    assert tasks.plan_chains(_reps(masks, 2), plan) == [
        {"workdir": f"/a/rep{i}", "rewind": r, "group": f"rep {i + 1}: chain, rewind {r}"} for i in range(2) for r in ("0it", "1ep")]
    assert tasks.plan_tickets(_reps(masks, 2), plan) == []
    controls = tasks.plan_controls(_reps(masks, 2), plan)
    assert len(controls) == 2 * 2 * 2 and controls[-1]["group"] == "rep 2: random_prune: 10.0% left, rewind 1ep"
    one = form.check_params(_params(sdag, **{**REPLICATED, "pruning_schedule": "iterative", "replicates": 1}))["plan"]
    assert tasks.plan_chains(_one(masks), one) == [{"workdir": W, "rewind": r, "group": f"chain, rewind {r}"} for r in ("0it", "1ep")]


def test_chain_task_runs_one_chain_with_ticket_threads(tasks, monkeypatch, caplog):
    """imp_chain's body: one run_chain call (training threads as a ticket's), one line per level, a small XCom."""
    import logging

    from lottery import imp

    calls = []

    def fake_run_chain(workdir, rewind, *, threads=None, **_):
        calls.append((workdir, rewind, threads))
        return [{"level": k + 1, "mask_id": m, "sparsity": s, "remaining": 1 - s, "rewind": rewind, "control": None,
                 "val_accuracy": 0.8, "best_val_accuracy": 0.81, "wall_s": 2.0, "skipped": k == 0, "curve": [1] * 50,
                 "ticket": f"{workdir}/tickets/{m}__{rewind}", "schedule": "iterative"}
                for k, (m, s) in enumerate([("sp50.000", 0.5), ("sp90.000", 0.9)])]

    monkeypatch.setattr(imp, "run_chain", fake_run_chain)
    monkeypatch.setattr(tasks, "queue_note", lambda: "queue gpu")
    monkeypatch.setenv("LOTTERY_THREADS", "1")
    caplog.set_level(logging.INFO)
    out = tasks.chain("/a/rep1", "1ep", "rep 2: chain, rewind 1ep")
    assert calls == [("/a/rep1", "1ep", 1)]
    assert [(lv["level"], lv["mask_id"], lv["skipped"]) for lv in out["levels"]] == [(1, "sp50.000", True), (2, "sp90.000", False)]
    assert "curve" not in out["levels"][0] and out["group"] == "rep 2: chain, rewind 1ep" and out["workdir"] == "/a/rep1"
    assert "level 1: 50.0% left, rewind 1ep: already done" in caplog.text
    assert "level 2: 10.0% left, rewind 1ep: done in 2.0s" in caplog.text
    assert "rep 2: chain, rewind 1ep: done in" in caplog.text and "1 levels trained, 1 already done" in caplog.text


def _replicate_dirs(tmp_path, form, sdag, replicates):
    """prepare_workdir on a small synthetic data set: its checked params and its XCom."""
    from lottery.dag import tasks
    from tests.datasets import make_synthetic_shards

    conf = {"artifact_root": str(tmp_path), "batch_size": 16, "rewind_points": ["0it", "1ep"], "sparsities": [0.5, 0.9],
            "control_sparsities": [0.9], "replicates": replicates, "seed": 7}
    checked = form.check_params(resolve(sdag, conf), conf)
    data = tmp_path / "synthetic"
    if not data.exists():
        make_synthetic_shards(tmp_path, 64, 16)
    return checked, tasks.prepare_workdir(checked["plan"], str(data), str(tmp_path))


def test_prepare_workdir_prepares_every_replicate(sdag, form, tasks, tmp_path):
    """One work dir per replicate (its own seed, one replicate each), the set's directory for the report."""
    from lottery.paths import Workdir

    _, out = _replicate_dirs(tmp_path, form, sdag, 3)
    assert set(out) == {"workdir", "workdirs", "report_dir", "experiment_id", "experiment_ids", "reused"}
    assert out["workdir"] == out["workdirs"][0] and out["experiment_id"] == out["experiment_ids"][0]
    assert [Path(w).name for w in out["workdirs"]] == out["experiment_ids"] and len(set(out["experiment_ids"])) == 3
    assert [(c.seed, c.replicates) for c in (Workdir(w).load()[0] for w in out["workdirs"])] == [(7, 1), (8, 1), (9, 1)]
    assert out["report_dir"] == str(tmp_path / f"{out['experiment_id']}-x3") and Path(out["report_dir"], "replicates.json").is_file()
    assert out["reused"] is False
    json.dumps(out)  # XCom-able
    _, again = _replicate_dirs(tmp_path, form, sdag, 3)
    assert again == {**out, "reused": True}
    _, one = _replicate_dirs(tmp_path, form, sdag, 1)  # replicate 0 alone: the same experiment, its own report
    assert one["workdirs"] == out["workdirs"][:1] and one["report_dir"] == one["workdir"] and one["reused"] is True


def test_train_dense_and_make_masks_read_their_replicates_config(sdag, form, tasks, tmp_path, monkeypatch):
    """Each mapped instance trains its own replicate (the seed of its work dir's config); the replicates'
    dense networks share the cores; make_masks returns its work dir and name beside the descriptors."""
    from lottery import dense, masks as pruning_step

    checked, out = _replicate_dirs(tmp_path, form, sdag, 2)
    calls = []
    monkeypatch.setattr(dense, "run_dense", lambda cfg, data, w, threads: calls.append((cfg.seed, w, threads)) or
                        {"val_accuracy": 0.5, "best_val_accuracy": 0.5, "epochs": 6, "steps": 24, "skipped": False, "curve": []})
    monkeypatch.setattr(pruning_step, "make_masks", lambda w: [{"index": 0, "mask_id": "sp50.000", "sparsity": 0.5,
                                                               "remaining": 0.501, "report": {}}])
    monkeypatch.setattr(tasks, "queue_note", lambda: "queue gpu")
    monkeypatch.delenv("LOTTERY_THREADS", raising=False)
    monkeypatch.setenv("AIRFLOW__CORE__PARALLELISM", "2")
    for kwargs in tasks.plan_replicates(out["workdirs"], out["experiment_ids"]):
        result = tasks.train_dense(checked["plan"], "/data", **kwargs)
        assert result["workdir"] == kwargs["workdir"] and result["replicate"] == kwargs["replicate"]
        assert tasks.make_masks(**kwargs) == {**kwargs, "masks": [{"index": 0, "mask_id": "sp50.000", "sparsity": 0.5,
                                                                   "remaining": 0.501, "label": "50.1% left"}]}
    cores = len(os.sched_getaffinity(0))
    assert calls == [(7, out["workdirs"][0], max(1, cores // 2)), (8, out["workdirs"][1], max(1, cores // 2))]


def test_report_and_check_cover_every_replicate(sdag, form, tasks, tmp_path, monkeypatch):
    """report writes each replicate's own report and the one over the replicates; check_results fails
    while any replicate's combination is missing."""
    from airflow.sdk.exceptions import AirflowFailException

    checked, out = _replicate_dirs(tmp_path, form, sdag, 2)
    monkeypatch.setattr(tasks, "get_current_context", lambda: {"run_id": "manual__test"})
    summary = tasks.report(out["report_dir"], out["workdirs"], checked["plan"])
    assert all(Path(w, "report", "report.md").is_file() and Path(w, "results.csv").is_file() for w in out["workdirs"])
    assert summary["replicate_reports"] == [str(Path(w, "report", "report.md")) for w in out["workdirs"]]
    assert summary["expected"] == 2 * (4 + 4)  # per replicate: 2 masks x 2 rewinds + 2 kinds x 1 level x 2
    assert summary["stability_expected"] == 2 * 2  # per replicate: the dense network at 2 rewind points (the default)
    assert len(summary["stability_problems"]) == 4 and summary["stability_problems"][0].endswith(
        "stability dense network, rewind 0it: missing")
    assert Path(out["report_dir"], "report", "report.md").is_file()
    assert summary["problems"] and json.dumps(summary)
    with pytest.raises(AirflowFailException, match="combinations failed or are missing"):
        tasks.check_results(out["report_dir"], out["workdirs"], checked["plan"])
    Path(out["workdirs"][1], "config.json").unlink()
    with pytest.raises(AirflowFailException, match=f"{out['workdirs'][1]} is gone"):
        tasks.report(out["report_dir"], out["workdirs"], checked["plan"])


def _finish_every_ticket(workdir: str, plan: RunPlan) -> None:
    """Sealed results for the dense run and every planned ticket and control, as the engine writes them."""
    from lottery.files import write_json
    from lottery.paths import Workdir

    w = Workdir(workdir)
    write_json(w.dense_result, {"val_accuracy": 0.86, "best_val_accuracy": 0.86, "epochs": 1}, sealed=True)
    for spec in plan.expected:
        write_json(w.ticket(spec).result, {"val_accuracy": 0.8, "best_val_accuracy": 0.8, "remaining": 0.5,
                                           "rewind_step": 0}, sealed=True)


def test_check_results_fails_while_a_planned_instability_analysis_is_missing(sdag, form, tasks, tmp_path, monkeypatch):
    """Every ticket and control done, the dense network's analysis at one rewind point missing: the
    check fails naming it; once its result is there, the run's check passes."""
    from airflow.sdk.exceptions import AirflowFailException

    from lottery.files import write_json

    checked, out = _replicate_dirs(tmp_path, form, sdag, 1)
    monkeypatch.setattr(tasks, "get_current_context", lambda: {"run_id": "manual__test"})
    _finish_every_ticket(out["workdir"], RunPlan.from_dict(checked["plan"]))

    def analysis(name, instability):
        write_json(Path(out["workdir"], "stability", name, "result.json"), {
            "instability": instability, "instability_train": 0.1, "points": 11, "rewind_step": 0,
            "endpoints": {"a": {"val_accuracy": 0.8}, "b": {"val_accuracy": 0.8}}}, sealed=True)

    analysis("dense__0it", 4.0)
    with pytest.raises(AirflowFailException, match=r"1 of 10 combinations failed or are missing .*"
                       r"stability dense network, rewind 1ep: missing"):
        tasks.check_results(out["report_dir"], out["workdirs"], checked["plan"])
    analysis("dense__1ep", 0.5)
    assert tasks.check_results(out["report_dir"], out["workdirs"], checked["plan"])["ok"] is True
    summary = tasks.report(out["report_dir"], out["workdirs"], checked["plan"])
    assert summary["rewind_here"] == {"dense": "1ep"} and Path(summary["instability_plot"]).is_file()
    off = form.check_params(resolve(sdag, {"stability": False}))["plan"]  # stability off: nothing is expected
    assert RunPlan.from_dict(off).stability == ()


def test_plan_stability_maps_replicates_x_networks_x_rewind_points(sdag, form, tasks):
    """One stability instance per (replicate, network, rewind point): the dense network, then the
    tickets at stability_sparsities; named "rep 2: dense, rewind 1ep"; none when stability is off."""
    conf = {**REPLICATED, "replicates": 2, "stability_sparsities": [0.9], "stability_points": 5}
    masks = _masks(form, [0.5, 0.9])
    kwargs = tasks.plan_stability(_reps(masks, 2), form.check_params(_params(sdag, **conf))["plan"])
    assert kwargs == [{"workdir": f"/a/rep{i}", "rewind": r, "mask": mask, "points": 5, "group": f"rep {i + 1}: {name}, rewind {r}"}
                      for i in range(2) for mask, name in ((None, "dense"), ("sp90.000", "10.0% left")) for r in ("0it", "1ep")]
    json.dumps(kwargs)  # XCom-able
    one = form.check_params(_params(sdag, **{**REPLICATED, "replicates": 1}))["plan"]  # the default: the dense network
    assert tasks.plan_stability(_one(masks), one) == [
        {"workdir": W, "rewind": r, "mask": None, "points": 11, "group": f"dense, rewind {r}"} for r in ("0it", "1ep")]
    iterative = form.check_params(_params(sdag, **{**conf, "pruning_schedule": "iterative"}))["plan"]
    assert tasks.plan_stability(_reps(masks, 2), iterative) == kwargs  # on the chains' level masks, after chains_done
    assert tasks.plan_stability(_one(masks), form.check_params(_params(sdag, **{**conf, "stability": False}))["plan"]) == []


def test_stability_task_runs_one_analysis_with_ticket_threads(tasks, monkeypatch, caplog):
    """stability's body: one run_stability call (threads as a ticket's), a start and an end line, a small XCom."""
    import logging

    from lottery import stability

    calls = []

    def fake_run_stability(workdir, rewind, mask=None, *, points=11, threads=None, **_):
        calls.append((workdir, rewind, mask, points, threads))
        return {"stability": f"{mask or 'dense'}__{rewind}", "mask_id": mask, "rewind": rewind, "instability": 1.25,
                "instability_train": 0.5, "points": points, "skipped": False, "path": [{"alpha": 0.0}] * points,
                "endpoints": {"a": {"val_accuracy": 0.8}}}

    monkeypatch.setattr(stability, "run_stability", fake_run_stability)
    monkeypatch.setattr(tasks, "queue_note", lambda: "queue gpu")
    monkeypatch.setenv("LOTTERY_THREADS", "1")
    caplog.set_level(logging.INFO)
    out = tasks.stability("/a/rep1", "1ep", "sp90.000", 7, "rep 2: 10.0% left, rewind 1ep")
    assert calls == [("/a/rep1", "1ep", "sp90.000", 7, 1)]
    assert out == {"group": "rep 2: 10.0% left, rewind 1ep", "workdir": "/a/rep1", "stability": "sp90.000__1ep",
                   "mask_id": "sp90.000", "rewind": "1ep", "instability": 1.25, "instability_train": 0.5, "points": 7,
                   "skipped": False}
    assert "rep 2: 10.0% left, rewind 1ep: start  instability analysis of mask sp90.000 at rewind 1ep  7 points" in caplog.text
    assert "rep 2: 10.0% left, rewind 1ep: done in" in caplog.text and "instability 1.25 points (training subset 0.50)" in caplog.text


def _fake_engine(monkeypatch, tasks, calls: list):
    from lottery import late_reset

    def fake_retrain(workdir, masks, rewind, *, control=None, threads=None, **_):
        calls.append((workdir, list(masks), rewind, control, threads))
        return [{"mask_id": m, "rewind": rewind, "control": control, "val_accuracy": 0.8, "best_val_accuracy": 0.81,
                 "wall_s": 3.0, "skipped": i == 0 and len(masks) > 1, "ticket": f"/w/tickets/{m}__{rewind}",
                 "curve": [1] * 100} for i, m in enumerate(masks)]

    monkeypatch.setattr(late_reset, "retrain", fake_retrain)
    monkeypatch.setattr(tasks, "queue_note", lambda: "queue gpu")
    monkeypatch.setenv("LOTTERY_THREADS", "1")


def test_group_task_calls_the_engine_once(tasks, form, monkeypatch, caplog):
    """A group's task: one engine call for all its tickets; skipped ones logged as already done; small XCom."""
    import logging

    calls = []
    _fake_engine(monkeypatch, tasks, calls)
    masks = _masks(form, [0.2, 0.36])
    caplog.set_level(logging.INFO)
    out = tasks.retrain("/w", masks, "1ep", "rewind 1ep: masks 1-2 (80.0%…64.0% left)", "random_prune")
    assert calls == [("/w", ["sp20.000", "sp36.000"], "1ep", "random_prune", 1)]
    assert [t["mask_id"] for t in out["tickets"]] == ["sp20.000", "sp36.000"] and "curve" not in out["tickets"][0]
    assert "random_prune: 80.0% left, rewind 1ep: already done" in caplog.text
    assert "random_prune: 64.0% left, rewind 1ep: done in 3.0s" in caplog.text
    assert "rewind 1ep: masks 1-2 (80.0%…64.0% left): done in" in caplog.text and "1 trained, 1 already done" in caplog.text


def test_a_group_of_one_takes_the_same_path(tasks, form, monkeypatch, caplog):
    """tickets_per_task 1: the same engine call with one mask, the same XCom, one end line (no group summary)."""
    import logging

    calls = []
    _fake_engine(monkeypatch, tasks, calls)
    caplog.set_level(logging.INFO)
    [kwargs] = tasks.mapped_kwargs(_masks(form, [0.2]), [TicketSpec("sp20.000", "1ep", "random_reinit")])
    out = tasks.retrain("/w", **kwargs)
    assert calls == [("/w", ["sp20.000"], "1ep", "random_reinit", 1)]
    assert out["group"] == "random_reinit: 80.0% left, rewind 1ep" and [t["mask_id"] for t in out["tickets"]] == ["sp20.000"]
    assert caplog.text.count("random_reinit: 80.0% left, rewind 1ep: done in 3.0s") == 1 and "trained," not in caplog.text


# ---- bench/run_breakdown.py: where each second of a training task goes ---------------------------
def _fake_run(tmp_path, per_task: int):
    """A work directory with hand-written results and an Airflow-like database of one run."""
    import sqlite3
    import time as clock

    from bench import run_breakdown  # noqa: F401
    from lottery.dag import tasks
    from lottery.files import write_json
    from lottery.paths import FORMAT_VERSION, Workdir

    cfg = ExperimentConfig(sparsities=(0.5, 0.9), rewind_points=("0it", "1ep"), controls=False)
    w = Workdir(tmp_path / "w")
    write_json(w.config_json, cfg.to_dict())
    write_json(w.run_json, {"experiment_id": "x", "format_version": FORMAT_VERSION})
    masks = [{"index": i, "mask_id": m, "sparsity": s, "remaining": 1 - s, "label": f"{100 * (1 - s):.1f}% left"}
             for i, (m, s) in enumerate([("sp50.000", 0.5), ("sp90.000", 0.9)])]
    kwargs = tasks.mapped_kwargs(masks, RunPlan.from_config(cfg).tickets, per_task)
    now = clock.time()
    # each ticket: 3 s of imports (the group's first ticket only), 0.5 s build, 10 s epochs, 1 s evaluation, 0.3 s writing
    phases = []
    for group in kwargs:
        specs = [TicketSpec(m["mask_id"], group["rewind"]) for m in group["masks"]]
        phases += [{"unit": f"retrain {specs[0].name}", "phase": name, "seconds": s, "at": now}
                   for name, s in (("imports", 3.0), ("build_compile", 0.5))]
        for i, spec in enumerate(specs):
            phases += [{"unit": f"retrain {spec.name}", "phase": name, "seconds": s, "at": now}
                       for name, s in (("epochs", 10.0), ("eval", 1.0), ("write", 0.3))]
            result = {"wall_s": 15.0 * (i + 1), "curve": [{"wall_s": 11.0}], "val_accuracy": 0.8}
            if spec.rewind == "1ep":
                result.update(backend="jax", rewind_step=100, curve=[{"wall_s": 11.0, "step": 1100}])
            write_json(w.ticket(spec).result, result)
    phases.append({"unit": "retrain sp50.000__0it", "phase": "epochs", "seconds": 99.0, "at": now - 3600})  # another run's
    (tmp_path / "phases.jsonl").write_text("".join(json.dumps(line) + "\n" for line in phases))
    write_json(w.dense_result, {"wall_s": 20.0, "curve": [{"wall_s": 18.0}]})
    db = sqlite3.connect(tmp_path / "airflow.db")
    db.execute("create table dag_run (run_id, dag_id, start_date, end_date, state, conf)")
    db.execute("create table task_instance (run_id, task_id, map_index, duration, state, start_date, end_date)")
    db.execute("create table xcom (run_id, task_id, map_index, key, value)")
    stamp = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")  # noqa: E731
    db.execute("insert into dag_run values ('r', 'lottery_ticket', ?, ?, 'success', ?)",
               (stamp(now - 100), stamp(now + 10), json.dumps({"tickets_per_task": per_task})))
    tis = [("train_dense", -1, 25.0)] + [("late_reset", i, 20.0 * (len(k.get("masks", [])) or 1)) for i, k in enumerate(kwargs)]
    for task_id, index, duration in tis:
        db.execute("insert into task_instance values ('r', ?, ?, ?, 'success', ?, ?)", (task_id, index, duration, stamp(now - 60), stamp(now + 1)))
    for task_id, value in [("prepare_workdir", {"workdir": str(w)}), ("plan_tickets", kwargs)]:
        db.execute("insert into xcom values ('r', ?, -1, 'return_value', ?)", (task_id, json.dumps(json.dumps(value))))
    db.commit()
    return tmp_path


@pytest.mark.parametrize("per_task", [1, 2])
def test_run_breakdown_splits_task_seconds(tmp_path, per_task):
    from bench import run_breakdown

    b = run_breakdown.breakdown(_fake_run(tmp_path, per_task), None)
    assert b["tickets_per_task"] == per_task and b["tickets"] == 4
    late = b["seconds"]["late_reset"]
    groups = 4 // per_task
    assert late["instances"] == groups and late["trained"] == 4 and late["timed"]
    assert late["task_s"] == 80.0 and late["engine_s"] == groups * 15.0 * per_task  # the last ticket's wall_s per group
    assert late["airflow_s"] == 80.0 - late["engine_s"]
    assert late["imports"] == 3.0 * groups and late["build_compile"] == 0.5 * groups and late["data_open"] == 0.0
    assert late["epochs"] == 40.0 and late["eval"] == 4.0, "only the phases within the instances' run time"
    text = run_breakdown.to_markdown(b, 2)
    assert f"tickets_per_task {per_task}" in text and "| late_reset | " in text and "| train_dense | 1 | 1 |" in text
    # the compute floor: 2 tickets x 1,000 steps x batch 128 at 2,560 img/s = 100 s, + dense 25 s; wall 110 s
    assert b["training_images"] == 2 * 1000 * 128 and b["backends"] == ["jax"]
    floor = run_breakdown.to_markdown(b, 2, rate=2560.0)
    assert "(Keras on jax)" in floor and "a floor of **2.1 min**" in floor and "= **0.88 x the floor**" in floor, floor
    print(floor)


def test_run_breakdown_without_a_phase_listener(tmp_path):
    """No phases reported: task time, Airflow's start and the engine's wall time only; the phases read '-'."""
    from bench import run_breakdown

    home = _fake_run(tmp_path, 1)
    (home / "phases.jsonl").unlink()
    lines = run_breakdown.seconds_table(run_breakdown.breakdown(home, "r")["seconds"])
    row = next(line for line in lines if line.startswith("| late_reset"))
    assert row == "| late_reset | 4 | 4 | 80.0 (100%) | 20.0 (25%) | - | - | - | - | - | - | - | - |", row
    assert "LOTTERY_PHASE_LISTENER=bench.run_breakdown:record" in lines[-1]


def test_the_phase_listener_appends_to_the_airflow_home(tmp_path, monkeypatch):
    from bench import run_breakdown
    from lottery.phases import phase

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("LOTTERY_PHASE_LISTENER", "bench.run_breakdown:record")
    with phase("epochs", "retrain a"):
        pass
    with phase("eval", "retrain a"):
        pass
    assert [(p["unit"], p["phase"]) for p in run_breakdown.read_phases(tmp_path)] == [("retrain a", "epochs"), ("retrain a", "eval")]


def test_clearing_a_ticket_with_downstream_reruns_the_report_and_the_check(dag):
    """The README's "When tickets fail" steps for one ticket: *Clear* with *Downstream* (the dialog's default;
    ``include_downstream`` in the REST API, ``airflow tasks clear -d``) also clears ``report`` and
    ``check_results``, the run's only leaf, so the run's state follows the rerun ticket's result."""
    for task_id in ("late_reset", "controls", "train_dense"):
        cleared = set(dag.partial_subset(task_ids=[task_id], include_downstream=True, include_upstream=False).task_dict)
        assert {task_id, "report", "check_results"} <= cleared, (task_id, cleared)
        assert "validate_config" not in cleared
    assert [t.task_id for t in dag.leaves] == ["check_results"]


def test_a_corrupt_input_fails_the_task_at_once_naming_the_file_and_a_transient_error_is_retried(tmp_path):
    """``engine_call``: a damaged shard (a permanent error: retrying reads the same bytes) becomes
    AirflowFailException, which Airflow does not retry; a lock still held (transient) is raised as
    it is, for Airflow's retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from lottery.dag.tasks import engine_call
    from lottery.data.manifest import read_manifest
    from lottery.data.verify import verify_shards
    from lottery.locks import LockTimeout
    from tests.datasets import make_synthetic_shards

    data = make_synthetic_shards(tmp_path, 16, 8)
    shard = data / "val-00000-of-00001.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(AirflowFailException, match=f"CorruptDataError: {shard}: damaged shard of split 'val'"):
        engine_call(verify_shards, data, read_manifest(data), ["val"])
    shard.unlink()
    with pytest.raises(AirflowFailException, match=f"MissingDataError: {shard}: shard of split 'val' .* is missing"):
        engine_call(verify_shards, data, read_manifest(data), ["val"])

    def held():
        raise LockTimeout("waited 1 s for the test's holder")

    with pytest.raises(LockTimeout):
        engine_call(held)


def test_validate_config_checks_the_data_size_when_the_data_is_written(sdag, form, tmp_path):
    """A rewind point in iterations past the end of training on a small data set: named by
    validate_config when the data set is already written (and else by prepare_workdir, after preprocess)."""
    conf = {"artifact_root": str(tmp_path), "dataset_limit": 300, "training_steps": "2ep", "rewind_points": ["0it", "500it"]}
    params = resolve(sdag, conf)
    data_dir = Path(form.check_params(params, conf)["data_dir"])  # no data yet: accepted
    data_dir.mkdir(parents=True)
    (data_dir / "manifest.json").write_text(json.dumps({"splits": {"train": {"count": 240}}}))  # 1 iteration per epoch
    with pytest.raises(ConfigError) as err:
        form.check_params(params, conf)
    assert err.value.fields == ["rewind_points"] and "'500it': is iteration 500, not before the end of training" in str(err.value)


def test_prepare_workdir_checks_the_data_size_before_any_training(sdag, form, tasks, tmp_path):
    """After preprocess (the data's size is known), before train_dense: the task fails at once, naming the field."""
    from airflow.sdk.exceptions import AirflowFailException

    conf = {"artifact_root": str(tmp_path), "dataset_limit": 300, "training_steps": "2ep", "rewind_points": ["0it", "500it"]}
    checked = form.check_params(resolve(sdag, conf), conf)
    data_dir = Path(checked["data_dir"])
    data_dir.mkdir(parents=True)
    (data_dir / "manifest.json").write_text(json.dumps({"splits": {"train": {"count": 240}}}))
    with pytest.raises(AirflowFailException, match="config field 'rewind_points' = '500it'"):
        tasks.prepare_workdir(checked["plan"], str(data_dir), str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no work directory was made

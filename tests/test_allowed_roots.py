"""Where a run may write and read is the deployment's choice (lottery/deploy/roots.py).

A trigger's ``artifact_root`` or ``dataset`` outside the allowed roots is refused by
``validate_config``, by its spelling or once ``..`` and symlinks are resolved, naming the field and
the allowed roots in words (the DAG as parsed with this deployment's roots); a refused run writes nothing. docs/reliability.md lists
the tricks tried here.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import init_db_here, use_test_home

HOME = use_test_home()  # before airflow is imported

from lottery.deploy.roots import allowed_artifact_roots, allowed_data_roots, parse_roots, path_problem, root_pattern  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CYRILLIC_A = "\u0430"  # looks like "a"


@pytest.fixture()
def deployment(tmp_path):
    """An allowed artifact root and data root (real directories), plus the things around them."""
    art, data = tmp_path / "allowed" / "artifacts", tmp_path / "allowed" / "images"
    for d in (art, data / "train" / "cls", tmp_path / "artifacts-old", tmp_path / "allowed" / f"{CYRILLIC_A}rtifacts"):
        d.mkdir(parents=True)
    for root in (art, data):  # the same tricks inside either root
        (root / "to-etc").symlink_to("/etc")
        (root / "to-root").symlink_to("/proc/self/root")
        (root / "to-sibling").symlink_to(tmp_path / "artifacts-old")
        (root / "inside").mkdir()
        (root / "to-inside").symlink_to(root / "inside")
    return tmp_path, str(art), str(data)


def tricks(tmp: Path, art: str) -> list[tuple[str, str, str]]:
    """(name, artifact_root as typed, why it is refused: its "spelling", or where it "resolved" to)."""
    return [
        ("dot-dot out of the root", f"{art}/../../etc", "spelling"),
        ("dot-dot that ends inside", f"{art}/inside/../inside", "spelling"),  # refused by spelling, even if harmless
        ("single dot", f"{art}/./inside", "spelling"),
        ("/etc", "/etc", "spelling"),
        ("/proc/self/root", "/proc/self/root/etc", "spelling"),
        ("double slash", f"/{art}", "spelling"),
        ("double slash inside", f"{art}//inside", "spelling"),
        ("trailing slashes", "/etc/", "spelling"),
        ("two trailing slashes", f"{art}//", "spelling"),
        ("a sibling that starts with the root's name", f"{art}-old", "spelling"),
        ("unicode look-alike of the root", art.replace("/artifacts", f"/{CYRILLIC_A}rtifacts"), "spelling"),
        ("fullwidth solidus", "\uff0fetc", "spelling"),
        ("newline after an allowed path", f"{art}/inside\n", "spelling"),
        ("NUL byte", f"{art}/inside\x00/etc", "spelling"),
        ("relative path", "artifacts", "spelling"),
        ("home directory", "~/artifacts", "spelling"),
        ("symlink to /etc inside the root", f"{art}/to-etc", "resolved"),
        ("symlink to /proc/self/root inside the root", f"{art}/to-root/etc", "resolved"),
        ("symlink to a sibling of the root", f"{art}/to-sibling/x", "resolved"),
    ]


def test_at_least_ten_tricks_are_tried(deployment):
    tmp, art, _ = deployment
    assert len(tricks(tmp, art)) >= 10


def test_docs_list_every_trick_tried(deployment):
    """docs/reliability.md's table: one row per trick, with where it is refused."""
    tmp, art, _ = deployment
    doc = (ROOT / "docs" / "reliability.md").read_text()
    for name, _, where in tricks(tmp, art):
        row = next((line for line in doc.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None, f"docs/reliability.md has no row for {name!r}"
        assert row.split("|")[3].strip().startswith(where), row


def test_each_trick_is_refused_by_the_checks(deployment):
    tmp, art, _ = deployment
    for name, path, where in tricks(tmp, art):
        problem = path_problem(path, [art], "LOTTERY_ALLOWED_ARTIFACT_ROOTS")
        assert problem, f"{name}: {path!r} was allowed"
        by_spelling = not _spelling_accepts(path, [art])
        assert by_spelling == (where == "spelling"), f"{name}: {path!r}: refused by spelling {by_spelling}, expected {where}"


def test_plain_paths_in_a_root_are_allowed(deployment):
    tmp, art, _ = deployment
    for path in (art, art + "/", f"{art}/inside", f"{art}/new/deeper", f"{art}/to-inside", f"{art}/.hidden", f"{art}/..x"):
        assert path_problem(path, [art], "E") is None, path
        assert _spelling_accepts(path, [art]), path


def test_a_root_that_is_a_symlink_is_allowed_by_either_spelling(tmp_path):
    real = tmp_path / "volume"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    link = str(tmp_path / "link")
    for path in (link, f"{link}/x", f"{real}/x"):
        assert path_problem(path, [link], "E") is None, path
        assert _spelling_accepts(path, [link]), path


def test_roots_come_from_the_deployment_environment(tmp_path):
    env = {"LOTTERY_ARTIFACT_ROOT": "/srv/art/", "LOTTERY_ALLOWED_ARTIFACT_ROOTS": f"/a//b{os.pathsep}/c/{os.pathsep}{os.pathsep}/a/b"}
    assert allowed_artifact_roots(env) == ("/srv/art", "/a/b", "/c")  # the deployment's own root always first
    assert allowed_data_roots({}) == ()  # default: the bundled Fashion-MNIST only
    assert allowed_data_roots({"LOTTERY_ALLOWED_DATA_ROOTS": "/data"}) == ("/data",)
    with pytest.raises(ValueError, match="LOTTERY_ALLOWED_DATA_ROOTS: 'data' is not an absolute path"):
        parse_roots("data", "LOTTERY_ALLOWED_DATA_ROOTS")
    assert root_pattern([]) is None
    assert path_problem("/data/x", [], "LOTTERY_ALLOWED_DATA_ROOTS").endswith("none (the deployment's LOTTERY_ALLOWED_DATA_ROOTS)")


def _spelling_accepts(path: str, roots) -> bool:
    """The spelling check of ``path_problem``: a plain absolute path under one of ``roots``."""
    return re.fullmatch(root_pattern(roots), path) is not None


# ---- the DAG, parsed by a deployment with its own roots ----------------------------------------------
PROBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.exceptions import ParamValidationError
from airflow.serialization.serialized_objects import DagSerialization
from lottery.config import ConfigError
from lottery.dag.params import check_params

dag = DagBag(dag_folder=sys.argv[1]).dags["lottery_ticket"]
sdag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
out = []
for conf in json.loads(sys.stdin.read()):
    try:
        params = sdag.params.deep_merge(conf).validate()  # what create_dagrun does with a trigger's conf
    except ParamValidationError as exc:
        out.append({"stage": "form", "message": str(exc)[:300]})
        continue
    try:
        check_params(params, conf)  # validate_config
        out.append({"stage": "accepted"})
    except ConfigError as exc:
        out.append({"stage": "validate_config", "fields": exc.fields, "message": str(exc)})
print(json.dumps(out))
"""


def probe(art: str, data: str, confs: list[dict]) -> list[dict]:
    """Trigger-time and validate_config checks of ``confs`` on the DAG parsed with these roots."""
    env = {**os.environ, "LOTTERY_ARTIFACT_ROOT": art, "LOTTERY_ALLOWED_ARTIFACT_ROOTS": "", "LOTTERY_ALLOWED_DATA_ROOTS": data}
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "dags")], input=json.dumps(confs), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_dag_refuses_every_trick_naming_the_field(deployment):
    tmp, art, data = deployment
    cases = tricks(tmp, art)
    confs = [{"artifact_root": path} for _, path, _ in cases]
    confs += [{"dataset": path.replace(art, data)} for _, path, _ in cases if path.startswith(art)]
    confs += [{"dataset": "/etc"}, {"dataset": "/proc/self/root"}, {"dataset": f"{data}/../artifacts"}]
    results = probe(art, data, confs + [{}, {"artifact_root": f"{art}/inside"}, {"dataset": data, "artifact_root": art + "/"}])
    *refused, default, inside, own_data = results
    for conf, result in zip(confs, refused):
        (field, value), = conf.items()
        assert result["stage"] == "validate_config", (conf, result)  # the form takes any string: no regex dump
        assert result["fields"] == [field] and result["message"].startswith(f"config field '{field}' = "), (conf, result)
        roots = art if field == "artifact_root" else data
        assert f"allowed root: {roots} (the deployment's" in result["message"] or f"allowed roots ({roots} (" in result["message"], result
        assert "does not match" not in result["message"] and "(?!" not in result["message"], result
    assert [r["stage"] for r in (default, inside, own_data)] == ["accepted"] * 3, (default, inside, own_data)


def test_without_data_roots_only_the_bundled_data_set_is_read(deployment):
    tmp, art, data = deployment
    results = probe(art, "", [{"dataset": data}, {"dataset": "fashion_mnist"}])
    assert results[0]["stage"] == "validate_config" and results[0]["fields"] == ["dataset"]
    assert "in or under an allowed root: none (the deployment's LOTTERY_ALLOWED_DATA_ROOTS)" in results[0]["message"]
    assert results[1]["stage"] == "accepted"


def test_every_error_is_named_at_once(deployment):
    """Paths, unknown keys and config errors: one ConfigError that names them all."""
    tmp, art, data = deployment
    conf = {"artifact_root": f"{art}/to-etc", "dataset": f"{data}/to-nowhere", "sparsities": [0.5, 0.9],
            "control_sparsities": [0.7], "rewind_points": ["0it", "10ep"], "lr_milestones": ["9ep"]}
    (result,) = probe(art, data, [conf])
    assert result["stage"] == "validate_config"
    assert result["fields"] == ["artifact_root", "dataset", "lr_milestones", "rewind_points", "control_sparsities"], result
    assert result["message"].startswith("5 config errors: ")


# ---- a real run: refused by validate_config, nothing written -------------------------------------------
def test_a_run_through_a_symlink_out_of_the_root_fails_at_validate_config(tmp_path, caplog, capfd):
    """The test deployment allows the temp directory; a symlink in it to a directory outside is
    accepted by the form (its spelling is fine) and refused by validate_config: the run fails and
    nothing is written where the link points."""
    import logging

    from airflow.dag_processing.dagbag import DagBag

    import tempfile

    outside = ROOT / ".pytest_cache" / "lottery-outside-the-roots"  # ignored by git, not under the temp dir
    if str(outside).startswith(tempfile.gettempdir()):
        pytest.skip("the repository is under the temp directory, which the test deployment allows")
    outside.mkdir(parents=True, exist_ok=True)
    try:
        before = sorted(outside.iterdir())
        (tmp_path / "art").symlink_to(outside)
        init_db_here()
        dag = DagBag(dag_folder=str(ROOT / "dags")).dags["lottery_ticket"]
        caplog.set_level(logging.INFO)
        run = dag.test(run_conf={"artifact_root": str(tmp_path / "art"), "tickets_per_task": 1})
        assert "failed" in str(run.state).lower()
        captured = capfd.readouterr()
        logs = caplog.text + captured.out + captured.err  # dag.test() logs through structlog, to the terminal
        assert "config field 'artifact_root'" in logs and f"resolves to {outside}" in logs
        assert sorted(outside.iterdir()) == before
    finally:
        if not any(outside.iterdir()):
            outside.rmdir()

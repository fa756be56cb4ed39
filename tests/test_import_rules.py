"""The project's import rules, checked on the source: only lottery/data imports TensorFlow; the DAG
file imports nothing heavy at module level (the DAG processor parses it every 30 s)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"tensorflow", "keras", "pyspark", "numpy", "jax", "torch", "matplotlib"}


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_only_lottery_data_imports_tensorflow():
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "lottery").rglob("*.py")
        if "tensorflow" in _imports(p) and (ROOT / "lottery" / "data") not in p.parents
    ]
    assert offenders == [], f"TensorFlow imported outside lottery/data: {offenders}"


def test_dag_files_import_nothing_heavy_at_module_level():
    for path in (ROOT / "dags").glob("*.py"):
        heavy = _imports(path, top_level_only=True) & HEAVY
        assert not heavy, f"{path.name} imports {sorted(heavy)} at parse time: import inside the task"


def test_the_rule_checker_sees_imports():
    """The checks above could pass vacuously if the parser missed imports: it must not."""
    assert "tensorflow" in _imports(ROOT / "lottery" / "data" / "pipeline.py")
    assert "keras" in _imports(ROOT / "lottery" / "training.py")


# ---- one installed package, one definition of each deployment name ----------------------------
SOURCE_DIRS = ("lottery", "spark_jobs", "dags", "plugins", "docker", "scripts", "bench", "tests")
DEPLOYMENT_NAMES = {"DAG_ID", "POOL", "POOL_SLOTS", "GPU_QUEUE", "DEFAULT_QUEUE", "QUEUE_PATTERN", "QUEUE_DAGS",
                    "SPARK_CONN_ID"}


def _sources(*dirs: str):
    for d in dirs:
        yield from (p for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_no_sys_path_manipulation_outside_conftest():
    """The project is installed (editable) into the venv: `import lottery`, `import spark_jobs` work
    from any directory and any subprocess, so nothing needs to edit the import path."""
    needles = tuple("sys.path." + verb for verb in ("insert", "append", "extend")) + ("site." + "addsitedir",)
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _sources(*SOURCE_DIRS)
        if p != ROOT / "tests" / "conftest.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if any(needle in line for needle in needles)
    ]
    assert offenders == [], f"sys.path edited outside tests/conftest.py: {offenders}"


def test_deployment_names_are_defined_once():
    """Pool, slots, queues, DAG id and connection id live in lottery/deploy/constants.py only; the
    DAG, the plugin, docker/ and the local supervisors import them."""
    from lottery.deploy import constants

    home = ROOT / "lottery" / "deploy" / "constants.py"
    values = {constants.POOL, constants.QUEUE_PATTERN}
    offenders = []
    for p in _sources("lottery", "spark_jobs", "dags", "plugins", "docker", "scripts"):
        if p == home:
            continue
        tree = ast.parse(p.read_text(), filename=str(p))
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            names = {getattr(t, "id", None) for t in targets} & DEPLOYMENT_NAMES
            offenders += [f"{p.relative_to(ROOT)}:{node.lineno} defines {n}" for n in sorted(names)]
        offenders += [f"{p.relative_to(ROOT)}:{n.lineno} spells {n.value!r}" for n in ast.walk(tree)
                      if isinstance(n, ast.Constant) and n.value in values]
    assert offenders == [], offenders

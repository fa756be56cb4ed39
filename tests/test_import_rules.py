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
